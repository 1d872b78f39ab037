"""Logging statistics returned by the KL losses with ``return_stats=True``."""

from typing import NamedTuple

import torch


class KLStats(NamedTuple):
    """Detached 0-d tensors (no host sync is forced; call ``.item()`` when logging).

    kl: mean KL over the counted tokens (the loss value; 0 when none is counted).
    top1_agreement: fraction of counted tokens whose student and teacher argmax agree (0 when none).
    num_tokens: number of counted tokens (labels != ignore_index), int64.
    """

    kl: torch.Tensor
    top1_agreement: torch.Tensor
    num_tokens: torch.Tensor
