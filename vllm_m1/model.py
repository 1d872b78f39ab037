"""``M1HybridForCausalLM`` for vLLM v1: the M1 hybrid decoder on vLLM's caches.

Layer ``i`` is ``config.layers_block_type[i]``: ``"mamba"`` (:class:`vllm_m1.mixer.M1MambaMixer`,
states in vLLM's Mamba state cache) or ``"attention"`` (fused ``mha.in_proj`` [q, k, v] loaded into
vLLM's ``QKVParallelLinear``, RoPE, paged attention). Both are pre-norm blocks with a gated MLP, as
in ``m1_hybrid.modeling_m1``.

``load_weights`` takes the training model's parameter names (``model.layers.{i}.mamba.A_log``,
``model.layers.{j}.mha.in_proj.weight``, ...), in any order, any number of times (VeRL pushes
updated weights into a running engine this way). Names that do not fit the config (a Mamba key at
an attention layer, a wrong shape) raise ``ValueError`` naming the key; at the first load of a
local safetensors checkpoint the key set is checked against the config (missing M1 keys are
listed) before any tensor is read.
"""

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear
from vllm.model_executor.layers.linear import QKVParallelLinear
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState
from vllm.model_executor.models.interfaces import IsHybrid
from vllm.sequence import IntermediateTensors

from .checkpoint import check_checkpoint_dir
from .mixer import M1MambaMixer
from .mixer import m1_state_dtypes
from .mixer import m1_state_shapes

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def m1_rope_parameters(config) -> dict:
    """vLLM ``rope_parameters`` equal to ``m1_hybrid.rotary``: plain RoPE (``rope_theta``) or the
    llama3 rule from ``rope_scaling``."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_type": "default", "rope_theta": float(theta)}
    if kind != "llama3":
        raise ValueError(f"M1 supports rope_scaling of type 'llama3' or none, got {kind!r}")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return {"rope_type": "llama3", "rope_theta": float(theta), **{k: scaling[k] for k in keys}}


class M1MLP(nn.Module):
    """Gated SiLU MLP; checkpoint keys ``mlp.{gate,up,down}_proj.*``."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"M1 in vLLM supports hidden_act 'silu', got {config.hidden_act!r}")
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size] * 2,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size,
            config.hidden_size,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)[0]))[0]


