"""Fused KL divergence losses for distillation (reverse/forward, temperature, ignore_index), memory-bounded.

See README.md in this folder for the maths and the memory analysis.
"""

from m1_kernels.fused_kl.fused import FusedKLDivFunction
from m1_kernels.fused_kl.fused import FusedLinearKLDivFunction
from m1_kernels.fused_kl.fused import fused_kl_div
from m1_kernels.fused_kl.fused import fused_linear_kl_div
from m1_kernels.fused_kl.naive import fused_kl_div_ref
from m1_kernels.fused_kl.naive import fused_linear_kl_div_ref
from m1_kernels.fused_kl.stats import KLStats

__all__ = [
    "FusedKLDivFunction",
    "FusedLinearKLDivFunction",
    "KLStats",
    "fused_kl_div",
    "fused_kl_div_ref",
    "fused_linear_kl_div",
    "fused_linear_kl_div_ref",
]
