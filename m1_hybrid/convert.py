"""Llama/Qwen2 teacher -> M1 hybrid (Algorithm 1 of the M1 paper, as the released code does it).

Mamba layers take the teacher's attention weights: ``C <- q_proj``, ``B <- k_proj``,
``x <- v_proj``, ``out_proj <- o_proj`` (rows of the fused ``in_proj`` are ``[z, x, B, C, dt]``);
``z``, ``dt_proj``, ``conv1d`` start fresh; ``A_log = log(1..d_state)``, ``D = 1``, dt bias by
Mamba's log-uniform recipe. Attention layers keep ``[q, k, v]`` fused and ``o_proj``. MLPs, norms,
embeddings and lm_head are reused; tokenizer and chat template are copied.
"""

from pathlib import Path

import torch

from .checkpoint import save_atomically
from .configuration_m1 import ATTENTION
from .configuration_m1 import MAMBA
from .configuration_m1 import M1HybridConfig
from .modeling_m1 import M1HybridForCausalLM

SUPPORTED_TEACHERS = ("llama", "qwen2", "mistral")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def default_attn_layers(num_layers: int) -> list[int]:
    """Attention layers spread like M1's ``[3, 8, 13, 18, 23, 27]`` for 28 layers.

    Rule: M1's pattern extended to any depth: every 5th layer from layer 3, plus the last layer;
    a layer closer than 3 to the last is dropped. About 6 of every 28 layers (21%).

    Example::

        >>> default_attn_layers(28)
        [3, 8, 13, 18, 23, 27]
        >>> default_attn_layers(30)
        [3, 8, 13, 18, 23, 29]
    """
    last = num_layers - 1
    return [i for i in range(3, last, 5) if last - i >= 3] + [last]


def parse_layers(text: str | None) -> list[int] | None:
    """``"3,8,13"`` -> ``[3, 8, 13]``; ``"none"`` -> ``[]`` (all Mamba); ``None``/``""`` -> default."""
    if text is None or text.strip() == "":
        return None
    if text.strip().lower() == "none":
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise ValueError(
            f"--attn-layers must be comma-separated integers like 3,8,13 (or 'none'), got {text!r}"
        ) from err


def _rope(teacher_cfg) -> tuple[float, dict | None]:
    params = getattr(teacher_cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(teacher_cfg, "rope_theta", 10000.0))
    scaling = getattr(teacher_cfg, "rope_scaling", None)
    if params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return theta, scaling


def student_config(teacher_cfg, attn_layers=None, d_state: int = 16, dt_bias_twice: bool = False) -> M1HybridConfig:
    """The M1 config matching a teacher config (layer count, widths, heads, RoPE, vocab)."""
    kind = getattr(teacher_cfg, "model_type", None)
    if kind not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"unsupported teacher architecture {kind!r}: m1 convert takes Llama/Qwen2/Mistral-style GQA decoders "
            f"(model_type one of {', '.join(SUPPORTED_TEACHERS)}); convert other models to that layout first"
        )
    if getattr(teacher_cfg, "use_sliding_window", False) or getattr(teacher_cfg, "sliding_window", None):
        raise ValueError("teachers with sliding-window attention are not supported: the student's attention is global")
    n = teacher_cfg.num_hidden_layers
    heads, kv = teacher_cfg.num_attention_heads, teacher_cfg.num_key_value_heads or teacher_cfg.num_attention_heads
    head_dim = getattr(teacher_cfg, "head_dim", None) or teacher_cfg.hidden_size // heads
    theta, scaling = _rope(teacher_cfg)
    attention_bias = bool(getattr(teacher_cfg, "attention_bias", kind == "qwen2"))
    return M1HybridConfig(
        vocab_size=teacher_cfg.vocab_size,
        hidden_size=teacher_cfg.hidden_size,
        intermediate_size=teacher_cfg.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        hidden_act=teacher_cfg.hidden_act,
        max_position_embeddings=teacher_cfg.max_position_embeddings,
        rms_norm_eps=teacher_cfg.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(teacher_cfg, "tie_word_embeddings", False)),
        attn_layers=default_attn_layers(n) if attn_layers is None else attn_layers,
        d_inner=heads * head_dim,
        d_xb=kv * head_dim,
        d_state=d_state,
        dt_bias_twice=dt_bias_twice,
        attention_bias=attention_bias,
        mamba_in_proj_bias=attention_bias,
        mlp_bias=bool(getattr(teacher_cfg, "mlp_bias", False)),
        pad_token_id=teacher_cfg.pad_token_id,
        bos_token_id=teacher_cfg.bos_token_id,
        eos_token_id=teacher_cfg.eos_token_id,
    )


def student_state_dict(teacher_sd: dict, student: M1HybridForCausalLM) -> dict:
    """Map teacher tensors onto the student's names (Algorithm 1); fresh tensors stay the student's."""
    cfg = student.config
    out = {k: v.clone() for k, v in student.state_dict().items()}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if name in teacher_sd:
            out[name] = teacher_sd[name]
    for i, kind in enumerate(cfg.layers_block_type):
        _map_layer(teacher_sd, cfg, i, kind, out)
    return out


