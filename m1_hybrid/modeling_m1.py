"""The M1 hybrid causal LM for Hugging Face transformers (training, packed sequences, generation)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import M1Attention
from .cache import M1HybridCache
from .configuration_m1 import ATTENTION
from .configuration_m1 import M1HybridConfig
from .mamba_layer import M1MambaMixer
from .mamba_layer import init_dt_bias
from .packing import is_packed
from .packing import packed_layout
from .packing import positions_from_mask
from .rotary import RotaryEmbedding

try:
    from transformers import initialization as init
except ImportError:  # transformers < 5
    init = nn.init


class M1RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Llama's (``weight * x / rms(x)``)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class M1MLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))`` (the teacher's, reused as is)."""

    def __init__(self, config: M1HybridConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class M1DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; the mixer is ``mamba`` or ``mha``."""

    def __init__(self, config: M1HybridConfig, layer_idx: int):
        super().__init__()
        self.is_attention = config.layers_block_type[layer_idx] == ATTENTION
        if self.is_attention:
            self.mha = M1Attention(config, layer_idx)
        else:
            self.mamba = M1MambaMixer(config, layer_idx)
        self.mlp = M1MLP(config)
        self.input_layernorm = M1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = M1RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, layout, pad_mask, key_mask, state):
        residual = hidden
        hidden = self.input_layernorm(hidden)
        if self.is_attention:
            hidden = self.mha(hidden, cos, sin, layout=layout, key_mask=key_mask, kv_cache=state)
        else:
            b, L, d = hidden.shape
            if layout is not None:  # packed rows are flattened into one row of documents
                hidden = self.mamba(hidden.reshape(1, b * L, d), cu_seqlens=layout.cu_seqlens).view(b, L, d)
            else:
                hidden = self.mamba(hidden, pad_mask=pad_mask, state=state)
        hidden = residual + hidden
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class M1HybridPreTrainedModel(PreTrainedModel):
    """Weights init and loading glue shared by the M1 models."""

    config_class = M1HybridConfig
    config: M1HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["M1DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own cache (constant-size SSM states + KV)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, M1RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight.shape[2]
                init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        if isinstance(module, M1MambaMixer):
            # S4D-real A = -(1..N) per channel, D = 1, Mamba's dt init (reference section 2).
            cfg = self.config
            a = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).expand(cfg.d_inner, -1)
            init.copy_(module.A_log, torch.log(a).to(module.A_log.device))
            init.ones_(module.D)
            init.uniform_(module.dt_proj.weight, -(cfg.dt_rank**-0.5), cfg.dt_rank**-0.5)
            bias = init_dt_bias(cfg.d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
            init.copy_(module.dt_proj.bias, bias.to(module.dt_proj.bias.device))


class M1HybridModel(M1HybridPreTrainedModel):
    """Embeddings, the hybrid decoder stack and the final norm."""

    def __init__(self, config: M1HybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([M1DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = M1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, L, _ = hidden.shape
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        packed = is_packed(position_ids, attention_mask)
        if packed and (past_key_values is not None or use_cache):
            if past_key_values is not None:
                raise ValueError(
                    "packed sequences (position_ids restarting at 0 or segment-id attention masks) cannot be "
                    "combined with a generation cache: generate with padded rows instead"
                )
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = M1HybridCache(self.config, b, hidden.dtype, hidden.device)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        layout = packed_layout(position_ids, attention_mask, (b, L)) if packed else None
        key_mask = pad_mask = None
        if not packed and attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
            pad_mask = key_mask[:, -L:]
        if position_ids is None:
            if attention_mask is not None and not packed:
                position_ids = positions_from_mask(attention_mask, past, L)
            else:
                position_ids = torch.arange(past, past + L, device=hidden.device).expand(b, L)
        cos, sin = self.rotary_emb(position_ids, hidden.dtype)
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            state = past_key_values.layers[i] if past_key_values is not None else None
            hidden = layer(hidden, cos, sin, layout, pad_mask, key_mask, state)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        if past_key_values is not None:
            past_key_values.seen_tokens += L
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class M1HybridForCausalLM(M1HybridPreTrainedModel, GenerationMixin):
    """M1 hybrid causal LM.

    Example::

        >>> import torch
        >>> from m1_hybrid import M1HybridConfig, M1HybridForCausalLM
        >>> cfg = M1HybridConfig(num_hidden_layers=2, attn_layers=[1], hidden_size=64, num_attention_heads=2,
        ...     num_key_value_heads=1, intermediate_size=128, vocab_size=50)
        >>> model = M1HybridForCausalLM(cfg).eval()
        >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
        >>> out.shape
        torch.Size([1, 7])
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: M1HybridConfig):
        super().__init__(config)
        self.model = M1HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch=None,
        **kwargs,
    ):
        """Logits (and the next-token loss when ``labels`` are given, never across packed documents)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.next_token_loss(logits, labels, position_ids, attention_mask, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    @staticmethod
    def next_token_loss(logits, labels, position_ids=None, attention_mask=None, num_items_in_batch=None):
        """Cross-entropy of token t+1 from position t, skipping targets that start a packed document
        (the last token of one document must not be trained to predict the next document)."""
        targets = labels[:, 1:].clone()
        if is_packed(position_ids, attention_mask):
            starts = torch.zeros_like(labels, dtype=torch.bool)
            if position_ids is not None:
                starts |= position_ids == 0
            if attention_mask is not None:
                starts[:, 1:] |= attention_mask[:, 1:] != attention_mask[:, :-1]
            targets[starts[:, 1:]] = -100
        logits = logits[:, :-1].float()
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        if num_items_in_batch is None:
            num_items_in_batch = (targets != -100).sum().clamp_min(1)
        elif torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        """Feed only the tokens the cache has not seen; positions follow the left-padded mask."""
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs = {"past_key_values": past_key_values, "use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
            length = inputs_embeds.shape[1]
        else:
            inputs["input_ids"] = input_ids[:, past:]
            length = input_ids.shape[1] - past
        if attention_mask is not None:
            inputs["position_ids"] = positions_from_mask(attention_mask, past, length)
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
