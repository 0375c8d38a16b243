"""The reliability catalogue of the CTranslate2 -> transformers Whisper converter (issue 20, item 0):
a malformed, foreign or quantized model.bin is refused with one line naming the file (the library's
Ct2FormatError, and `mmser train` on such a folder: one `mmser: error:` line). Each case asserts its
outcome and adds a `case | outcome` row (conftest.py's catalogue fixture). The files are small
synthetic ones written with the test's own inverse mapping (tests/test_convert_ct2.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_CONFIGS, cli_error, single_torch_thread, write_toy_corpus  # noqa: F401
from test_convert_ct2 import ct2_variables, tiny_encoder, write_tiny

from mmser.models.convert_ct2 import Ct2FormatError, read_ct2_model, whisper_encoder_state_dict, write_ct2_model


def _rewrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _one_line_naming(exc: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message, message
    for w in words:
        assert w in message, message
    return message


def test_malformed_files_are_refused_with_one_line_naming_the_file(tmp_path, catalogue):
    good = write_tiny(tmp_path / "good").read_bytes()
    cases = {
        "truncated CTranslate2 model.bin (half of it)": (good[: len(good) // 2], "truncated"),
        "CTranslate2 model.bin cut inside its header": (good[:7], "truncated"),
        "CTranslate2 model.bin of binary version 3": (np.uint32(3).tobytes() + good[4:], "version 3"),
        "not a CTranslate2 file (a safetensors header)": (b'{"__metadata__": {}}' + good[20:], "not a CTranslate2"),
        "empty model.bin": (b"", "empty"),
    }
    for k, (case, (data, word)) in enumerate(cases.items()):
        path = _rewrite(tmp_path / f"bad{k}.bin", data)
        with pytest.raises(Ct2FormatError) as exc:
            whisper_encoder_state_dict(read_ct2_model(path))
        catalogue(case, _one_line_naming(exc, path, word))


def test_unknown_dtypes_byte_counts_names_and_shapes_are_refused(tmp_path, catalogue):
    encoder = tiny_encoder()
    v = ct2_variables(encoder)

    def check(case: str, variables: dict, word: str) -> None:
        path = write_ct2_model(tmp_path / f"{len(list(tmp_path.iterdir()))}.bin", variables)
        with pytest.raises(Ct2FormatError) as exc:
            whisper_encoder_state_dict(read_ct2_model(path))
        catalogue(case, _one_line_naming(exc, path, word))

    check("CTranslate2 Whisper without encoder/layer_1/ffn/linear_1/bias",
          {k: a for k, a in v.items() if k != "encoder/layer_1/ffn/linear_1/bias"}, "missing")
    check("CTranslate2 Whisper with an unknown encoder variable",
          {**v, "encoder/layer_0/self_attention/relative_position_keys": np.zeros((3, 32), np.float32)}, "unexpected")
    check("CTranslate2 Whisper whose fc1 has the wrong width",
          {**v, "encoder/layer_1/ffn/linear_0/weight": np.zeros((48, 32), np.float32)}, "shape")
    check("CTranslate2 Whisper with 5 heads for d_model 32",
          {**v, "encoder/num_heads": np.array(5, np.int16)}, "num_heads")
    check("a CTranslate2 WhisperSpec without encoder layers", {"decoder/num_heads": np.array(2, np.int16)},
          "no encoder layers")
    path = write_ct2_model(tmp_path / "translator.bin", v, spec="TransformerSpec")
    with pytest.raises(Ct2FormatError) as exc:
        whisper_encoder_state_dict(read_ct2_model(path))
    catalogue("a CTranslate2 translation model (TransformerSpec) as a Whisper", _one_line_naming(exc, path, "Whisper"))

    # an unknown dtype id (9) and a byte count that does not match the shape: patched bytes
    one = write_ct2_model(tmp_path / "one.bin", {"x": np.zeros(4, np.float32)}).read_bytes()
    at = 4 + 2 + len(b"WhisperSpec\0") + 4 + 4 + 2 + len(b"x\0") + 1 + 4  # the dtype byte of "x"
    assert one[at] == 0
    for case, data, word in (("CTranslate2 variable of unknown dtype id 9", one[:at] + b"\x09" + one[at + 1:], "dtype"),
                             ("CTranslate2 variable whose byte count is not its shape's",
                              one[:at + 1] + np.uint32(12).tobytes() + one[at + 5:], "bytes")):
        path = _rewrite(tmp_path / f"patched-{word}.bin", data)
        with pytest.raises(Ct2FormatError) as exc:
            read_ct2_model(path)
        catalogue(case, _one_line_naming(exc, path, word))


def test_quantized_files_are_refused(tmp_path, catalogue):
    v = ct2_variables(tiny_encoder())
    for name in [k for k in v if k.endswith("linear_0/weight") or k.endswith("linear_1/weight")]:
        w = v[name]
        scale = 127.0 / np.abs(w).max(axis=1)  # CTranslate2's int8 scheme (specs/model_spec.py _quantize)
        v[name] = np.rint(w * scale[:, None]).astype(np.int8)
        v[name + "_scale"] = scale.astype(np.float32)
    (tmp_path / "int8").mkdir()
    path = write_ct2_model(tmp_path / "int8" / "model.bin", v)
    with pytest.raises(Ct2FormatError) as exc:
        whisper_encoder_state_dict(read_ct2_model(path.parent))
    catalogue("int8-quantized CTranslate2 Whisper converted for fine-tuning",
              _one_line_naming(exc, path, "quantized", "int8"))


def test_the_cli_names_a_bad_model_bin_in_one_line(tmp_path, capsys, catalogue):
    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1, 2))
    folder = tmp_path / "faster-whisper-tiny"
    bad = write_tiny(folder)
    bad.write_bytes(bad.read_bytes()[:1000])
    argv = ["train", *[a for f in TINY_CONFIGS for a in ("-c", str(f))], "--session", "1",
            f"data.manifest={manifest}", f"output_dir={tmp_path / 'runs'}", "encoder.kind=whisper",
            f"encoder.name={folder}"]
    line = cli_error(capsys, catalogue, "mmser train on a truncated CTranslate2 Whisper folder", argv, str(bad))
    assert "truncated" in line
