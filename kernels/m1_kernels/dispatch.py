"""Choose between the Triton kernels and the PyTorch references."""

import functools
import os

import torch

_IMPL_ENV = "M1_KERNELS_IMPL"


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it is not installed on every machine)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs its Triton kernel.

    ``M1_KERNELS_IMPL=torch`` forces the reference, ``=triton`` forces Triton (CPU tensors then need
    ``TRITON_INTERPRET=1``); unset, CUDA tensors use Triton when it is importable.
    """
    impl = os.environ.get(_IMPL_ENV, "").lower()
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{_IMPL_ENV}=triton but triton is not installed: pip install triton")
        return True
    if impl not in ("", "auto"):
        raise ValueError(f"{_IMPL_ENV} must be 'torch', 'triton' or 'auto', got {impl!r}")
    return tensor.is_cuda and triton_available()
