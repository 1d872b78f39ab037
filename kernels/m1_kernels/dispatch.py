"""Choose between the Triton kernels and the PyTorch references."""

import functools
import os
import warnings

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


_SCAN_ENV = "M1_KERNELS_SCAN"


@functools.cache
def _warn_scan_fallback(reason: str) -> None:
    warnings.warn(f"selective scan: running the Triton kernels, not the CUDA ones: {reason}", stacklevel=3)


@torch.compiler.disable  # builds and loads a library, reads pointers: not traceable, so eager under torch.compile
def use_cuda_scan(x: torch.Tensor, dt, A, B, C, z) -> bool:
    """Whether a selective scan on these inputs runs the CUDA kernels (``selective_scan/csrc``) rather than Triton.

    ``M1_KERNELS_SCAN=auto`` (default): CUDA tensors take them when they build (nvcc, once) and cover the inputs,
    else Triton, with one warning per reason. ``=cuda`` makes that an error, ``=triton`` keeps Triton.
    ``M1_KERNELS_IMPL=torch`` or ``=triton`` also keeps them off.

    Example::

        >>> import torch
        >>> use_cuda_scan(torch.zeros(1, 2, 8), None, torch.zeros(8, 4), None, None, None)  # a CPU tensor
        False
    """
    choice = os.environ.get(_SCAN_ENV, "auto").lower()
    if choice not in ("auto", "cuda", "triton"):
        raise ValueError(f"{_SCAN_ENV} must be 'auto', 'cuda' or 'triton', got {choice!r}")
    if choice == "triton" or os.environ.get(_IMPL_ENV, "").lower() in ("torch", "triton"):
        return False
    if not x.is_cuda:
        if choice == "cuda":
            raise ValueError(f"{_SCAN_ENV}=cuda needs CUDA tensors, got {x.device}")
        return False
    from m1_kernels.selective_scan import cuda_scan

    reason = cuda_scan.unsupported_reason(x, dt, A, B, C, z)  # a failed build is a reason too
    if reason is None:
        return True
    if choice == "cuda":
        raise ValueError(f"{_SCAN_ENV}=cuda, but {reason}")
    _warn_scan_fallback(reason)
    return False
