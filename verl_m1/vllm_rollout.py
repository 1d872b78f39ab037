"""GRPO rollouts from a real in-process vLLM engine serving an M1 checkpoint through :mod:`vllm_m1`.

:class:`VLLMRollout` is what VeRL's colocated vLLM rollout does, without Ray or a server process:

- the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the trainer's tensors can
  be handed to the model directly and timings include everything;
- CUDA graphs are on by default on GPU (``enforce_eager=False``); on CPU vLLM always runs eager;
- ``sleep_mode`` (GPU only, vLLM's ``enable_sleep_mode``): :meth:`sleep` frees the KV cache and
  offloads the weights while the trainer updates; :meth:`sync_weights` and :meth:`generate` wake the
  engine first;
- :meth:`sync_weights` streams ``(name, tensor)`` pairs, the trainer's names as produced by VeRL's
  ``engine.get_per_tensor_param()``, into the vLLM model's ``load_weights`` (the plugin maps the
  released/HF names onto its fused layout), then resets the prefix cache: cached KV blocks and Mamba
  states were computed with the old weights. Prefix caching is off anyway (``enable_prefix_caching``
  defaults to False here: hybrid SSM states are per-sequence);
- :meth:`generate` returns token ids, texts and the rollout throughput.

Example (CPU, eager)::

    >>> from verl_m1.vllm_rollout import VLLMRollout            # doctest: +SKIP
    >>> ro = VLLMRollout("runs/demo/hybrid", max_model_len=512)  # doctest: +SKIP
    >>> out = ro.generate([[1, 2, 3]], n=2, max_tokens=8, temperature=0.0)  # doctest: +SKIP
    >>> out["token_ids"][0], out["tok_s"]                        # doctest: +SKIP
    ([...], ...)
    >>> ro.sync_weights(model.state_dict().items())              # doctest: +SKIP
    {'seconds': ..., 'bytes': ..., 'tensors': ...}
"""

from __future__ import annotations

import gc
import inspect
import os
import time
from collections.abc import Iterable
from collections.abc import Sequence

import torch


def _cuda() -> bool:
    return torch.cuda.is_available()


def _load_on_worker(worker, weights) -> None:
    """Runs on the vLLM worker (this process): load ``weights`` into its model.

    vLLM >= 0.3x has ``Worker.reload_weights(weights_iterator=...)``: it re-runs each layer's
    ``process_weights_after_loading``, which matters where that step repacks weights (the CPU backend
    moves linear weights into oneDNN handles and drops ``weight``, so a plain ``load_weights`` would
    change nothing). Older vLLM (0.26 on the GPU machine) lacks the argument; there the model's
    ``load_weights`` is what VeRL's own vLLM rollout calls, and unquantized CUDA linears read
    ``weight`` directly.
    """
    runner_reload = getattr(worker.model_runner, "reload_weights", None)
    if runner_reload is not None and "weights_iterator" in inspect.signature(runner_reload).parameters:
        worker.reload_weights(weights_iterator=weights)
    else:
        worker.model_runner.model.load_weights(weights)


class VLLMRollout:
    """An in-process ``vllm.LLM`` on an M1 checkpoint with weight sync from a trainer (module docstring).

    ``enforce_eager``: None = CUDA graphs on GPU (False), eager on CPU (True). ``sleep_mode``: None =
    on for GPU, off on CPU (vLLM's CPU backend has no sleep mode). ``gpu_memory_utilization`` is the
    fraction of the GPU this engine may take; leave room for the trainer sharing the GPU. Extra
    keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model: str,
        *,
        enforce_eager: bool | None = None,
        sleep_mode: bool | None = None,
        dtype: str | None = None,
        max_model_len: int = 2048,
        max_num_seqs: int = 256,
        gpu_memory_utilization: float = 0.35,
        seed: int = 0,
        **llm_kwargs,
    ):
        # In-process engine: collective_rpc runs callables on the worker directly (no pickling) and
        # the trainer's tensors never cross a process boundary.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        cuda = _cuda()
        if not cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        import vllm_m1

        # register in this process: the engine runs here, and a PYTHONPATH checkout on the GPU machine
        # has no installed entry point. Idempotent.
        vllm_m1.register()
        self.cuda = cuda
        self.enforce_eager = (not cuda) if enforce_eager is None else (enforce_eager or not cuda)
        self.sleep_mode = cuda if sleep_mode is None else (sleep_mode and cuda)
        kw = dict(
            model=str(model),
            dtype=dtype or ("bfloat16" if cuda else "float32"),
            enforce_eager=self.enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=False,
            seed=seed,
        )
        if cuda:
            kw.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
        kw.update(llm_kwargs)
        t0 = time.perf_counter()
        self.llm = LLM(**kw)
        self.startup_s = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer() if not kw.get("skip_tokenizer_init") else None
        self.asleep = False

    # -- sleep mode --------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the KV cache and offload weights (level 1) while the trainer runs; no-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Bring weights and KV cache back (no-op when awake or without sleep mode)."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # -- weight sync -------------------------------------------------------------------------------

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Load ``(name, tensor)`` pairs (trainer names) into the vLLM model; reset the prefix cache.

        Returns ``{"seconds", "bytes", "tensors"}``: wall time of the whole sync (the stream is consumed
        here, so producing the tensors, e.g. FSDP all-gathers, is included) and what was moved.
        """
        self.wake_up()
        stats = {"bytes": 0, "tensors": 0}

        def counted():
            for name, tensor in weights:
                stats["bytes"] += tensor.numel() * tensor.element_size()
                stats["tensors"] += 1
                yield name, tensor

        t0 = time.perf_counter()
        self.llm.collective_rpc(lambda worker: _load_on_worker(worker, counted()))
        if self.cuda:
            torch.cuda.synchronize()
        self.reset_prefix_cache()
        stats["seconds"] = time.perf_counter() - t0
        return stats

    def reset_prefix_cache(self) -> None:
        """Drop cached prefix blocks (stale after a weight change); vLLM versions without it cache nothing here."""
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()

    # -- generation --------------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        ignore_eos: bool = False,
        seed: int | None = None,
    ) -> dict:
        """``n`` continuations per prompt (token-id prompts, no template applied here).

        Returns ``token_ids`` / ``texts`` (``len(prompt_ids) * n`` lists, prompt-major, like VeRL's
        ``rollout.n`` expansion), ``seconds``, ``tokens`` (generated) and ``tok_s``.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        sp = SamplingParams(
            n=n, max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos, seed=seed, detokenize=True
        )
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        token_ids, texts = [], []
        for out in outs:  # vLLM keeps the prompt order
            for comp in sorted(out.outputs, key=lambda c: c.index):
                token_ids.append(list(comp.token_ids))
                texts.append(comp.text)
        tokens = sum(len(t) for t in token_ids)
        return {"token_ids": token_ids, "texts": texts, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}

    def close(self) -> None:
        """Shut the engine down and free its memory (so another engine can start in this process)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception as exc:  # best effort: the memory is released below anyway
                print(f"vLLM engine shutdown: {exc!r}")
        del llm, core
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


__all__ = ["VLLMRollout"]
