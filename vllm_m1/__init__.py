"""vllm_m1: M1 hybrid models in vLLM through a general plugin.

Installing m1-suite declares the entry point ``m1_hybrid = vllm_m1:register`` in the group
``vllm.general_plugins``; vLLM calls :func:`register` in every process it starts (API server,
engine core, workers, Ray actors), so ``vllm serve CKPT`` and ``vllm.LLM(CKPT)`` load M1
checkpoints with no extra flags. This module imports nothing heavy at import time.

Example::

    >>> import vllm_m1
    >>> vllm_m1.register()      # idempotent; vLLM does this itself
    >>> vllm_m1.ARCH
    'M1HybridForCausalLM'
"""

ARCH = "M1HybridForCausalLM"
MODEL_TYPE = "m1_hybrid"
MODEL_CLASS = "vllm_m1.model:M1HybridForCausalLM"
SPLITTING_OP = "vllm::m1_mamba_mixer"


def register() -> None:
    """Register the M1 architecture (lazily, by ``"module:Class"``), the ``m1_hybrid`` config and the
    mixer's custom op as a CUDA-graph splitting op. Safe to call any number of times."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLASS)
    _register_config()
    _register_splitting_op()


def _register_config() -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(MODEL_TYPE)
        return  # already known (m1_hybrid imported, or an earlier call)
    except (ValueError, KeyError):
        pass
    from m1_hybrid.configuration_m1 import M1HybridConfig

    AutoConfig.register(MODEL_TYPE, M1HybridConfig, exist_ok=True)


def _register_splitting_op() -> None:
    """Default ``splitting_ops`` are ``CompilationConfig._attention_ops``: piecewise CUDA graphs
    then run the mixer eagerly between captured pieces (its prefill path syncs with the host)."""
    try:
        from vllm.config.compilation import CompilationConfig
    except ImportError:
        return
    ops = getattr(CompilationConfig, "_attention_ops", None)
    if isinstance(ops, list) and SPLITTING_OP not in ops:
        ops.append(SPLITTING_OP)


__all__ = ["ARCH", "MODEL_TYPE", "register"]
