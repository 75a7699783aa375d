"""A pickle module for `torch.load` that cannot run code: it reads official Lightning checkpoints.

`torch.load(weights_only=True)` refuses the OmegaConf and Lightning classes that a Lightning checkpoint pickles
in its hyper-parameters and callback state, and `weights_only=False` with the plain `pickle` module runs whatever
a crafted file names. This module sits between the two: `find_class` resolves only the names on an explicit
allow-list (tensor rebuilders, plain containers, numpy arrays), turns the classes of a few named packages
(OmegaConf, Lightning) into inert stand-ins, and refuses every other name with `RefusedGlobal`.

`torch.load` uses both `Unpickler` (the main pickle) and `load` (the legacy format reads its magic number,
protocol version, system info and storage keys as separate pickles before and after the main one), so both go
through the allow-list:

    torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle.module)
"""

from __future__ import annotations

import _codecs
import builtins
import collections
import pickle
import types
import typing

import numpy as np
import torch


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a class or function that is not on the allow-list; `qualname` is "module.name"."""

    def __init__(self, qualname: str) -> None:
        super().__init__(f"{qualname} is not on the allow-list of the STEGO checkpoint reader")
        self.qualname = qualname


def _numpy_core():
    # numpy 2 moved numpy.core to numpy._core; pickles written with numpy 1.x name the old module.
    return getattr(np, "_core", None) or np.core


_BUILTINS = {name: getattr(builtins, name) for name in ("set", "frozenset", "slice", "complex", "bytearray", "bytes",
                                                         "dict", "list", "tuple", "int", "float", "str", "bool")}
_NUMPY_ARRAYS = {"scalar": _numpy_core().multiarray.scalar, "_reconstruct": _numpy_core().multiarray._reconstruct}

# Data types and the functions torch itself uses to rebuild tensors; none of them can reach the file system, the
# interpreter or an import. Storage classes are resolved by torch.load before find_class is asked.
ALLOWED: dict[str, dict[str, object]] = {
    "collections": {"OrderedDict": collections.OrderedDict, "defaultdict": collections.defaultdict},
    "torch._utils": {name: getattr(torch._utils, name)
                     for name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")},
    "torch": {"Size": torch.Size, "device": torch.device,
              **{name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}},
    "builtins": _BUILTINS,
    "__builtin__": _BUILTINS,  # protocol-2 pickles (torch.save's default) spell the module this way
    "_codecs": {"encode": _codecs.encode},  # protocol 2 pickles bytes as _codecs.encode(str, enc)
    "numpy": {"dtype": np.dtype, "ndarray": np.ndarray},
    "numpy.core.multiarray": _NUMPY_ARRAYS,
    "numpy._core.multiarray": _NUMPY_ARRAYS,
    "typing": {"Any": typing.Any},  # OmegaConf metadata stores it as a type annotation
}
# Packages whose classes appear in a Lightning checkpoint's hyper-parameters and callback states (DictConfig,
# AttributeDict, ModelCheckpoint as a key). They are never imported: each name becomes a fresh `StandIn` subclass.
STAND_IN_PACKAGES = {"omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities"}
STAND_IN_NAMES = {("argparse", "Namespace")}  # Lightning hparams given as an argparse namespace


class StandIn(dict):
    """Inert replacement for a class of a stand-in package: it only keeps what the pickle hands it.

    A dict, so that the pickle opcodes that fill dict subclasses (AttributeDict) work; `append`/`extend` take the
    items of list-like containers. It defines no behaviour that a later step could trigger.
    """

    pickled_as = ""
    __hash__ = object.__hash__  # usable as a dict key, as the object it replaces may have been

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state

    def append(self, item) -> None:
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items) -> None:
        self.__dict__.setdefault("items", []).extend(items)


def _stand_in(module: str, name: str) -> type[StandIn]:
    # A new class per lookup: whatever a pickle sets on it (BUILD on the class itself) cannot leak into others.
    return type(name.rpartition(".")[2] or "StandIn", (StandIn,), {"pickled_as": f"{module}.{name}"})


def find_global(module: str, name: str):
    """The object a pickle may reference as `module.name`, or RefusedGlobal."""
    table = ALLOWED.get(module, {})
    if name in table:
        return table[name]
    if module.split(".")[0] in STAND_IN_PACKAGES or (module, name) in STAND_IN_NAMES:
        return _stand_in(module, name)
    raise RefusedGlobal(f"{module}.{name}")


class Unpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose every global goes through `find_global` (no import, no other lookup)."""

    def find_class(self, module: str, name: str):
        return find_global(module, name)


def load(file, **kwargs):
    """`pickle.load` through the allow-list; torch.load calls it for each extra pickle of the legacy format."""
    return Unpickler(file, **kwargs).load()


# What torch.load's `pickle_module` must provide: `Unpickler`, `load` and a `__name__` (it checks for dill).
module = types.ModuleType("stego_safe_pickle", __doc__)
module.Unpickler, module.load = Unpickler, load
