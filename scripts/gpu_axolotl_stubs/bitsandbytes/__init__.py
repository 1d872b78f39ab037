"""Stand-in for bitsandbytes, which the GPU machine lacks (its wheel is too large to carry).

Axolotl imports it at module level (axolotl.loaders.adapter, for LoRA/QLoRA), so `axolotl train`
fails to start without it even when no quantisation is used. Every attribute of this package and
of its submodules is a placeholder class: isinstance checks are False, and creating one raises.
transformers/accelerate still see bitsandbytes as absent (no distribution metadata).
"""

import sys
import types

__version__ = "0.0.0+m1stub"


class _Absent:
    def __init__(self, *args, **kwargs):
        raise ImportError("bitsandbytes is not installed (this is the m1-suite stand-in for axolotl's import)")


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Absent,), {})
        setattr(self, name, value)
        return value


sys.modules[__name__].__class__ = _Module
for _sub in ("nn", "functional", "optim", "utils", "autograd", "cextension", "research"):
    _mod = _Module(f"{__name__}.{_sub}")
    sys.modules[_mod.__name__] = _mod
    setattr(sys.modules[__name__], _sub, _mod)
