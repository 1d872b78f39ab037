"""verl_m1: M1 hybrid models in VeRL's FSDP trainer (GRPO with vLLM rollouts).

Importing this module (VeRL does it for ``actor_rollout_ref.model.external_lib=verl_m1``, for the
``verl.plugins`` entry point, or for ``VERL_USE_EXTERNAL_MODULES=verl_m1``):

1. imports :mod:`m1_hybrid`, which registers ``model_type="m1_hybrid"`` with ``AutoConfig`` and
   ``AutoModelForCausalLM`` so VeRL's ``FSDPEngine`` can ``from_pretrained`` an M1 checkpoint
   (``trust_remote_code`` also works: checkpoints carry ``auto_map`` and code);
2. calls :func:`apply_patches`, which teaches VeRL's ``apply_monkey_patch`` two things about M1:

   - ``use_fused_kernels=True`` installs :func:`verl_m1.fused.m1_forward_for_ppo`, which computes token
     log-probs and entropy from hidden states through ``m1_kernels.fused_linear_logprob_entropy``
     (chunked; no ``(T, V)`` logits tensor) instead of VeRL's ``dense_common`` forward;
   - Ulysses sequence parallelism (``ulysses_sequence_parallel_size > 1``) is refused with a clear
     error: it slices one packed row across ranks, which would cut Mamba scans mid-document.

Remove-padding batches need no patch: VeRL sends one ``(1, total_nnz)`` row whose ``position_ids``
restart at 0 for every sample, and the M1 model derives document boundaries (``cu_seqlens``) from
them, so no SSM, conv or attention state crosses samples.

Example::

    >>> import verl_m1
    >>> verl_m1.apply_patches()  # idempotent; done at import already
    True
"""

from __future__ import annotations

import logging
import sys
import types

import m1_hybrid  # noqa: F401  (registers m1_hybrid with the Auto classes)

MODEL_TYPE = "m1_hybrid"
_logger = logging.getLogger(__name__)
_PATCHED = False


def _is_m1(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def apply_patches() -> bool:
    """Wrap VeRL's ``apply_monkey_patch`` / ``patch_forward_with_backends`` for M1 models (idempotent).

    Non-M1 models go through VeRL's functions unchanged. Returns ``True`` when VeRL is importable
    and the patches are in place, ``False`` when VeRL is not installed (nothing to patch).
    """
    global _PATCHED
    if _PATCHED:
        return True
    try:
        from verl.models.transformers import monkey_patch
    except ImportError:
        return False

    original_apply = monkey_patch.apply_monkey_patch
    original_backends = monkey_patch.patch_forward_with_backends

    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if not _is_m1(model):
            return original_backends(model, use_fused_kernels, fused_kernels_backend)
        if not use_fused_kernels:
            return None
        from verl_m1.fused import m1_forward_for_ppo

        # On the instance, not the class (VeRL patches classes): other M1 models of the process (an HF
        # rollout or reference copy) keep the normal forward with logits.
        model._verl_fused_kernels_backend = fused_kernels_backend or "m1_kernels"
        model.forward = types.MethodType(m1_forward_for_ppo, model)
        _logger.info("verl_m1: fused log-prob/entropy forward (m1_kernels) installed on %s", type(model).__name__)
        return None

    def apply_monkey_patch(model, ulysses_sp_size: int = 1, *args, **kwargs):
        if _is_m1(model) and ulysses_sp_size > 1:
            raise ValueError(
                "M1 hybrid models do not support Ulysses sequence parallelism "
                f"(ulysses_sequence_parallel_size={ulysses_sp_size}): slicing a packed row across ranks "
                "would split Mamba scans inside documents. Use ulysses_sequence_parallel_size=1."
            )
        return original_apply(model, ulysses_sp_size, *args, **kwargs)

    patch_forward_with_backends.__wrapped__ = original_backends
    apply_monkey_patch.__wrapped__ = original_apply
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends  # looked up as a global
    monkey_patch.apply_monkey_patch = apply_monkey_patch
    # The FSDP engine imports the function by name: an engine module imported after this point binds
    # the wrapper; one imported before still holds the original and is rebound here.
    transformer_impl = sys.modules.get("verl.workers.engine.fsdp.transformer_impl")
    if transformer_impl is not None and getattr(transformer_impl, "apply_monkey_patch", None) is original_apply:
        transformer_impl.apply_monkey_patch = apply_monkey_patch
    _PATCHED = True
    return True


apply_patches()

__all__ = ["MODEL_TYPE", "apply_patches"]
