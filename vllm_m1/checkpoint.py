"""Check an M1 checkpoint folder's tensor names against its config before loading.

vLLM's own check only runs after every tensor was read and names vLLM's internal parameters; this
one reads the safetensors headers (no tensor data) and names the M1 keys that are missing or that
belong to the other layer type, so a wrong ``attn_layers`` or a truncated checkpoint fails at once.
"""

from __future__ import annotations

import glob
import os

from m1_hybrid.import_m1 import RELEASED_MAMBA_KEYS


def expected_keys(config) -> set[str]:
    """Checkpoint tensor names an ``M1HybridForCausalLM`` with ``config`` must have."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        keys.add("lm_head.weight")
    for i, kind in enumerate(config.layers_block_type):
        p = f"model.layers.{i}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        keys |= {f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        if getattr(config, "mlp_bias", False):
            keys |= {f"{p}.mlp.{n}_proj.bias" for n in ("gate", "up", "down")}
        if kind == "mamba":
            names = list(RELEASED_MAMBA_KEYS)
            if getattr(config, "conv_bias", True):
                names.append("conv1d.bias")
            if getattr(config, "mamba_in_proj_bias", False):
                names.append("in_proj.bias")
            keys |= {f"{p}.mamba.{n}" for n in names}
        else:
            keys |= {f"{p}.mha.in_proj.weight", f"{p}.mha.out_proj.weight"}
            if getattr(config, "attention_bias", False):
                keys.add(f"{p}.mha.in_proj.bias")
    return keys


def safetensors_keys(folder: str) -> set[str] | None:
    """Tensor names of the ``*.safetensors`` files in ``folder`` (headers only), None if there are none."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(f, framework="pt") as fh:
            names.update(fh.keys())
    return names


def _short(keys, n: int = 12) -> str:
    keys = sorted(keys, key=lambda k: [int(t) if t.isdigit() else t for t in k.replace(".", " ").split()])
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def compare_keys(config, found: set[str], where: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming missing M1 keys and keys of the wrong layer type."""
    want = expected_keys(config)
    found = {k for k in found if "rotary_emb.inv_freq" not in k}
    if config.tie_word_embeddings:
        found.discard("lm_head.weight")
    missing, extra = want - found, found - want
    if not missing and not extra:
        return
    lines = [f"{where} does not match its M1 config (layers_block_type={list(config.layers_block_type)}):"]
    mismatched = sorted(
        {
            int(k.split(".")[2])
            for k in extra
            if k.startswith("model.layers.") and (".mamba." in k or ".mha." in k) and k.split(".")[2].isdigit()
        }
    )
    if mismatched:
        desc = ", ".join(
            f"layer {i} is {config.layers_block_type[i]!r}" for i in mismatched if i < len(config.layers_block_type)
        )
        lines.append(f"  layer types do not match the weights ({desc} in the config, the weights say otherwise)")
    if missing:
        lines.append(f"  missing M1 keys: {_short(missing)}")
    if extra:
        lines.append(f"  unexpected keys: {_short(extra)}")
    raise ValueError("\n".join(lines))


def check_checkpoint_dir(vllm_config, config) -> None:
    """Check a local safetensors checkpoint (formats auto/safetensors) before vLLM reads it."""
    fmt = str(getattr(vllm_config.load_config, "load_format", "auto")).lower().rsplit(".", 1)[-1]
    if fmt not in ("auto", "safetensors"):
        return
    folder = vllm_config.model_config.model
    if not os.path.isdir(folder):
        return
    found = safetensors_keys(folder)
    if found is not None:
        compare_keys(config, found, where=f"M1 checkpoint {folder}")
