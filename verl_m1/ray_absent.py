"""A placeholder ``ray`` module for the in-process GRPO path on machines without Ray.

Why: ``verl/protocol.py`` (imported by everything in VeRL, the FSDP engine included) does ``import ray``
at module top, and ``verl/utils/distributed.py`` too; at import time only type names are touched
(``ray.ObjectRef`` in annotations and ``isinstance`` tuples). :mod:`verl_m1.inprocess_grpo` drives
VeRL's engine in one process and never uses Ray, but Ray's wheel (~70 MB) is not always installable
(an offline GPU box whose transfer limit is a few MiB). :func:`install` then registers a placeholder
``ray`` so those imports succeed; any real use of Ray (``ray.init``, ``ray.get``, ``@ray.remote``,
``RayPPOTrainer``) raises :class:`RuntimeError` with a clear message instead of misbehaving.

Nothing is replaced when Ray is importable: :func:`install` is a no-op then.

Example::

    >>> import verl_m1.ray_absent as ray_absent
    >>> ray_absent.install()  # True only if the placeholder was registered (Ray missing)
    False
    >>> m = ray_absent.placeholder_module()
    >>> isinstance(object(), m.ObjectRef)
    False
    >>> try:
    ...     m.get([])
    ... except RuntimeError as exc:
    ...     print(str(exc).endswith("(called ray.get)"))
    True
"""

from __future__ import annotations

import importlib.util
import sys
import types

MESSAGE = "Ray is not installed: this in-process GRPO path does not use Ray; install ray for VeRL's RayPPOTrainer"
# Type names VeRL touches while importing (annotations, isinstance tuples): empty classes, so that
# ``isinstance(x, ray.ObjectRef)`` is simply False and nothing can construct Ray objects by accident.
TYPE_NAMES = ("ObjectRef", "ObjectRefGenerator", "ActorHandle", "ActorClass", "RemoteFunction")
MARKER = "__m1_ray_placeholder__"


class _RayAbsent(types.ModuleType):
    """Module whose unknown attributes are callables/sub-objects that raise :data:`MESSAGE` on use."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # import machinery probes (__path__, __file__...): behave like a plain module
            raise AttributeError(name)
        return _Unavailable(f"ray.{name}")


class _Unavailable:
    """Stands for any Ray attribute: calling it, or getting attributes from it, raises."""

    def __init__(self, qualname: str):
        self._qualname = qualname

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{MESSAGE} (called {self._qualname})")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self._qualname}.{name}")

    def __repr__(self) -> str:
        return f"<unavailable {self._qualname}: Ray is not installed>"


def placeholder_module() -> types.ModuleType:
    """A fresh placeholder ``ray`` module (not registered)."""
    mod = _RayAbsent("ray", "Placeholder: " + MESSAGE)
    for name in TYPE_NAMES:
        setattr(mod, name, type(name, (), {"__module__": "ray", "__doc__": "Placeholder type: " + MESSAGE}))
    setattr(mod, MARKER, True)
    mod.is_initialized = lambda: False  # asked by code that only *checks* for a Ray session
    return mod


def install() -> bool:
    """Register the placeholder as ``sys.modules["ray"]`` if Ray cannot be imported; idempotent.

    Returns True when the placeholder is (now) in place, False when real Ray is available.
    """
    current = sys.modules.get("ray")
    if current is not None:
        return bool(getattr(current, MARKER, False))
    try:
        if importlib.util.find_spec("ray") is not None:
            return False
    except (ImportError, ValueError):
        pass
    sys.modules["ray"] = placeholder_module()
    return True


def is_placeholder() -> bool:
    """True when ``sys.modules["ray"]`` is this placeholder."""
    return bool(getattr(sys.modules.get("ray"), MARKER, False))


__all__ = ["MESSAGE", "install", "is_placeholder", "placeholder_module"]
