"""Import a released M1 checkpoint (``mamba_config.json`` + Llama ``config.json`` + safetensors).

The released layout (jxiw/M1, togethercomputer/M1-3B) stores a patched ``LlamaForCausalLM`` whose
layers hold ``mamba.*`` or ``mha.*`` mixers; its ``mamba_config.json`` is the ``MambaConfig``
dataclass. Our parameter names are the released ones, so importing is: build the equivalent
``M1HybridConfig`` (with the "dt bias applied twice" quirk on and plain RoPE, as the released code
runs), check every key, and save a self-contained checkpoint.
"""

import json
from pathlib import Path

import torch

from .checkpoint import save_atomically
from .configuration_m1 import M1HybridConfig
from .modeling_m1 import M1HybridForCausalLM

RELEASED_MAMBA_KEYS = (
    "in_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "conv1d.weight",
    "A_log",
    "D",
    "out_proj.weight",
)


def config_from_released(llama_cfg: dict, mamba_cfg: dict) -> M1HybridConfig:
    """Our config for a released (Llama config.json, mamba_config.json) pair."""
    ssm = mamba_cfg.get("ssm_cfg") or {}
    d_model = mamba_cfg.get("d_model", llama_cfg["hidden_size"])
    heads = llama_cfg["num_attention_heads"]
    head_dim = llama_cfg.get("head_dim") or d_model // heads
    n_layer = mamba_cfg.get("n_layer", llama_cfg["num_hidden_layers"])
    rope = llama_cfg.get("rope_parameters") or {}
    return M1HybridConfig(
        vocab_size=mamba_cfg.get("vocab_size") or llama_cfg["vocab_size"],
        hidden_size=d_model,
        intermediate_size=mamba_cfg.get("intermediate_size", llama_cfg["intermediate_size"]),
        num_hidden_layers=n_layer,
        num_attention_heads=heads,
        num_key_value_heads=llama_cfg.get("num_key_value_heads", heads),
        head_dim=head_dim,
        hidden_act=mamba_cfg.get("hidden_act", llama_cfg.get("hidden_act", "silu")),
        max_position_embeddings=llama_cfg.get("max_position_embeddings", 131072),
        rms_norm_eps=mamba_cfg.get("rms_norm_eps", llama_cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=rope.get("rope_theta", llama_cfg.get("rope_theta", 10000.0)),
        rope_scaling=None,  # the released attention layers use plain RoPE (the teacher's llama3 scaling is dropped)
        tie_word_embeddings=llama_cfg.get("tie_word_embeddings", False),
        attn_layers=mamba_cfg.get("attn_layers", []),
        d_inner=mamba_cfg.get("d_inner") or ssm.get("expand", 1) * d_model,
        d_xb=mamba_cfg.get("d_xb", d_model),
        d_state=ssm.get("d_state", 16),
        d_conv=ssm.get("d_conv", 4),
        dt_rank=ssm.get("dt_rank", "auto"),
        conv_bias=ssm.get("conv_bias", True),
        dt_bias_twice=True,
        pad_token_id=llama_cfg.get("pad_token_id"),
        bos_token_id=llama_cfg.get("bos_token_id"),
        eos_token_id=llama_cfg.get("eos_token_id"),
    )


def read_safetensors_dir(src: Path) -> dict:
    """All tensors of every ``*.safetensors`` file in ``src``."""
    from safetensors.torch import load_file

    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {src}: the released checkpoint stores its weights there")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def check_keys(expected: set, found: set, tied: bool) -> None:
    """Refuse a checkpoint whose keys do not match the config, naming what is missing or extra."""
    if tied:
        expected = expected - {"lm_head.weight"}
        found = found - {"lm_head.weight"}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        shown = lambda keys: ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")  # noqa: E731
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {shown(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {shown(unexpected)}")
        raise ValueError(
            "checkpoint does not match mamba_config.json: "
            + "; ".join(lines)
            + ". Check that attn_layers/n_layer in mamba_config.json describe these weights, and that all shards are"
            " in the folder."
        )


def import_released(src, out_dir=None, dtype: torch.dtype | None = None):
    """Load a released M1 checkpoint folder as our model; save it to ``out_dir`` when given.

    Returns the model (float32 unless ``dtype``) and, when saved, the output path.
    """
    src = Path(src)
    for name in ("config.json", "mamba_config.json"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src} has no {name}: m1 import expects the released M1 layout")
    llama_cfg = json.loads((src / "config.json").read_text())
    mamba_cfg = json.loads((src / "mamba_config.json").read_text())
    config = config_from_released(llama_cfg, mamba_cfg)
    tensors = read_safetensors_dir(src)
    model = M1HybridForCausalLM(config).to(dtype or torch.float32)  # load at the target precision
    check_keys(set(model.state_dict()), set(tensors), config.tie_word_embeddings)
    state = model.state_dict()
    for key, value in tensors.items():
        if value.shape != state[key].shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != expected {tuple(state[key].shape)}")
    model.load_state_dict(tensors, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.eval()
    if out_dir is None:
        return model, None
    return model, save_atomically(model, out_dir, extra_files_from=src)
