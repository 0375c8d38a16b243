"""CUBLAS_WORKSPACE_CONFIG is in the environment before torch (and so CUDA / cuBLAS) is imported by mmser."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if env_value is not None:
        env["CUBLAS_WORKSPACE_CONFIG"] = env_value
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_cublas_workspace_is_set_at_mmser_import_before_torch():
    code = ("import os, sys\n"
            "import mmser\n"
            "print('torch' in sys.modules, os.environ.get('CUBLAS_WORKSPACE_CONFIG'))\n"
            "import mmser.cli\n"
            "print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))")
    first, after_cli = _run(code, None).splitlines()
    assert first == "False :4096:8"  # set by `import mmser`, before torch is imported
    assert after_cli == ":4096:8"
    assert _run("import os, mmser.cli; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])", ":16:8") == ":16:8"  # kept
