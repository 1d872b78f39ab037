"""Fused token log-prob + entropy (GRPO): chunked over tokens, recomputing backward.

See README.md in this folder for the maths and the memory analysis.
"""

from m1_kernels.logprob_entropy.fused import LinearLogprobEntropyFunction
from m1_kernels.logprob_entropy.fused import LogprobEntropyFunction
from m1_kernels.logprob_entropy.fused import fused_linear_logprob_entropy
from m1_kernels.logprob_entropy.fused import logprob_entropy_from_logits
from m1_kernels.logprob_entropy.naive import fused_linear_logprob_entropy_ref
from m1_kernels.logprob_entropy.naive import logprob_entropy_from_logits_ref

__all__ = [
    "LinearLogprobEntropyFunction",
    "LogprobEntropyFunction",
    "fused_linear_logprob_entropy",
    "fused_linear_logprob_entropy_ref",
    "logprob_entropy_from_logits",
    "logprob_entropy_from_logits_ref",
]
