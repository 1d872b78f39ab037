"""Kernel tests poison fresh allocations with NaN, so outputs a kernel forgets to write are caught.

Only allocations made from inside ``m1_kernels`` are poisoned (``torch.empty``/``empty_like``),
the way flash-linear-attention's test suite does it.
"""

import sys

import pytest
import torch

# Before any test module can import triton: TRITON_INTERPRET=1 on machines without CUDA.
import tests.kernels.interpreter  # noqa: F401

_REAL_EMPTY = torch.empty
_REAL_EMPTY_LIKE = torch.empty_like


def _called_from_m1_kernels() -> bool:
    frame = sys._getframe(2)
    return frame is not None and frame.f_globals.get("__name__", "").startswith("m1_kernels")


def _poisoned(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    return tensor


@pytest.fixture(autouse=True)
def nan_poison_empty(monkeypatch):
    def empty(*args, **kwargs):
        out = _REAL_EMPTY(*args, **kwargs)
        return _poisoned(out) if _called_from_m1_kernels() else out

    def empty_like(*args, **kwargs):
        out = _REAL_EMPTY_LIKE(*args, **kwargs)
        return _poisoned(out) if _called_from_m1_kernels() else out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield
