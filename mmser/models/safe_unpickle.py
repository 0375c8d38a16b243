"""Load old `torch.save` checkpoints (fairseq's among them) without running code they carry.

A pickle can name any importable callable and have the unpickler call it (`os.system` included).
torch's own `weights_only=True` loader refuses every class it does not know, and fairseq
checkpoints carry `argparse.Namespace` args plus `fairseq.meters.*` objects in `extra_state`, so
it cannot read them without importing fairseq. This module is a restricted unpickler instead:

* an explicit allow-list of harmless globals (tensor/storage rebuild functions, dtypes,
  `argparse.Namespace`, `collections.OrderedDict`, a few builtins and numpy scalar/array types);
* classes from "inert" modules (by default fairseq's meters) are never imported: each is replaced
  by a placeholder subclass of `InertObject` that only stores the state it is given;
* anything else raises `RefusedGlobalError` naming `module.Class`, before it is imported or called.

Restricting `find_class` is sufficient: every pickle opcode that reaches a global (GLOBAL,
STACK_GLOBAL, INST, OBJ, EXT*) goes through it, and REDUCE / NEWOBJ / BUILD can only call objects
obtained that way (see "Restricting Globals" in the `pickle` docs).

Use `safe_torch_load(path)`; it handles both torch's zip format and the legacy (pre-1.6,
`_use_new_zipfile_serialization=False`) format. This module itself is also a valid
`pickle_module` for `torch.load(f, pickle_module=safe_unpickle, weights_only=False)`.
"""

from __future__ import annotations

import _compat_pickle
import io
import logging
import pickle
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Modules whose classes are replaced by inert placeholders instead of being imported. fairseq
# pickles its training meters (AverageMeter, TimeMeter, StopwatchMeter, MetersDict, ...) into
# checkpoint["extra_state"]; they are bookkeeping we never need.
DEFAULT_INERT_MODULES: tuple[str, ...] = ("fairseq.meters", "fairseq.logging.meters")

_TORCH_REBUILD_FUNCTIONS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
)

# (module, name) pairs that are safe to import and call with pickled arguments.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [("torch._utils", n) for n in _TORCH_REBUILD_FUNCTIONS]
    + [
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("collections", "OrderedDict"),
        ("argparse", "Namespace"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("builtins", "object"),
        # protocol 2 pickles `bytes` (e.g. numpy scalar payloads) as _codecs.encode(str, "latin1")
        ("_codecs", "encode"),
        # protocol 0/1 pickles of plain objects; the class argument still passes find_class
        ("copyreg", "_reconstructor"),
        # numpy scalars / arrays (e.g. a best-loss value stored as numpy.float64)
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
    ]
)


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle referenced a global (class or function) outside the allow-list."""

    def __init__(self, module: str, name: str, source: str | None = None) -> None:
        self.module = module
        self.name = name
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(
            f"{where}refused to unpickle '{module}.{name}': it is not on the allow-list of "
            f"mmser.models.safe_unpickle (nothing was imported or executed). If this file is "
            f"a checkpoint you trust and the class is harmless, add it to the allow-list."
        )


class InertObject:
    """Stand-in for a class that is not imported: it accepts any constructor arguments and keeps
    the pickled state, items and list entries without interpreting them."""

    _inert_qualname: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = super().__new__(cls)
        obj.__dict__.update(inert_args=args, inert_kwargs=kwargs, inert_state=None)
        obj.__dict__.update(inert_items={}, inert_list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # absorb REDUCE-style construction
        pass

    # setdefault: protocol 0/1 pickles build instances with copyreg._reconstructor, i.e.
    # object.__new__(cls), which skips __new__ above.
    def __setstate__(self, state: Any) -> None:  # BUILD
        self.__dict__["inert_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS (dict subclasses)
        self.__dict__.setdefault("inert_items", {})[key] = value

    def append(self, value: Any) -> None:  # APPENDS (list subclasses)
        self.__dict__.setdefault("inert_list", []).append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__.setdefault("inert_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<inert {self._inert_qualname}>"


_placeholders: dict[tuple[str, str], type[InertObject]] = {}


def inert_placeholder(module: str, name: str) -> type[InertObject]:
    """The (cached) placeholder class standing in for `module.name`."""
    key = (module, name)
    if key not in _placeholders:
        _placeholders[key] = type(
            name, (InertObject,), {"__module__": __name__, "_inert_qualname": f"{module}.{name}"}
        )
    return _placeholders[key]


def _is_allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED:
        return True
    # dtypes pickle as globals: torch.float16, torch.float32, ...
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    return False


class Unpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` only returns allow-listed globals.

    `inert_modules` (class attribute; override in a subclass) lists module prefixes whose classes
    become `InertObject` placeholders; `source` names the file in error messages.
    """

    inert_modules: tuple[str, ...] = DEFAULT_INERT_MODULES
    source: str | None = None

    def find_class(self, module: str, name: str) -> Any:
        # Protocol < 3 pickles name Python 2 modules ("__builtin__.set", "copy_reg"); map them to
        # their Python 3 names first, as pickle's own fix_imports would.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if any(module == m or module.startswith(m + ".") for m in self.inert_modules):
            logger.debug("replacing %s.%s with an inert placeholder", module, name)
            return inert_placeholder(module, name)
        if _is_allowed(module, name):
            return super().find_class(module, name)
        raise RefusedGlobalError(module, name, self.source)


def load(file: Any, **kwargs: Any) -> Any:
    """`pickle.load` with the restricted `Unpickler` (torch calls this for legacy headers)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    """`pickle.loads` with the restricted `Unpickler`."""
    return Unpickler(io.BytesIO(data), **kwargs).load()


def _pickle_module_for(source: str, inert_modules: tuple[str, ...]) -> types.SimpleNamespace:
    """A pickle_module for torch.load whose errors name `source`."""

    class _SourcedUnpickler(Unpickler):
        pass

    _SourcedUnpickler.source = source
    _SourcedUnpickler.inert_modules = inert_modules

    def _load(file: Any, **kwargs: Any) -> Any:
        return _SourcedUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__=__name__, Unpickler=_SourcedUnpickler, load=_load)


def safe_torch_load(
    path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    inert_modules: tuple[str, ...] = DEFAULT_INERT_MODULES,
) -> Any:
    """`torch.load(path)` through the restricted unpickler (zip or legacy format).

    Raises FileNotFoundError for a missing file, `RefusedGlobalError` (naming the file and the
    refused `module.Class`) for a global outside the allow-list, and ValueError naming the file
    when it is not a readable torch checkpoint; every message is one line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    module = _pickle_module_for(str(path), tuple(inert_modules))
    try:
        # weights_only=False is required to pass a pickle_module; our Unpickler is the safety.
        return torch.load(path, map_location=map_location, pickle_module=module, weights_only=False)
    except RefusedGlobalError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or crafted file fails in many ways
        # (UnpicklingError, EOFError, RuntimeError from torch, TypeError/ValueError from a
        # REDUCE with bad arguments); all are one message naming the file, on one line.
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ValueError(f"{path}: not a readable torch checkpoint ({reason})") from e
