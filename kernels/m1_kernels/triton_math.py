# SPDX-License-Identifier: Apache-2.0
"""Transcendental functions for the scan kernels: PTX approximations on NVIDIA GPUs, exact ``tl`` ops elsewhere.

``tl.exp2`` compiles to ``ex2.approx.f32`` wrapped in a range fix for results below 2**-126 (a compare, two
multiplies: four instructions for one), ``tl.exp`` adds a multiply, and ``tl.log`` is a ~25-instruction polynomial.
In the selective scan every ``(token, channel, state)`` element needs an exponential and every ``(token, channel)`` a
softplus and a sigmoid, so these dominated the kernels' instruction counts (sm_90 SASS of the backward: 813 ->
621 instructions per token and thread with the functions below). The approximations flush results below 2**-126
to zero (a decay that small is zero for the recurrence anyway) and have relative errors of ~2**-22, which is below
the fp32 rounding of the additions around them (mamba-ssm's CUDA kernels compile with ``--use_fast_math`` for the
same reason).

``FAST_MATH`` is off under ``TRITON_INTERPRET=1`` (no PTX on the CPU; the exact ``tl`` ops run there), on ROCm,
and with ``M1_KERNELS_FAST_MATH=0`` (to rule the approximations out when debugging numerics).

Example::

    >>> from m1_kernels.triton_math import softplus  # a @triton.jit function: call it inside a kernel
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = 2**(x log2 e)
LN2 = tl.constexpr(0.6931471805599453)  # log(x) = ln 2 log2(x)

FAST_MATH = tl.constexpr(
    os.environ.get("TRITON_INTERPRET", "0") != "1"
    and os.environ.get("M1_KERNELS_FAST_MATH", "1") != "0"
    and torch.version.hip is None
)


@triton.jit
def _ptx(op: tl.constexpr, x):
    return tl.inline_asm_elementwise(op + " $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def exp2(x):
    """2**x in fp32."""
    if FAST_MATH:
        return _ptx("ex2.approx.ftz.f32", x)
    else:
        return tl.exp2(x)


@triton.jit
def exp(x):
    """e**x in fp32."""
    return exp2(x * LOG2E)


@triton.jit
def sigmoid(x):
    """1 / (1 + e**-x) in fp32 (0 and 1 at the extremes: 2**144 is inf, 1 / inf is 0)."""
    if FAST_MATH:
        return _ptx("rcp.approx.ftz.f32", 1.0 + exp(-x))
    else:
        return tl.sigmoid(x)


@triton.jit
def softplus(x):
    """log(1 + e**x), the identity above 20 like ``torch.nn.functional.softplus`` (threshold 20)."""
    if FAST_MATH:
        sp = LN2 * _ptx("lg2.approx.ftz.f32", 1.0 + exp(tl.minimum(x, 20.0)))
    else:
        sp = tl.log(1.0 + tl.exp(tl.minimum(x, 20.0)))
    return tl.where(x <= 20.0, sp, x)
