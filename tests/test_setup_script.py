"""scripts/setup.sh's torch choice (scripts/install_torch.sh) for the GPU / no-GPU / local-wheel
cases, with every command it calls stubbed: a fake `nvidia-smi` on PATH (or none) and a fake pip
that records its arguments and fails where the case says the network is missing. No network."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA12_INDEX = "https://download.pytorch.org/whl/cu128"


def _run(tmp_path: Path, *, gpu: bool, cpu_index_reachable: bool = True, env: dict | None = None,
         cuda_index_reachable: bool = True) -> list[str]:
    """Source install_torch.sh and call mmser_install_torch with a fake pip; return pip's argument lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/bash\nexit 0\n")
        smi.chmod(0o755)
    calls = tmp_path / "pip_calls.txt"
    pip = tmp_path / "fake_pip"
    # Fails only on an --index-url call to the index the case makes unreachable; bash builtins only.
    pip.write_text(f"""#!/bin/bash
echo "$*" >> {calls}
if [[ "$*" == *"--index-url {CPU_INDEX}"* && "{int(cpu_index_reachable)}" == 0 ]]; then exit 1; fi
if [[ "$*" == *"--index-url {CUDA12_INDEX}"* && "{int(cuda_index_reachable)}" == 0 ]]; then exit 1; fi
exit 0
""")
    pip.chmod(0o755)
    script = f"source {REPO / 'scripts/install_torch.sh'} && mmser_install_torch {pip} -q"
    # PATH holds only the stub folder: a real nvidia-smi on the test machine cannot leak in.
    out = subprocess.run(["/bin/bash", "-c", script], env={"PATH": str(bin_dir), **(env or {})},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return calls.read_text().splitlines()


def test_no_gpu_uses_the_pytorch_cpu_index_first_with_a_short_timeout(tmp_path):
    (call,) = _run(tmp_path, gpu=False)
    assert call.startswith("-q install --index-url " + CPU_INDEX)
    assert "--timeout 15" in call and "--retries 0" in call and call.endswith("torch==2.13.0")


def test_no_gpu_and_no_cpu_index_falls_back_to_the_default_index(tmp_path):
    # This machine: no network, the CPU wheel is in a local wheel dir that pip's config points to.
    first, second = _run(tmp_path, gpu=False, cpu_index_reachable=False)
    assert "--index-url" in first
    assert second == "-q install torch==2.13.0"


def test_gpu_takes_a_cuda_12_build_for_ctranslate2(tmp_path):
    # CTranslate2 (faster-whisper) needs cuBLAS 12 / cuDNN 9: a torch built for CUDA 12 brings them
    (call,) = _run(tmp_path, gpu=True)
    assert call == f"-q install --index-url {CUDA12_INDEX} --timeout 15 --retries 0 torch>=2.6"


def test_gpu_without_the_cuda_12_index_falls_back_to_the_default_index_with_a_warning(tmp_path):
    first, second = _run(tmp_path, gpu=True, cuda_index_reachable=False)
    assert CUDA12_INDEX in first and second == "-q install torch>=2.6"


def test_gpu_index_and_spec_can_be_chosen(tmp_path):
    (call,) = _run(tmp_path, gpu=True, env={"MMSER_TORCH_CUDA_INDEX": "https://download.pytorch.org/whl/cu126",
                                            "MMSER_TORCH_GPU_SPEC": "torch==2.8.0"})
    assert call == "-q install --index-url https://download.pytorch.org/whl/cu126 --timeout 15 --retries 0 torch==2.8.0"


@pytest.mark.parametrize("gpu", [False, True])
def test_explicit_spec_wins(tmp_path, gpu):
    (call,) = _run(tmp_path, gpu=gpu, env={"MMSER_TORCH_SPEC": "torch==2.7.1"})
    assert call == "-q install torch==2.7.1"


def test_setup_sh_uses_the_function():
    text = (REPO / "scripts/setup.sh").read_text()
    assert "source scripts/install_torch.sh" in text and "mmser_install_torch" in text
    assert 'install "torch==2.13.0"' not in text  # the old CPU branch that started at PyPI's CUDA build
