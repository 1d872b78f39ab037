"""Generation cache of an M1 hybrid: conv + SSM state per Mamba layer, keys/values per attention layer."""

import torch

from .attention import AttentionLayerState
from .configuration_m1 import ATTENTION
from .configuration_m1 import M1HybridConfig
from .mamba_layer import MambaLayerState


class M1HybridCache:
    """Per-layer decoding state for ``batch_size`` sequences; ``seen_tokens`` counts cached positions.

    Mamba state is constant-size (``(b, d_inner, d_conv-1)`` conv window, ``(b, d_inner, d_state)``
    SSM state, float32 by default: ``config.ssm_cache_dtype``); attention keys/values grow.

    Example::

        >>> import torch
        >>> from m1_hybrid import M1HybridConfig
        >>> cfg = M1HybridConfig(num_hidden_layers=2, attn_layers=[1], hidden_size=64, num_attention_heads=2,
        ...     num_key_value_heads=1, intermediate_size=64, vocab_size=10)
        >>> cache = M1HybridCache(cfg, batch_size=3, dtype=torch.float32, device="cpu")
        >>> cache.layers[0].ssm.shape, cache.get_seq_length()
        (torch.Size([3, 64, 16]), 0)
    """

    is_compileable = False

    def __init__(self, config: M1HybridConfig, batch_size: int, dtype: torch.dtype, device):
        # "float32" means at least float32: a float64 model keeps float64 states.
        ssm_dtype = torch.promote_types(torch.float32, dtype) if config.ssm_cache_dtype == "float32" else dtype
        self.layers = []
        for kind in config.layers_block_type:
            if kind == ATTENTION:
                self.layers.append(AttentionLayerState())
            else:
                conv = torch.zeros(batch_size, *config.conv_state_shape, dtype=dtype, device=device)
                ssm = torch.zeros(batch_size, *config.ssm_state_shape, dtype=ssm_dtype, device=device)
                self.layers.append(MambaLayerState(conv, ssm))
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of positions already in the cache."""
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` (beam search)."""
        for layer in self.layers:
            layer.select(beam_idx)

    def __len__(self) -> int:
        return len(self.layers)
