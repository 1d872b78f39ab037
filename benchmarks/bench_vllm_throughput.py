"""Offline vLLM decode throughput: M1 hybrid (our plugin) vs a Llama-3.2-3B-shaped Transformer vs a
vLLM-native hybrid of M1's shape (dense GraniteMoeHybrid: 6 attention + 22 Mamba2 layers).

Random weights (``load_format="dummy"``), prompts of ``--prompt-len`` random token ids, ``ignore_eos``,
greedy, every batch size in ``--batches`` for every decode length in ``--tokens``; ``--warmups``
short warm-up generates, then the median of ``--repeats`` timed runs. Reports output tokens/s, batch
latency, ms per decode step and peak GPU memory; appends to ``<out>/vllm_throughput.csv`` (GPU name,
vLLM and torch versions per row) and redraws ``<out>/vllm_throughput.png``.

Each model runs in its own child process (fresh CUDA context, clean peak-memory counter), so one
call can be cut to fit a time budget::

    python benchmarks/bench_vllm_throughput.py                      # all models, bs 8..512, 1024 & 4096
    python benchmarks/bench_vllm_throughput.py --models m1 --batches 64 256 --tokens 1024
    python benchmarks/bench_vllm_throughput.py --smoke              # tiny shapes, seconds (CPU too)

The vLLM-native peer needs vLLM >= 0.2x's ``GraniteMoeHybridForCausalLM``; the M1 model needs this
repository installed (``pip install -e .``: the ``vllm_m1`` plugin entry point).
"""

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODELS = ("m1", "llama", "native_hybrid")
ATTN_M1 = [3, 8, 13, 18, 23, 27]  # M1-3B
ATTN_NATIVE = [2, 7, 12, 16, 21, 26]  # 6 of 28, as the lead's GraniteMoeHybrid baseline
CSV_FIELDS = [
    "time",
    "gpu",
    "vllm",
    "torch",
    "model",
    "params_b",
    "batch",
    "prompt_len",
    "decode_len",
    "output_tok_s",
    "latency_s",
    "ms_per_step",
    "peak_gpu_mem_gib",
    "kv_cache_tokens",
    "runs",
]


def shapes(smoke: bool) -> dict:
    """Common 3B shapes (or tiny ones for --smoke)."""
    if smoke:
        return dict(vocab=1024, hidden=256, layers=4, heads=4, kv=2, head_dim=64, inter=512, attn=[1], d_xb=128)
    return dict(vocab=128256, hidden=3072, layers=28, heads=24, kv=8, head_dim=128, inter=8192, attn=None, d_xb=1024)


def write_config(name: str, root: str, smoke: bool) -> str:
    """Write config.json (+ architectures) for one model into ``root/name``; return the folder."""
    s = shapes(smoke)
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    common = dict(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    )
    if name == "m1":
        from m1_hybrid import M1HybridConfig

        cfg = M1HybridConfig(
            **common,
            head_dim=s["head_dim"],
            intermediate_size=s["inter"],
            attn_layers=s["attn"] or ATTN_M1,
            d_state=16,
            d_xb=s["d_xb"],
            rope_theta=500000.0,
            tie_word_embeddings=True,
            dt_bias_twice=True,
            dtype="bfloat16",
        )
        cfg.architectures = ["M1HybridForCausalLM"]
    elif name == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            **common,
            head_dim=s["head_dim"],
            intermediate_size=s["inter"],
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            dtype="bfloat16",
            architectures=["LlamaForCausalLM"],
        )
    elif name == "native_hybrid":
        from transformers import GraniteMoeHybridConfig

        attn = s["attn"] or ATTN_NATIVE
        n_heads = s["hidden"] // s["head_dim"]
        cfg = GraniteMoeHybridConfig(
            **common,
            # untied: vLLM 0.26's granitemoehybrid fails to tie on this path
            tie_word_embeddings=False,
            position_embedding_type="rope",
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            num_local_experts=0,
            num_experts_per_tok=0,
            shared_intermediate_size=s["inter"],
            layer_types=["attention" if i in attn else "mamba" for i in range(s["layers"])],
            mamba_n_heads=n_heads,
            mamba_d_head=s["head_dim"],
            mamba_expand=1,
            mamba_n_groups=s["kv"],
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_chunk_size=256,
            mamba_conv_bias=True,
            mamba_proj_bias=False,
            embedding_multiplier=1.0,
            logits_scaling=1.0,
            residual_multiplier=1.0,
            attention_multiplier=s["head_dim"] ** -0.5,
            dtype="bfloat16",
            architectures=["GraniteMoeHybridForCausalLM"],  # else vLLM picks a pooling runner
        )
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    cfg.save_pretrained(path)
    return path


def count_params(path: str) -> float:
    """Parameters in billions, from a meta-device instantiation of the HF model."""
    import torch
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    import m1_hybrid  # noqa: F401  (registers m1_hybrid)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters()) / 1e9


def start_engine(kw: dict, cuda: bool, gpu_mem_util: float):
    """``vllm.LLM(**kw)`` in bf16 with ``gpu_mem_util`` on CUDA, fp32 eager on CPU; prints its start-up time."""
    from vllm import LLM

    if cuda:
        kw = dict(kw, dtype="bfloat16", gpu_memory_utilization=gpu_mem_util)
    else:
        kw = dict(kw, dtype="float32", enforce_eager=True)
    t = time.time()
    llm = LLM(**kw)
    print(f"# engine up in {time.time() - t:.1f} s", file=sys.stderr, flush=True)
    return llm


