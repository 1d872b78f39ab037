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


def save_atomically(model: M1HybridForCausalLM, out_dir, extra_files_from=None, write_extra=None) -> Path:
    """``save_pretrained`` into a temporary sibling folder, then swap it into ``out_dir``.

    ``write_extra(folder)`` may add files (a training state, say) to the folder before the swap, so that
    they and the weights are replaced together. A crash mid-write leaves any previous checkpoint at
    ``out_dir`` untouched.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if extra_files_from is not None:
            copy_tokenizer_files(Path(extra_files_from), tmp)
        if write_extra is not None:
            write_extra(tmp)
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


M1_AUTO_MAP = {
    "AutoConfig": "configuration_m1.M1HybridConfig",
    "AutoModelForCausalLM": "modeling_m1.M1HybridForCausalLM",
}


def model_code_files() -> list[Path]:
    """The source files a checkpoint needs for ``trust_remote_code`` loads: ``modeling_m1.py`` and its imports."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from . import modeling_m1

    return sorted({Path(modeling_m1.__file__), *map(Path, get_relative_import_files(modeling_m1.__file__))})


def repair_wrapped_save(folder, wrapper_cls: type) -> list[str]:
    """Put M1's code and ``auto_map`` back into a checkpoint saved from a wrapper-swapped model.

    ``save_pretrained`` copies the source of the saving object's class. FSDP2's ``fully_shard`` swaps a
    model's class for ``FSDP<Name>``, defined in torch, so a checkpoint saved under FSDP gets torch's FSDP
    files and an ``auto_map`` naming the wrapper, and ``trust_remote_code`` loads fail. This removes the
    wrapper's files, copies M1's, and rewrites ``auto_map``. Returns the removed file names.

    Example::

        >>> repair_wrapped_save(ckpt_dir, type(fsdp_model))  # doctest: +SKIP
        ['_fsdp_api.py', ...]
    """
    import json
    import sys

    from transformers.dynamic_module_utils import get_relative_import_files

    folder = Path(folder)
    ours = {f.name for f in model_code_files()}
    wrapper_file = getattr(sys.modules.get(wrapper_cls.__module__), "__file__", None)
    wrapper_files = {wrapper_file, *get_relative_import_files(wrapper_file)} if wrapper_file else set()
    removed = []
    for name in sorted({Path(f).name for f in wrapper_files} - ours):
        if (folder / name).exists():
            (folder / name).unlink()
            removed.append(name)
    for f in model_code_files():
        shutil.copy2(f, folder / f.name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = dict(M1_AUTO_MAP)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return removed
