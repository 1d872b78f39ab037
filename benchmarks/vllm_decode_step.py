"""vLLM decode-step time at a fixed batch and context, against the HBM-bandwidth ceiling.

``bench_vllm_throughput.py`` times whole generations (prefill, scheduling and the growing context
included). This script isolates the decode step the bandwidth target speaks of: ``--batch`` greedy
requests of ``--context`` random prompt tokens go into the engine at once, and the script steps the
engine itself, timing ``--steps`` steps in which all of them decode (after the last prefill chunk;
the batch is then aborted). The bytes one such step must move (weights, attention KV at the
measured mean context of those steps, SSM/conv states read and written; :func:`step_bytes`) divided
by the mean (and the median) step time, over the GPU's bandwidth (spec sheet, and a device-to-device
copy measured here), is the fraction of the ceiling reached.

The engine core runs in this process by default (``--engine inproc``; async scheduling overlaps one
step's host work with the GPU work of the next); ``--engine process`` runs it in its own process as
``vllm serve`` does (outputs then cross a socket each step: slower here, see vllm_m1/README.md; the
plugin must be pip-installed so that process finds it). ``--profile-steps N`` (in process) also
records N of those steps under ``torch.profiler`` (CUDA graphs on) and writes the GPU time per step
of every kernel, ``vllm_decode_profile_<model>.csv``; their sum is the row's ``gpu_ms_per_step``,
the step as the GPU alone sees it.

Usage (GPU; random weights, ``load_format="dummy"``)::

    python benchmarks/vllm_decode_step.py --model m1 --batch 512 --context 2304 --out $OUT
    python benchmarks/vllm_decode_step.py --model m1 --profile-steps 6 --out $OUT
    python benchmarks/vllm_decode_step.py --model native_hybrid --out $OUT
    python benchmarks/vllm_decode_step.py --smoke --out runs/decode_step     # tiny shapes, CPU too

Rows go to ``<out>/vllm_decode_step.csv`` and the plot to ``vllm_decode_step.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import random
import statistics
import tempfile
import time

from bench_vllm_throughput import count_params
from bench_vllm_throughput import start_engine
from bench_vllm_throughput import write_config
from results_io import append_csv
from results_io import pyplot

# HBM bandwidth on the spec sheet (bytes/s), by a substring of torch.cuda.get_device_name().
SPEC_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H200": 4.8e12}
CSV_STEP = "vllm_decode_step.csv"
DEFAULT_BATCHED_TOKENS = 32768  # prompts admitted fast enough that the whole batch soon decodes


def step_bytes(cfg, batch: int, context: float, ssm_bytes: int, params: float) -> dict[str, float]:
    """Bytes one decode step must move at ``batch`` sequences of mean ``context`` tokens.

    Every weight is read once (bf16, the tied embedding once, as the lm_head); each sequence reads its
    attention KV (K and V, bf16, ``context`` tokens per attention layer) and reads and writes its
    recurrent states: Mamba-1 (M1) ``d_inner x d_state`` SSM state in ``ssm_bytes`` and
    ``d_inner x (d_conv - 1)`` bf16 conv state; Mamba-2 (the native hybrid) ``heads x head_dim x
    d_state`` and a conv state over x, B and C. Activations are not counted (a few MB per layer).

    Example (M1-3B, batch 512, mean context 2304, fp32 SSM states: 6.9 + 29.0 + 4.8 GB)::

        >>> from types import SimpleNamespace as NS
        >>> m1 = NS(model_type="m1_hybrid", num_hidden_layers=28, attn_layers=[3, 8, 13, 18, 23, 27],
        ...         num_key_value_heads=8, head_dim=128, d_inner=3072, d_state=16, d_conv=4)
        >>> b = step_bytes(m1, 512, 2304, 4, 3.45e9)
        >>> [round(b[k] / 1e9, 1) for k in ("weights", "kv", "states", "total")]
        [6.9, 29.0, 4.8, 40.7]
    """
    model_type = cfg.model_type
    if model_type == "m1_hybrid":
        n_attn = len(cfg.attn_layers)
        n_ssm = cfg.num_hidden_layers - n_attn
        per_seq = n_ssm * cfg.d_inner * (cfg.d_state * ssm_bytes + (cfg.d_conv - 1) * 2)
    elif model_type == "granitemoehybrid":
        n_attn = sum(t in ("attention", "full_attention") for t in cfg.layer_types)
        n_ssm = cfg.num_hidden_layers - n_attn
        d_inner = cfg.mamba_n_heads * cfg.mamba_d_head
        conv_dim = d_inner + 2 * cfg.mamba_n_groups * cfg.mamba_d_state
        per_seq = n_ssm * (d_inner * cfg.mamba_d_state * ssm_bytes + conv_dim * (cfg.mamba_d_conv - 1) * 2)
    else:  # a Transformer
        n_attn, per_seq = cfg.num_hidden_layers, 0
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = n_attn * cfg.num_key_value_heads * head_dim * 2 * 2 * context * batch
    out = {"weights": 2 * params, "kv": kv, "states": 2 * per_seq * batch}  # states: read + written
    out["total"] = sum(out.values())
    return out


def copy_bandwidth(gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes/s, read + write counted) of this GPU."""
    import torch

    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    bw = 2 * src.numel() * reps / (time.perf_counter() - t)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """GPU kernels of a profile: name -> (total microseconds, count)."""
    from torch.autograd import DeviceType

    out: dict[str, tuple[float, int]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            us, n = out.get(e.name, (0.0, 0))
            out[e.name] = (us + e.time_range.elapsed_us(), n + 1)
    return out


def per_step_profile(kernels: dict[str, tuple[float, int]], steps: int) -> list[dict]:
    """Per-kernel GPU time of one decode step from :func:`kernel_times` over ``steps`` steps, largest first.

    Example::

        >>> rows = per_step_profile({"copy": (12.0, 3), "gemm": (400.0, 40)}, 40)
        >>> [(r["kernel"], r["us_per_step"], r["calls_per_step"]) for r in rows]
        [('gemm', 10.0, 1.0), ('copy', 0.3, 0.075)]
    """
    rows = [{"kernel": k, "us_per_step": us / steps, "calls_per_step": n / steps} for k, (us, n) in kernels.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def admission_steps(batch: int, context: int, max_batched_tokens: int) -> int:
    """Engine steps until the last of ``batch`` prompts of ``context`` tokens is prefilled (+2 of slack),
    when each step's ``max_batched_tokens`` go first to the running sequences' decode tokens.

    Example::

        >>> admission_steps(512, 2304, 32768)
        39
    """
    return math.ceil(batch * context / max(max_batched_tokens - batch, 1)) + 2


def max_new_tokens(batch: int, context: int, max_batched_tokens: int, steps: int, profile_steps: int) -> int:
    """Tokens each request may generate: the first admitted ones decode through the whole admission
    (estimated by :func:`admission_steps`, given twice its length: chunked prefill is not always that
    dense) and then through the profiled and timed steps.

    Example::

        >>> max_new_tokens(512, 2304, 32768, 64, 6)
        148
    """
    return 2 * admission_steps(batch, context, max_batched_tokens) + profile_steps + steps


@contextlib.contextmanager
def gc_mode(mode: str):
    """Python's cyclic GC for a timed run, given back as found. ``freeze``: everything alive now (the
    engine, the submitted requests) is moved out of the collector's reach; ``off``: no collection.

    Example::

        >>> with gc_mode("off"):
        ...     gc.isenabled()
        False
    """
    was_enabled = gc.isenabled()
    if mode == "freeze":
        gc.collect()
        gc.freeze()
    elif mode == "off":
        gc.disable()
    try:
        yield
    finally:
        if mode == "freeze":
            gc.unfreeze()
        if was_enabled:
            gc.enable()


def spec_bandwidth(gpu: str) -> float | None:
    return next((bw for key, bw in SPEC_BANDWIDTH.items() if key in gpu), None)


def measure(args) -> dict:
    """Build the engine for ``args.model`` (its core in this process or its own) and time its decode step."""
    import torch

    # in process: the profiler sees the engine's kernels; in its own process: the layout vllm serve uses
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if args.engine == "inproc" else "1"
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    import vllm_m1

    vllm_m1.register()  # idempotent; works where the entry point is not installed (PYTHONPATH checkout)
    path = write_config(args.model, args.workdir or tempfile.mkdtemp(prefix="m1_decode_step_"), args.smoke)
    params = count_params(path)
    bw_copy = copy_bandwidth() if cuda else None
    kw = dict(
        model=path,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.context
        + max_new_tokens(args.batch, args.context, args.max_batched_tokens, args.steps, args.profile_steps)
        + 8,
        max_num_seqs=args.batch,
        max_num_batched_tokens=args.max_batched_tokens,
        enable_prefix_caching=False,
        seed=0,
    )
    if args.model == "m1" and args.ssm_cache_dtype:
        kw["mamba_ssm_cache_dtype"] = args.ssm_cache_dtype
    llm = start_engine(kw, cuda, args.gpu_mem_util)
    rng = random.Random(0)
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()

    def run(tag: str, context: int, n_steps: int, profile_steps: int = 0) -> dict:
        """Submit the batch and step the engine. Once every request has its first token (all prefills
        done) each engine step decodes the whole batch; returns, over the ``n_steps`` such steps after
        the profiled ones: their mean time (``step``), the median and the slowest of the per-call step
        times (``median``, ``slowest``: stalls show here), the steps timed, the kernel table and the
        mean context (prompt + tokens generated so far). The rest of the batch is then aborted.

        Steps are counted in tokens (``batch`` tokens = one step), so the figure holds however the
        engine groups its outputs per ``step()`` call (async scheduling may deliver two at once)."""
        engine = llm.llm_engine
        # The scheduler admits prompts only as fast as its token budget allows (the running sequences'
        # decode tokens come first), so the first requests decode while later ones are prefilled; they
        # may generate up to max_new_tokens, more than any window needs, and are aborted after it.
        limit = max_new_tokens(args.batch, context, args.max_batched_tokens, n_steps, profile_steps)
        sp = SamplingParams(max_tokens=limit, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        ids_of = [f"{tag}{i}" for i in range(args.batch)]
        for rid in ids_of:
            ids = [rng.randrange(3, vocab) for _ in range(context)]  # random ids: no prefix is shared
            engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), sp)
        with gc_mode(args.gc):
            timed = step_window(engine, ids_of, n_steps, profile_steps)
        engine.abort_request(ids_of)  # the window is over: free the batch's slots for the next run
        while engine.has_unfinished_requests():
            engine.step()
        if not timed["steps"]:
            raise RuntimeError(
                f"no decode step was timed ({timed['started']}/{args.batch} requests started, {timed['profiled']} "
                f"tokens profiled, {limit} tokens per request): raise the token budget (--max-batched-tokens)"
            )
        return dict(timed, mean_context=context + timed["mean_generated"])

    def step_window(engine, ids_of: list[str], n_steps: int, profile_steps: int) -> dict:
        """Step the engine until ``n_steps`` full-batch steps (after ``profile_steps`` profiled ones) are
        timed; the figures :func:`run` returns, with the mean tokens generated in place of the context."""
        started, kernels, prof, finished, window_end = set(), [], None, False, 0.0
        window_start, window_tokens, profile_tokens, generated, gen_at_start = None, 0, 0, 0, 0
        per_call = []  # seconds per step of each step() call in the window that returned tokens
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            finished = finished or any(o.finished for o in outs)  # the batch shrinks from here on
            new = sum(len(o.outputs[0].token_ids) for o in outs if o.outputs)
            generated += new
            if len(started) < args.batch:  # prefill phase: wait for every request's first token
                started.update(o.request_id for o in outs if o.outputs and o.outputs[0].token_ids)
                if len(started) == args.batch:
                    if profile_steps:
                        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                        prof.__enter__()
                    else:
                        window_start, gen_at_start = now, generated
            elif prof is not None:  # profiled steps (CUPTI slows them: not timed)
                profile_tokens += new
                if profile_tokens >= profile_steps * args.batch:
                    prof.__exit__(None, None, None)
                    kernels, prof = per_step_profile(kernel_times(prof), profile_tokens / args.batch), None
                    window_start = time.perf_counter()
                    gen_at_start = generated
            elif window_start is not None and not finished:
                if new:
                    per_call.append((now - max(window_end, window_start)) / (new / args.batch))
                window_tokens += new
                window_end = now
                if window_tokens >= n_steps * args.batch:
                    break
        if prof is not None:  # the run ended first: not enough steps to profile
            prof.__exit__(None, None, None)
        steps = window_tokens / args.batch
        if not steps:
            return dict(steps=0, started=len(started), profiled=profile_tokens)
        # mean tokens generated over the timed steps (halfway through the window), to add to the prompt
        mean_generated = (gen_at_start + generated) / 2 / args.batch
        return dict(step=(window_end - window_start) / steps, median=statistics.median(per_call), slowest=max(per_call),
                    steps=round(steps, 1), kernels=kernels, mean_generated=mean_generated)  # fmt: skip

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    run("warm", 16, 4)  # warm-up: the batch's shapes and the prefill path compiled and captured
    timed = run("r", args.context, args.steps, args.profile_steps if cuda else 0)
    step, kernels, mean_context = timed["step"], timed["kernels"], timed["mean_context"]
    if kernels:
        append_csv(kernels, args.out, f"vllm_decode_profile_{args.model}.csv")
        print(f"kernel us per decode step ({args.profile_steps} profiled steps):")
        for r in kernels[:30]:
            print(f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:6.2f}  {r['kernel'][:110]}")

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    ssm_bytes = 4 if args.model == "m1" and (args.ssm_cache_dtype or "float32") == "float32" else 2
    gpu_step = sum(r["us_per_step"] for r in kernels) / 1e6 if kernels else None  # the kernels alone
    moved = step_bytes(cfg, args.batch, mean_context, ssm_bytes, params * 1e9)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    spec = spec_bandwidth(gpu)
    row = dict(
        time=datetime.datetime.now().isoformat(timespec="seconds"),
        gpu=gpu,
        vllm=vllm.__version__,
        torch=torch.__version__,
        model=args.model if args.model != "m1" else f"m1 (ssm {'fp32' if ssm_bytes == 4 else 'bf16'})",
        params_b=round(params, 3),
        batch=args.batch,
        engine=args.engine,
        gc=args.gc,
        mean_context=round(mean_context, 1),
        ms_per_step=round(1000 * step, 3),
        tok_per_s=round(args.batch / step, 1),
        gb_per_step=round(moved["total"] / 1e9, 2),
        gb_weights=round(moved["weights"] / 1e9, 2),
        gb_kv=round(moved["kv"] / 1e9, 2),
        gb_states=round(moved["states"] / 1e9, 2),
        achieved_tb_s=round(moved["total"] / step / 1e12, 3),
        spec_tb_s=spec / 1e12 if spec else "",
        copy_tb_s=round(bw_copy / 1e12, 3) if bw_copy else "",
        frac_of_spec=round(moved["total"] / step / spec, 3) if spec else "",
        frac_of_copy=round(moved["total"] / step / bw_copy, 3) if bw_copy else "",
        steps_timed=timed["steps"],
        median_ms_per_step=round(1000 * timed["median"], 3),
        slowest_ms_per_step=round(1000 * timed["slowest"], 3),
        median_frac_of_spec=round(moved["total"] / timed["median"] / spec, 3) if spec else "",
        gpu_ms_per_step=round(1000 * gpu_step, 3) if gpu_step else "",
        gpu_frac_of_spec=round(moved["total"] / gpu_step / spec, 3) if gpu_step and spec else "",
    )
    append_csv([row], args.out, CSV_STEP)
    print("ROW", row, flush=True)
    plot(os.path.join(args.out, CSV_STEP), os.path.join(args.out, "vllm_decode_step.png"))
    return row


def plot(csv_path: str, png_path: str) -> None:
    """Achieved bandwidth of every GPU run (in time order: run-to-run spread shows) against the spec
    and copy ceilings; where a run was profiled, the bandwidth of its GPU kernel time as a dot."""
    import csv

    plt = pyplot()
    if plt is None:
        return
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["gpu"] != "cpu"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.8))
    xs = range(len(rows))
    ax.bar(xs, [float(r["achieved_tb_s"]) for r in rows], color="tab:blue", label="achieved (bytes/step / mean step)")
    dot_label = "GPU kernel time only"
    for i, r in enumerate(rows):
        for field, style in (("spec_tb_s", "r--"), ("copy_tb_s", "k:")):
            if r[field]:
                ax.plot([i - 0.4, i + 0.4], [float(r[field])] * 2, style)
        if r.get("gpu_ms_per_step"):
            gb = float(r["gb_per_step"])
            ax.plot(i, gb / float(r["gpu_ms_per_step"]), "o", color="tab:green", label=dot_label)
            dot_label = None  # one legend entry
        ax.text(i, float(r["achieved_tb_s"]), f"{r['ms_per_step']} ms\n{r['frac_of_spec']}", ha="center",
                va="bottom", fontsize=7)  # fmt: skip
    labels = [
        f"{r['model']}\n{r.get('engine') or 'inproc'}, gc {r.get('gc') or 'on'}\n{r['time'][11:16]}" for r in rows
    ]
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_ylabel("TB/s")
    ax.set_title(f"vLLM decode step, batch {rows[-1]['batch']}, {rows[-1]['gpu']} (red: spec sheet, black: copy)",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="m1", choices=("m1", "llama", "native_hybrid"))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--context", type=int, default=2304, help="prompt tokens per sequence (the paper's mean: 2304)")
    p.add_argument("--steps", type=int, default=64, help="decode steps to time with the whole batch running")
    p.add_argument(
        "--max-batched-tokens", type=int, default=DEFAULT_BATCHED_TOKENS,
        help="the engine's per-step token budget (prompts are admitted this fast)",
    )  # fmt: skip
    p.add_argument("--ssm-cache-dtype", choices=("float32", "bfloat16"), help="M1's mamba_ssm_cache_dtype")
    p.add_argument(
        "--profile-steps", type=int, default=0, metavar="N",
        help="profile N full-batch decode steps: per-kernel GPU time per step (CSV)",
    )  # fmt: skip
    p.add_argument(
        "--engine", choices=("inproc", "process"), default="inproc",
        help="engine core in this process (needed by --profile-steps) or in its own, as vllm serve runs it",
    )  # fmt: skip
    p.add_argument(
        "--gc", choices=("on", "freeze", "off"), default="on",
        help="Python's cyclic GC during a run: on, objects alive at submission frozen, or off (its cost per step)",
    )  # fmt: skip
    p.add_argument("--gpu-mem-util", type=float, default=0.9)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (batch 4, context 16, 8 steps): checks the script")
    p.add_argument("--workdir", default=None, help="where the config is written (default: a temp folder)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.profile_steps and args.engine != "inproc":
        p.error("--profile-steps needs the engine in this process: add --engine inproc")
    if args.smoke:
        args.batch, args.context, args.steps = 4, 16, 8
    return measure(args)


if __name__ == "__main__":
    main()