def worker(args) -> None:
    """Child process: one model, all batches/lengths; prints one JSON row per measurement."""
    import random

    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: peak memory is ours
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm

    import vllm_m1

    # The engine runs in this process: registering here works even where the plugin's entry point is
    # not visible (a PYTHONPATH checkout on the GPU machine); register() is idempotent.
    vllm_m1.register()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    path = args.worker
    max_len = args.prompt_len + max(args.tokens) + 8
    kw = dict(
        model=path,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=max_len,
        max_num_seqs=max(args.batches),
        enable_prefix_caching=args.prefix_caching,
        seed=0,
        tensor_parallel_size=args.tp,
    )
    llm = start_engine(kw, cuda, args.gpu_mem_util)
    kv_tokens = ""
    try:
        kv_tokens = (
            llm.llm_engine.vllm_config.cache_config.num_gpu_blocks * llm.llm_engine.vllm_config.cache_config.block_size
        )
    except Exception:
        pass
    rng = random.Random(0)
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    for n_tok in args.tokens:
        for bs in args.batches:
            prompts = [
                TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(args.prompt_len)])
                for _ in range(bs)
            ]
            warm = SamplingParams(max_tokens=min(n_tok, 32), temperature=0.0, ignore_eos=True)
            for _ in range(args.warmups):
                llm.generate(prompts, warm, use_tqdm=False)
            sp = SamplingParams(max_tokens=n_tok, temperature=0.0, ignore_eos=True)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times, outs = [], 0
            for _ in range(args.repeats):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                res = llm.generate(prompts, sp, use_tqdm=False)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                outs = sum(len(r.outputs[0].token_ids) for r in res)
            med = statistics.median(times)
            row = dict(
                time=datetime.datetime.now().isoformat(timespec="seconds"),
                gpu=gpu,
                vllm=vllm.__version__,
                torch=torch.__version__,
                model=args.model_name,
                params_b=f"{args.params_b:.3f}",
                batch=bs,
                prompt_len=args.prompt_len,
                decode_len=n_tok,
                output_tok_s=f"{outs / med:.1f}",
                latency_s=f"{med:.3f}",
                ms_per_step=f"{1000 * med / n_tok:.2f}",
                # (with TP > 1 the model runs in vLLM's worker processes: this process's counter says nothing)
                peak_gpu_mem_gib=f"{torch.cuda.max_memory_reserved() / 2**30:.2f}" if cuda and args.tp == 1 else "",
                kv_cache_tokens=kv_tokens,
                runs=" ".join(f"{x:.3f}" for x in times),
            )
            print("ROW " + json.dumps(row), flush=True)


def plot(csv_path: str, png_path: str) -> None:
    """Output tok/s vs batch, one line per (model, decode length), latest row per point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    latest = {}
    for r in rows:
        latest[(r["gpu"], r["model"], int(r["decode_len"]), int(r["batch"]))] = float(r["output_tok_s"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for gpu, model, n_tok in sorted({k[:3] for k in latest}):
        pts = sorted((b, v) for (g, m, t, b), v in latest.items() if (g, m, t) == (gpu, model, n_tok))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} decode {n_tok} ({gpu})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s")
    ax.set_title("vLLM offline decode throughput (random weights, greedy, ignore_eos)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for vllm_throughput.csv/.png")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, bs 2 4, 8 tokens, 1 run: checks the script")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="which models (default all)")
    p.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096], help="decode lengths")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--warmups", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--gpu-mem-util", type=float, default=0.9)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size; rows are named MODEL_tpN when > 1")
    p.add_argument("--prefix-caching", action="store_true", help="leave prefix caching on (off by default)")
    p.add_argument("--workdir", default=None, help="where configs are written (default: a temp folder)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per model before the child is killed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-name", default=None, help=argparse.SUPPRESS)
    p.add_argument("--params-b", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.tokens, args.prompt_len, args.warmups, args.repeats = [2, 4], [8], 16, 1, 1
    if args.worker:
        worker(args)
        return 0
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "vllm_throughput.csv")
    root = args.workdir or tempfile.mkdtemp(prefix="m1_vllm_bench_")
    failures = 0
    for name in args.models:
        path = write_config(name, root, args.smoke)
        params = count_params(path)
        print(f"== {name}: {params:.3f} B params, config in {path}", flush=True)
        label = name if args.tp == 1 else f"{name}_tp{args.tp}"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--model-name", label]
        cmd += ["--params-b", str(params), "--prompt-len", str(args.prompt_len), "--warmups", str(args.warmups)]
        cmd += ["--repeats", str(args.repeats), "--gpu-mem-util", str(args.gpu_mem_util), "--tp", str(args.tp)]
        cmd += ["--batches", *map(str, args.batches), "--tokens", *map(str, args.tokens)]
        if args.prefix_caching:
            cmd.append("--prefix-caching")
        rows = []
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
            out = proc.stdout
            if proc.returncode:
                failures += 1
                print(f"!! {name} exited with {proc.returncode}", flush=True)
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            out = out.decode() if isinstance(out, bytes) else out
            failures += 1
            print(f"!! {name} timed out after {args.timeout} s (rows so far kept)", flush=True)
        rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
        new_file = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new_file:
                w.writeheader()
            w.writerows(rows)
        for r in rows:
            print(
                f"TABLE {r['model']:>14} bs {r['batch']:>4} decode {r['decode_len']:>5}: {r['output_tok_s']:>10} tok/s "
                f"{r['latency_s']:>8} s  {r['ms_per_step']:>7} ms/step  peak {r['peak_gpu_mem_gib']} GiB",
                flush=True,
            )
    if os.path.exists(csv_path):
        plot(csv_path, os.path.join(args.out, "vllm_throughput.png"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
