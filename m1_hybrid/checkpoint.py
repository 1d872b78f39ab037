"""Writing checkpoints atomically, with the model code inside so ``trust_remote_code`` loads work."""

import shutil
import tempfile
from pathlib import Path

from .configuration_m1 import M1HybridConfig
from .modeling_m1 import M1HybridForCausalLM

# Saved configs carry auto_map and the code files travel with the weights: a process that never
# imported m1_hybrid can load the checkpoint with trust_remote_code=True.
M1HybridConfig.register_for_auto_class()
M1HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config files that exist in ``src``."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_atomically(model: M1HybridForCausalLM, out_dir, extra_files_from=None) -> Path:
    """``save_pretrained`` into a temporary sibling folder, then swap it into ``out_dir``.

    A crash mid-write leaves any previous checkpoint at ``out_dir`` untouched.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if extra_files_from is not None:
            copy_tokenizer_files(Path(extra_files_from), tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tmp.name[-8:]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