class M1Attention(nn.Module):
    """GQA attention on vLLM's paged KV cache; checkpoint keys ``mha.in_proj.*``, ``mha.out_proj.weight``."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.total_heads, self.total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        if self.total_heads % tp or (self.total_kv_heads % tp and tp % self.total_kv_heads):
            raise ValueError(
                f"attention heads {self.total_heads}/{self.total_kv_heads} cannot be split over "
                f"tensor_parallel_size={tp}"
            )
        self.num_heads = self.total_heads // tp
        self.num_kv_heads = max(1, self.total_kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.in_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_heads,
            self.total_kv_heads,
            bias=getattr(config, "attention_bias", False),
            quant_config=quant_config,
            prefix=f"{prefix}.in_proj",
        )
        self.out_proj = RowParallelLinear(
            self.total_heads * self.head_dim,
            config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.out_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters=m1_rope_parameters(config),
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def checkpoint_shapes(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """Full shapes of this layer's checkpoint tensors, by suffix after ``mha.``."""
        rows = (self.total_heads + 2 * self.total_kv_heads) * self.head_dim
        shapes = {"in_proj.weight": (rows, hidden), "out_proj.weight": (hidden, self.total_heads * self.head_dim)}
        if self.in_proj.bias is not None:
            shapes["in_proj.bias"] = (rows,)
        return shapes

    def load_checkpoint_weight(self, suffix: str, tensor: torch.Tensor, hidden: int) -> list[str]:
        """Load one checkpoint tensor (fused [q, k, v] rows are split into vLLM's q/k/v shards)."""
        expected = self.checkpoint_shapes(hidden).get(suffix)
        if expected is None:
            raise ValueError(f"unknown M1 attention parameter 'mha.{suffix}'")
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"mha.{suffix} has shape {tuple(tensor.shape)} but the config expects {expected} (heads "
                f"{self.total_heads}/{self.total_kv_heads}, head_dim {self.head_dim}, hidden {hidden})"
            )
        if suffix.startswith("in_proj."):
            q, k, v = torch.split(
                tensor, [self.total_heads * self.head_dim] + [self.total_kv_heads * self.head_dim] * 2, dim=0
            )
            param = getattr(self.in_proj, suffix.split(".")[1])
            for shard, part in zip("qkv", (q, k, v)):
                param.weight_loader(param, part, shard)
            return [suffix]
        param = self.out_proj.weight
        param.weight_loader(param, tensor)
        return [suffix]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.in_proj(hidden)[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.out_proj(self.attn(q, k, v))[0]


class M1DecoderLayer(nn.Module):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; the mixer is ``mamba`` or ``mha``."""

    def __init__(self, config, layer_idx: int, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.block_type = config.layers_block_type[layer_idx]
        quant = vllm_config.quant_config
        if self.block_type == "attention":
            self.mha = M1Attention(config, vllm_config.cache_config, quant, prefix=f"{prefix}.mha")
        elif self.block_type == "mamba":
            self.mamba = M1MambaMixer(
                config, vllm_config.model_config, vllm_config.cache_config, quant, prefix=f"{prefix}.mamba"
            )
        else:
            raise ValueError(f"layers_block_type[{layer_idx}] = {self.block_type!r}: expected 'mamba' or 'attention'")
        self.mlp = M1MLP(config, quant, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        if self.block_type == "attention":
            hidden = self.mha(positions, hidden)
        else:
            out = torch.empty_like(hidden)
            self.mamba(hidden, out)
            hidden = out
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


@support_torch_compile
class M1HybridModel(nn.Module):
    """Embeddings, the hybrid stack, the final norm (``model.*`` keys)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            M1DecoderLayer(config, i, vllm_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class M1HybridForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM model class of ``M1HybridForCausalLM`` checkpoints (``model_type`` ``m1_hybrid``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        _check_config(config)
        check_checkpoint_dir(vllm_config, config)
        self.model = M1HybridModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=_join(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ----- hybrid interface (class methods vLLM calls before building the model) -----
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        """(conv, ssm) state shapes per slot, per rank."""
        return m1_state_shapes(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        """(conv, ssm) state dtypes; honours ``mamba_cache_dtype`` / ``mamba_ssm_cache_dtype``."""
        return m1_state_dtypes(
            vllm_config.model_config.dtype, vllm_config.cache_config, vllm_config.model_config.hf_config
        )

    @classmethod
    def get_mamba_state_copy_func(cls):
        """Mamba-1 state copy specs (prefix caching in align mode)."""
        return MambaStateCopyFuncCalculator.mamba1_state_copy_func()

    # ----- weights -----
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load training-model names (any order, any subset, repeatable); returns vLLM names filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        hidden = self.config.hidden_size
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            m = _LAYER_KEY.match(name)
            if m is None:
                if name not in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                    raise ValueError(f"unexpected checkpoint key {name!r} for an M1 hybrid")
                param = params[name]
                if name == "model.norm.weight" and tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
                continue
            i, rest = int(m.group(1)), m.group(2)
            if i >= len(self.model.layers):
                raise ValueError(f"checkpoint key {name!r}: the config has {len(self.model.layers)} layers")
            layer = self.model.layers[i]
            kind, _, suffix = rest.partition(".")
            prefix = f"model.layers.{i}"
            if kind in ("mamba", "mha"):
                want = "mamba" if layer.block_type == "mamba" else "mha"
                if kind != want:
                    what = "a Mamba" if kind == "mamba" else "an attention"
                    raise ValueError(
                        f"checkpoint key {name!r} belongs to {what} layer, but config.layers_block_type[{i}] is "
                        f"{layer.block_type!r} (attn_layers={self.config.attn_layers}): the config's layer types "
                        "do not match the weights"
                    )
                if kind == "mamba":
                    names = layer.mamba.load_checkpoint_weight(suffix, tensor)
                else:
                    names = layer.mha.load_checkpoint_weight(suffix, tensor, hidden)
                loaded.update(f"{prefix}.{kind}.{n}" for n in names)
            elif kind == "mlp":
                proj, _, leaf = suffix.partition(".")
                if proj in ("gate_proj", "up_proj"):
                    param = getattr(layer.mlp.gate_up_proj, leaf)
                    param.weight_loader(param, tensor, 0 if proj == "gate_proj" else 1)
                    loaded.add(f"{prefix}.mlp.gate_up_proj.{leaf}")
                elif proj == "down_proj":
                    param = getattr(layer.mlp.down_proj, leaf)
                    param.weight_loader(param, tensor)
                    loaded.add(f"{prefix}.mlp.down_proj.{leaf}")
                else:
                    raise ValueError(f"unexpected checkpoint key {name!r}")
            elif kind in ("input_layernorm", "post_attention_layernorm") and suffix == "weight":
                param = getattr(layer, kind).weight
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(f"{prefix}.{kind}.weight")
            else:
                raise ValueError(f"unexpected checkpoint key {name!r} for an M1 hybrid layer")
        return loaded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_config(config) -> None:
    types = list(getattr(config, "layers_block_type", []) or [])
    if len(types) != config.num_hidden_layers:
        raise ValueError(
            f"config.layers_block_type has {len(types)} entries for {config.num_hidden_layers} layers: "
            "regenerate config.json with m1_hybrid (attn_layers is the source of truth)"
        )
    derived = ["attention" if i in set(config.attn_layers) else "mamba" for i in range(config.num_hidden_layers)]
    if types != derived:
        raise ValueError(f"config.layers_block_type {types} disagrees with attn_layers {config.attn_layers}")


__all__ = ["M1HybridForCausalLM", "M1HybridModel", "m1_rope_parameters"]
