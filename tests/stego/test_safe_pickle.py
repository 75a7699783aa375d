"""stego.safe_pickle: only listed names resolve, stand-ins are inert and separate, everything else is refused."""

import collections

import pytest
import torch

from stego import safe_pickle


@pytest.mark.parametrize("module, name", [
    ("builtins", "getattr"), ("builtins", "eval"), ("__builtin__", "exec"), ("os", "system"), ("posix", "system"),
    ("subprocess", "Popen"), ("pathlib", "Path"), ("torch", "load"), ("torch.storage", "_load_from_bytes"),
    ("numpy", "load"), ("numpy.core.multiarray", "scalar.__class__"), ("collections", "OrderedDict.fromkeys"),
    ("torch", "__builtins__"),
])
def test_names_off_the_allow_list_are_refused(module, name):
    with pytest.raises(safe_pickle.RefusedGlobal) as error:
        safe_pickle.find_global(module, name)
    assert error.value.qualname == f"{module}.{name}"


def test_listed_names_resolve_to_the_real_objects():
    assert safe_pickle.find_global("collections", "OrderedDict") is collections.OrderedDict
    assert safe_pickle.find_global("torch._utils", "_rebuild_tensor_v2") is torch._utils._rebuild_tensor_v2
    assert safe_pickle.find_global("torch", "bfloat16") is torch.bfloat16
    assert safe_pickle.find_global("__builtin__", "set") is set


def test_stand_ins_are_fresh_inert_classes():
    first = safe_pickle.find_global("omegaconf.dictconfig", "DictConfig")
    second = safe_pickle.find_global("omegaconf.dictconfig", "DictConfig")
    assert first is not second and issubclass(first, safe_pickle.StandIn)
    assert first.pickled_as == "omegaconf.dictconfig.DictConfig"
    first.poisoned = True  # what a pickle could do to the class it got (BUILD on the class)
    assert not hasattr(second, "poisoned")
    obj = first("any", "args")
    obj.__setstate__({"_content": {}})
    assert (obj.args, obj.state) == (("any", "args"), {"_content": {}})
