"""Configuration of the M1 hybrid (Mamba + attention) causal LM."""

import math

from transformers import PretrainedConfig

MAMBA = "mamba"
ATTENTION = "attention"


class M1HybridConfig(PretrainedConfig):
    """Config of an M1 hybrid: a Llama-style decoder whose layers are M1 Mamba mixers except at
    ``attn_layers``, which keep grouped-query attention.

    Mamba layers follow the released M1 layer: one fused ``in_proj`` producing
    ``[z (d_inner), x (d_xb), B (d_xb), C (d_inner), dt_low (dt_rank)]``, ``x`` and ``B`` cut into
    ``d_state``-sized chunks and repeated ``d_inner / d_xb`` times (the GQA repeat), a depthwise conv
    over the repeated ``x``, a Mamba-1 selective scan with per-channel ``A`` and a ``silu(z)`` gate.

    ``dt_bias_twice``: the released M1-3B adds ``dt_proj.bias`` in ``dt_proj`` and again inside the
    scan (effective ``softplus(W dt_low + 2 b)``). Importing M1-3B turns it on; new conversions keep
    it off, so ``dt_proj.bias`` means what Mamba's init recipe intends (``softplus(b)`` = initial dt
    in [1e-3, 0.1]).

    ``ssm_cache_dtype``: dtype of the SSM state in the generation cache ("float32", or "model" for
    the weights' dtype as the released code did).

    Example::

        >>> from m1_hybrid import M1HybridConfig
        >>> cfg = M1HybridConfig(num_hidden_layers=4, attn_layers=[1], hidden_size=128,
        ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, vocab_size=100)
        >>> cfg.layers_block_type
        ['mamba', 'attention', 'mamba', 'mamba']
        >>> cfg.d_inner, cfg.d_xb, cfg.dt_rank
        (128, 64, 8)
    """

    model_type = "m1_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 3072,
        intermediate_size: int = 8192,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 24,
        num_key_value_heads: int = 8,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        rope_scaling: dict | None = None,
        tie_word_embeddings: bool = True,
        attn_layers: list[int] | None = None,
        d_inner: int | None = None,
        d_xb: int | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int | str = "auto",
        conv_bias: bool = True,
        attention_bias: bool = False,
        mamba_in_proj_bias: bool = False,
        mlp_bias: bool = False,
        dt_bias_twice: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        ssm_cache_dtype: str = "float32",
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        layers_block_type: list[str] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attn_layers = sorted(int(i) for i in (attn_layers or []))
        self.d_inner = d_inner if d_inner is not None else hidden_size
        self.d_xb = d_xb if d_xb is not None else self.num_key_value_heads * self.head_dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = math.ceil(hidden_size / 16) if dt_rank == "auto" else int(dt_rank)
        self.conv_bias = conv_bias
        self.attention_bias = attention_bias
        self.mamba_in_proj_bias = mamba_in_proj_bias
        self.mlp_bias = mlp_bias
        self.dt_bias_twice = dt_bias_twice
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.ssm_cache_dtype = ssm_cache_dtype
        self.use_cache = use_cache
        self._validate()
        # Per-layer block types: what vLLM's hybrid machinery reads (`layers_block_type`).
        derived = [ATTENTION if i in self.attn_layers else MAMBA for i in range(num_hidden_layers)]
        if layers_block_type is not None and list(layers_block_type) != derived:
            raise ValueError(
                f"layers_block_type {list(layers_block_type)} disagrees with attn_layers {self.attn_layers}: "
                "edit attn_layers (the source of truth) and drop layers_block_type from config.json"
            )
        self.layers_block_type = derived
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        n = self.num_hidden_layers
        bad = [i for i in self.attn_layers if not 0 <= i < n]
        if bad:
            raise ValueError(
                f"attention layer indices {bad} are out of range for a model with {n} layers (valid: 0..{n - 1}); "
                "fix attn_layers / --attn-layers"
            )
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ValueError(f"attn_layers has duplicates: {self.attn_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention"
            )
        for name in ("d_inner", "d_xb"):
            if getattr(self, name) % self.d_state:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be a multiple of d_state ({self.d_state}): the M1 layer cuts "
                    "x/B/C into d_state-sized groups; choose d_state dividing both"
                )
        if (self.d_inner // self.d_state) % (self.d_xb // self.d_state):
            raise ValueError(
                f"d_inner/d_state ({self.d_inner // self.d_state}) must be a multiple of d_xb/d_state "
                f"({self.d_xb // self.d_state}): x and B groups are repeated to match C's groups"
            )
        if self.ssm_cache_dtype not in ("float32", "model"):
            raise ValueError(f"ssm_cache_dtype must be 'float32' or 'model', got {self.ssm_cache_dtype!r}")

    # Sizes derived for the layer, the caches and vLLM.
    @property
    def num_c_groups(self) -> int:
        """Groups of C (= d_inner / d_state; 192 in M1-3B)."""
        return self.d_inner // self.d_state

    @property
    def num_xb_groups(self) -> int:
        """Groups of x and B before the repeat (= d_xb / d_state; 64 in M1-3B)."""
        return self.d_xb // self.d_state

    @property
    def repeat_group(self) -> int:
        """How many times each x/B group is repeated (3 in M1-3B)."""
        return self.num_c_groups // self.num_xb_groups

    @property
    def mamba_layers(self) -> list[int]:
        """Indices of the Mamba layers."""
        return [i for i, t in enumerate(self.layers_block_type) if t == MAMBA]

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        """Per-sequence conv state of one Mamba layer: (d_inner, d_conv - 1)."""
        return (self.d_inner, self.d_conv - 1)

    @property
    def ssm_state_shape(self) -> tuple[int, int]:
        """Per-sequence SSM state of one Mamba layer: (d_inner, d_state)."""
        return (self.d_inner, self.d_state)
