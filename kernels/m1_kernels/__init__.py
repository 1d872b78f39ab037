"""m1_kernels: the shared ops of the M1 layer and its losses (installed from ``kernels/``).

Every op has a pure-PyTorch reference (``naive.py`` in its folder) and, where it pays, a Triton
kernel for CUDA. The public functions below dispatch by device: CUDA tensors go to Triton when it is
importable, everything else to the reference. ``M1_KERNELS_IMPL=torch`` forces the references
(debugging, numerics), ``M1_KERNELS_IMPL=triton`` forces Triton (e.g. on CPU under
``TRITON_INTERPRET=1``).

Layouts are token-major, batch-first, as the projections produce them:

- selective scan: ``x, dt, z (b, L, d_inner)``, ``A (d_inner, N)``, ``B (b, L, G_B, N)``,
  ``C (b, L, G_C, N)``; channel ``d`` reads C group ``d // (d_inner // G_C)`` and B group
  ``(d // (d_inner // G_C)) // (G_C // G_B)`` (the M1 GQA repeat, never materialised).
  Packed documents: ``b == 1`` and ``cu_seqlens (num_docs + 1,)`` int32.
- conv: ``x (b, L, d)``, ``weight (d, K)``; states keep the last ``K - 1`` inputs ``(.., d, K-1)``.
- decode ops update a state cache in place, addressed by ``state_indices`` (slot per row;
  ``pad_slot_id`` rows are skipped: CUDA-graph padding).

Example::

    >>> import torch, m1_kernels
    >>> b, L, d, N = 1, 5, 32, 16
    >>> x, dt, z = (torch.randn(b, L, d) for _ in range(3))
    >>> A = -torch.rand(d, N); B = torch.randn(b, L, 1, N); C = torch.randn(b, L, 2, N)
    >>> y, h = m1_kernels.selective_scan(x, dt, A, B, C, D=torch.ones(d), z=z,
    ...     cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32), return_final_state=True)
    >>> y.shape, h.shape
    (torch.Size([1, 5, 32]), torch.Size([2, 32, 16]))
"""

from m1_kernels.dispatch import use_triton
from m1_kernels.fused_kl import KLStats
from m1_kernels.fused_kl import fused_kl_div
from m1_kernels.fused_kl import fused_linear_kl_div
from m1_kernels.logprob_entropy import fused_linear_logprob_entropy
from m1_kernels.logprob_entropy import logprob_entropy_from_logits
from m1_kernels.ops import causal_conv1d
from m1_kernels.ops import causal_conv1d_update
from m1_kernels.ops import selective_scan
from m1_kernels.ops import selective_state_update

__all__ = [
    "KLStats",
    "causal_conv1d",
    "causal_conv1d_update",
    "fused_kl_div",
    "fused_linear_kl_div",
    "fused_linear_logprob_entropy",
    "logprob_entropy_from_logits",
    "selective_scan",
    "selective_state_update",
    "use_triton",
]
