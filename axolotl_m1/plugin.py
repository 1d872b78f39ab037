"""``M1Plugin``: train M1 hybrids with Axolotl (stage 1 distillation, stage 2 SFT, sample packing).

What each hook does (Axolotl's order: ``register`` -> validation -> ``normalize_config`` -> model
load -> trainer):

- ``register(cfg)`` (raw YAML dict, every rank, before any ``AutoConfig`` call):
  registers ``m1_hybrid`` with ``AutoConfig``/``AutoModelForCausalLM``; rewrites
  ``model_type: m1_hybrid`` (how users write it) to ``AutoModelForCausalLM`` (Axolotl reads
  ``model_type`` as a transformers class name, and ``getattr(transformers, "m1_hybrid")`` fails);
  appends ``m1_hybrid`` to Axolotl's multipack model list (packed batches keep per-document
  ``position_ids``, and the V2 collator's segment-id mask when the mask is kept); and, when
  ``base_model`` is a teacher and ``m1_attn_layers`` is set, converts it into an M1 student once
  (Algorithm 1, :func:`m1_hybrid.convert.convert_checkpoint`) and points ``base_model`` at it.
- ``post_model_load``: with ``m1_distill``, gives the model a distillation forward path
  (:func:`axolotl_m1.trainer.install_distill_forward`) so the fused KL runs inside the model's own
  forward (where FSDP has the root parameters, lm_head included, unsharded). Under FSDP, casts the
  parameters to one dtype (:func:`unify_param_dtype`).
- ``get_trainer_cls``: :class:`axolotl_m1.trainer.M1DistillTrainer` with ``m1_distill``, else
  :class:`axolotl_m1.trainer.M1Trainer` (Axolotl's trainer with a resumable packed data order).
- ``post_trainer_create``: with ``m1_distill``, loads the teacher (frozen, eval, its own dtype, on
  the trainer's device) after the tokenizer/vocabulary check.
- ``post_train``: under FSDP, puts M1's code files and ``auto_map`` back into the saved model (FSDP2
  swaps the model's class for a torch-defined wrapper, whose source ``save_pretrained`` copies instead).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from axolotl.integrations.base import BasePlugin

from .loss import DistillSettings

LOG = logging.getLogger(__name__)
M1_MODEL_TYPE = "m1_hybrid"
# Spellings of "this is an M1 hybrid" accepted in the YAML's model_type.
M1_MODEL_TYPE_ALIASES = ("m1_hybrid", "M1HybridForCausalLM", "m1")
INIT_META = "m1_student_init.json"


def _get(cfg, key, default=None):
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def settings(cfg) -> DistillSettings:
    """The loss settings of a (validated or raw) config."""
    return DistillSettings(
        kl_weight=float(_get(cfg, "m1_kl_weight", 1.0)),
        ce_weight=float(_get(cfg, "m1_ce_weight", 0.0)),
        direction=str(_get(cfg, "m1_kl_direction", "reverse")),
        temperature=float(_get(cfg, "m1_kl_temperature", 1.0)),
        chunk_size=_get(cfg, "m1_kl_chunk_size", None),
    )


def teacher_dtype(cfg, student_dtype=None):
    """``m1_teacher_dtype`` as a torch dtype: default bf16 when training in bf16, else fp32."""
    import torch

    name = _get(cfg, "m1_teacher_dtype", None)
    if name is None:
        return torch.bfloat16 if _get(cfg, "bf16", False) is True else torch.float32
    if name == "auto":
        return student_dtype or torch.float32
    return {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }[name]


def alias_model_type(cfg) -> bool:
    """``model_type: m1_hybrid`` -> ``AutoModelForCausalLM`` (registered for ``m1_hybrid`` on import).

    Returns whether the YAML named the M1 type. Other values (e.g. ``AutoModelForCausalLM``) are
    left alone.
    """
    value = cfg.get("model_type") or cfg.get("type_of_model")
    if value in M1_MODEL_TYPE_ALIASES:
        for key in ("model_type", "type_of_model"):
            if cfg.get(key) is not None:
                cfg[key] = "AutoModelForCausalLM"
        return True
    return False


def enable_multipack() -> None:
    """Let Axolotl treat ``m1_hybrid`` as a packing-aware architecture (V2 collator, per-doc positions)."""
    from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES

    if M1_MODEL_TYPE not in SUPPORTED_MULTIPACK_MODEL_TYPES:
        SUPPORTED_MULTIPACK_MODEL_TYPES.append(M1_MODEL_TYPE)


def fsdp_configured(cfg) -> bool:
    """Whether the YAML asks for FSDP (``fsdp_config`` or the older ``fsdp`` list)."""
    return bool(_get(cfg, "fsdp_config") or _get(cfg, "fsdp"))


def unify_param_dtype(model) -> list[str]:
    """Cast parameters to the model's majority dtype; returns the names that changed.

    M1 keeps ``A_log`` in fp32 (as mamba does: ``A = -exp(A_log)`` is sensitive to rounding), so a model
    loaded in bf16 holds both dtypes. FSDP2 flattens the parameters of each wrapped layer into one group and
    refuses mixed dtypes ("FSDP expects uniform original parameter dtype"), so under FSDP ``A_log`` trains in
    the model's dtype like every other weight.

    Example::

        >>> import torch
        >>> m = torch.nn.Linear(2, 2).to(torch.bfloat16)
        >>> m.bias.data = m.bias.data.float()
        >>> unify_param_dtype(m), m.bias.dtype
        (['bias'], torch.bfloat16)
    """
    from collections import Counter

    target = Counter(p.dtype for p in model.parameters()).most_common(1)[0][0]
    changed = []
    for name, param in model.named_parameters():
        if param.dtype != target:
            param.data = param.data.to(target)
            changed.append(name)
    return changed


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_student(teacher: str, out_dir, attn_layers: list[int], d_state: int = 16, dtype: str = "fp32") -> Path:
    """Convert ``teacher`` into an M1 student at ``out_dir`` once (Algorithm 1); reuse it afterwards.

    Safe when several ranks call it at once (a file lock; the first converts, the others reuse).
    A folder converted with other attention layers or another teacher is refused, not overwritten.
    """
    from m1_hybrid.convert import convert_checkpoint

    out = Path(out_dir).resolve()
    want = {"teacher": str(teacher), "attn_layers": list(attn_layers), "d_state": d_state}
    with _file_lock(out.parent / f".{out.name}.lock"):
        if (out / "config.json").exists():
            meta_path = out / INIT_META
            have = json.loads(meta_path.read_text()) if meta_path.exists() else None
            if have is not None and (have["attn_layers"], have["d_state"]) != (want["attn_layers"], d_state):
                raise ValueError(
                    f"{out} holds a student converted with attention layers {have['attn_layers']} "
                    f"(d_state {have['d_state']}), but the config asks for {want['attn_layers']} (d_state {d_state}): "
                    "delete that folder or set m1_student_init_dir to a new one"
                )
            return out
        convert_checkpoint(teacher, out, attn_layers, dtype=dtype, d_state=d_state)
        (out / INIT_META).write_text(json.dumps(want, indent=1))
    return out


def _hf_model_type(path: str, trust_remote_code: bool) -> tuple[str | None, object]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config, "model_type", None), config


def prepare_student(cfg) -> None:
    """Resolve the student: an M1 checkpoint as is, or a teacher converted on the fly.

    Mutates the raw ``cfg``: ``base_model`` -> the converted folder; ``m1_teacher_model`` defaults
    to the original ``base_model`` (the teacher it was built from).
    """
    base = cfg.get("base_model")
    if not base:
        return
    layers = cfg.get("m1_attn_layers")
    kind, config = _hf_model_type(base, bool(cfg.get("trust_remote_code")))
    if kind == M1_MODEL_TYPE:
        if layers == "auto":
            raise ValueError(
                f"base_model {base} is already an M1 hybrid (attention layers {list(config.attn_layers)}): "
                "m1_attn_layers: auto only applies when base_model is a teacher to convert; drop it"
            )
        if layers is not None and sorted(layers) != list(config.attn_layers):
            raise ValueError(
                f"base_model {base} is already an M1 hybrid with attention layers {list(config.attn_layers)}, "
                f"but m1_attn_layers asks for {sorted(layers)}: drop m1_attn_layers (it only applies when "
                "base_model is a teacher to convert) or point base_model at the teacher"
            )
        return
    if layers is None:
        raise ValueError(
            f"base_model {base} is a {kind!r} model, not an M1 hybrid: set m1_attn_layers: [...] to build the "
            "student from it (Algorithm 1), or point base_model at an m1_hybrid checkpoint"
        )
    out_dir = cfg.get("m1_student_init_dir") or str(Path(cfg.get("output_dir") or "./model-out") / "m1_student_init")
    dtype = "bf16" if cfg.get("bf16") is True else "fp32"
    # auto: every layer converted; M1DistillTrainer gives the chosen ones their attention back after alignment
    attn = [] if layers == "auto" else sorted(layers)
    student = build_student(base, out_dir, attn, int(cfg.get("m1_d_state") or 16), dtype)
    if cfg.get("m1_distill") and not cfg.get("m1_teacher_model"):
        cfg["m1_teacher_model"] = base
    for key in ("base_model_config", "tokenizer_config"):
        if cfg.get(key) == base:
            cfg[key] = str(student)
    cfg["base_model"] = str(student)


class M1Plugin(BasePlugin):
    """Axolotl plugin for M1 hybrid Mamba models (``plugins: [axolotl_m1.M1Plugin]``).

    See ``axolotl_m1/README.md`` for the YAML keys and :mod:`axolotl_m1.plugin` for the hooks.
    """

    def get_input_args(self) -> str:
        """The pydantic model declaring every ``m1_*`` YAML key."""
        return "axolotl_m1.args.M1Args"

    def register(self, cfg: dict):
        """Register the architecture, fix ``model_type``, enable packing, build the student if asked."""
        import m1_hybrid  # noqa: F401  (AutoConfig / AutoModelForCausalLM registration)
        import m1_hybrid.checkpoint  # noqa: F401  (saved checkpoints carry auto_map + code)

        alias_model_type(cfg)
        enable_multipack()
        prepare_student(cfg)

    def post_model_load(self, cfg, model):
        """Check the model is an M1 hybrid; with ``m1_distill``, add the distillation forward path."""
        from m1_hybrid import M1HybridForCausalLM

        from .trainer import install_distill_forward

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not isinstance(inner, M1HybridForCausalLM):
            raise TypeError(
                f"axolotl_m1.M1Plugin trains M1 hybrids, but base_model {cfg.base_model} loaded as "
                f"{type(inner).__name__}: point base_model at an m1_hybrid checkpoint or set m1_attn_layers"
            )
        if cfg.m1_distill:
            install_distill_forward(inner)
        if fsdp_configured(cfg):
            changed = unify_param_dtype(inner)
            if changed:
                LOG.info(f"axolotl_m1: FSDP needs one parameter dtype per layer: cast {len(changed)} tensors "
                         f"({changed[0]}, ...) to {next(inner.parameters()).dtype}")  # fmt: skip

    def get_trainer_cls(self, cfg):
        """``M1DistillTrainer`` with ``m1_distill``, else ``M1Trainer`` (Axolotl's, plain CE, resumable order)."""
        from .trainer import M1DistillTrainer
        from .trainer import M1Trainer

        return M1DistillTrainer if cfg.m1_distill else M1Trainer

    def post_trainer_create(self, cfg, trainer):
        """Load the frozen teacher (after the vocabulary check) into the distillation trainer."""
        if cfg.m1_distill:
            trainer.setup_distillation(cfg)

    def post_train(self, cfg, model):
        """Under FSDP, give the saved model M1's code back (see :func:`m1_hybrid.checkpoint.repair_wrapped_save`)."""
        import torch.distributed as dist

        from m1_hybrid.checkpoint import repair_wrapped_save

        main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        out = Path(cfg.output_dir or ".")
        if fsdp_configured(cfg) and main and (out / "config.json").exists():
            removed = repair_wrapped_save(out, type(model))
            LOG.info(f"axolotl_m1: M1 code and auto_map restored in {out} (removed the FSDP wrapper's {removed})")
