"""Document boundaries of packed rows: from position_ids restarts or segment-id attention masks.

Axolotl's packing collator writes ``position_ids`` that restart at 0 for every sample and an
``attention_mask`` holding segment ids 1, 2, 3, ...; VeRL's remove-padding path sends one row of
concatenated samples with restarting ``position_ids``. Either way, the model must reset SSM, conv
and attention state at every document start.
"""

from dataclasses import dataclass

import torch


@dataclass
class PackedLayout:
    """Where the documents of a packed batch start: ``cu_seqlens`` over the flattened rows."""

    cu_seqlens: torch.Tensor  # (docs + 1,) int32, over b * L flattened tokens
    max_seqlen: int


def is_packed(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> bool:
    """A batch is packed when a row restarts its positions or its mask holds segment ids > 1."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.max() > 1:
        return True
    if position_ids is not None and position_ids.shape[-1] > 1:
        return bool((position_ids[:, 1:] == 0).any())
    return False


def packed_layout(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, shape) -> PackedLayout:
    """Documents of ``(b, L)`` packed rows: a new one starts at each row start, at each position 0
    and wherever the segment id changes.

    Example::

        >>> import torch
        >>> lay = packed_layout(torch.tensor([[0, 1, 0, 0, 1, 2]]), None, (1, 6))
        >>> lay.cu_seqlens.tolist(), lay.max_seqlen
        ([0, 2, 3, 6], 3)
    """
    b, L = shape
    device = position_ids.device if position_ids is not None else attention_mask.device
    starts = torch.zeros(b, L, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None:
        starts |= position_ids == 0
    if attention_mask is not None and attention_mask.dim() == 2:
        starts[:, 1:] |= attention_mask[:, 1:] != attention_mask[:, :-1]
    flat = starts.flatten()
    start_idx = flat.nonzero().flatten()
    cu = torch.cat([start_idx, torch.tensor([b * L], device=device)]).to(torch.int32)
    return PackedLayout(cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))


def positions_from_mask(attention_mask: torch.Tensor, past_length: int, length: int) -> torch.Tensor:
    """Position ids for left-padded rows: the count of real tokens before each one (pads get 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)[:, past_length : past_length + length]