def _map_layer(teacher_sd: dict, cfg, i: int, kind: str, out: dict) -> None:
    """Write layer ``i``'s teacher tensors into ``out`` under the student's names (``kind``: its block type)."""
    d_in, d_xb = cfg.d_inner, cfg.d_xb
    t = s = f"model.layers.{i}."
    for part in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        for p in ("weight", "bias"):
            if t + f"{part}.{p}" in teacher_sd:
                out[s + f"{part}.{p}"] = teacher_sd[t + f"{part}.{p}"]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[s + f"{norm}.weight"] = teacher_sd[t + f"{norm}.weight"]
    q, k, v, o = (teacher_sd[t + f"self_attn.{p}_proj.weight"] for p in "qkvo")
    biases = [teacher_sd.get(t + f"self_attn.{p}_proj.bias") for p in "qkv"]
    if kind == ATTENTION:
        out[s + "mha.in_proj.weight"] = torch.cat([q, k, v], dim=0)
        if cfg.attention_bias:
            out[s + "mha.in_proj.bias"] = torch.cat(biases, dim=0)
        out[s + "mha.out_proj.weight"] = o
        return
    w = out[s + "mamba.in_proj.weight"]
    # Rows [z | x | B | C | dt]: x <- v, B <- k, C <- q (z and dt keep their fresh init).
    w[d_in : d_in + d_xb] = v
    w[d_in + d_xb : d_in + 2 * d_xb] = k
    w[d_in + 2 * d_xb : 2 * d_in + 2 * d_xb] = q
    if cfg.mamba_in_proj_bias:
        bias = torch.zeros_like(out[s + "mamba.in_proj.bias"])
        bias[d_in : d_in + d_xb], bias[d_in + d_xb : d_in + 2 * d_xb] = biases[2], biases[1]
        bias[d_in + 2 * d_xb : 2 * d_in + 2 * d_xb] = biases[0]
        out[s + "mamba.in_proj.bias"] = bias
    out[s + "mamba.out_proj.weight"] = o


def restore_attention(student: M1HybridForCausalLM, teacher, layers) -> None:
    """Give the student's Mamba layers ``layers`` their teacher attention back, in place (Algorithm 1's copy).

    For choosing the attention layers after alignment: a student converted with no attention layers
    is aligned and scored (:func:`m1_hybrid.alignment.substitution_kl`), then the chosen layers are
    rebuilt as attention layers holding the teacher's q/k/v/o, MLP and norms; every other layer,
    the aligned mixers included, is untouched. ``student.config.attn_layers`` (and the derived
    ``layers_block_type``) follow. New layers take the device, dtype and gradient-checkpointing
    setting of the layers they replace.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> teacher = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ...     intermediate_size=128, num_hidden_layers=3, vocab_size=100))
        >>> student = convert_model(teacher, attn_layers=[])
        >>> restore_attention(student, teacher, [2])
        >>> student.config.layers_block_type
        ['mamba', 'mamba', 'attention']
    """
    from .modeling_m1 import M1DecoderLayer

    cfg = student.config
    layers = sorted({int(i) for i in layers} - set(cfg.attn_layers))
    bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {cfg.num_hidden_layers}-layer student")
    cfg.attn_layers = sorted(set(cfg.attn_layers) | set(layers))
    cfg.layers_block_type = [ATTENTION if i in cfg.attn_layers else MAMBA for i in range(cfg.num_hidden_layers)]
    teacher_sd = teacher.state_dict()
    for i in layers:
        old = student.model.layers[i]
        ref = old.mlp.gate_proj.weight  # not A_log, which may stay fp32 in a bf16 model
        new = M1DecoderLayer(cfg, i)
        prefix = f"model.layers.{i}."
        tensors = {prefix + k: v for k, v in new.state_dict().items()}
        _map_layer(teacher_sd, cfg, i, ATTENTION, tensors)
        new.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items()})
        new.to(device=ref.device, dtype=ref.dtype).train(old.training)
        if hasattr(old, "gradient_checkpointing"):
            new.gradient_checkpointing = old.gradient_checkpointing
        student.model.layers[i] = new


def convert_model(teacher, attn_layers=None, d_state: int = 16, seed: int = 0) -> M1HybridForCausalLM:
    """Build an M1 hybrid from a loaded teacher model (float32 student, seeded fresh parameters).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> teacher = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ...     intermediate_size=128, num_hidden_layers=3, vocab_size=100))
        >>> convert_model(teacher, attn_layers=[1]).config.layers_block_type
        ['mamba', 'attention', 'mamba']
    """
    cfg = student_config(teacher.config, attn_layers, d_state)
    torch.manual_seed(seed)
    student = M1HybridForCausalLM(cfg).float()
    teacher_sd = {k: v.detach().float() for k, v in teacher.state_dict().items()}
    student.load_state_dict(student_state_dict(teacher_sd, student), strict=True)
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student.eval()


def convert_checkpoint(teacher_dir, out_dir, attn_layers=None, dtype: str = "bf16", d_state: int = 16, seed: int = 0):
    """``m1 convert``: load a teacher folder, convert, save the student (+ tokenizer) atomically."""
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "config.json").exists():
        raise FileNotFoundError(f"{teacher_dir} has no config.json: pass a Hugging Face model folder as --teacher")
    student_config(AutoConfig.from_pretrained(teacher_dir), attn_layers, d_state)  # fail fast on bad input
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = convert_model(teacher, attn_layers, d_state, seed).to(DTYPES[dtype])
    return save_atomically(student, out_dir, extra_files_from=teacher_dir)
