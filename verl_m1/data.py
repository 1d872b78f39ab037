"""MATH-style JSONL -> VeRL RL parquet, with the paper's prompt suffix.

Each input line is a JSON object with a problem and an answer. Accepted fields (first found wins):
problem from ``problem`` / ``question`` / ``prompt``; answer from ``answer`` (a trailing
``#### N`` GSM8K answer keeps ``N``), else the last ``\\boxed{}`` of ``solution``. Rows without
either are skipped (and counted).

Each output row follows VeRL's RL schema (``verl.utils.dataset.rl_dataset.RLHFDataset``):

- ``data_source``: ``--data-source`` (default ``math``);
- ``prompt``: one user turn ``[{"role": "user", "content": "<problem> <suffix>"}]`` (plus a system turn
  with ``--system``); the suffix is the paper's ``Let's think step by step and output the final answer
  within \\boxed{}.``; the chat template is applied later by VeRL's agent loop;
- ``ability``: ``math``; ``reward_model``: ``{"style": "rule", "ground_truth": <answer>}``;
- ``extra_info``: ``{"split", "index", "problem", "answer", "require_think"}``.

Command line::

    python -m verl_m1.data --input train.jsonl --out data/m1 [--test-input test.jsonl] [--max-rows N]

writes ``data/m1/train.parquet`` (and ``data/m1/test.parquet``).

Example::

    >>> from verl_m1.data import make_row
    >>> row = make_row({"problem": "1+1?", "answer": "2"}, 0, split="train")
    >>> row["prompt"][0]["content"]
    "1+1? Let's think step by step and output the final answer within \\\\boxed{}."
    >>> row["reward_model"]
    {'style': 'rule', 'ground_truth': '2'}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m1_eval.datasets import read_jsonl
from m1_eval.grading import extract_boxed
from m1_eval.prompting import PAPER_SUFFIX
from m1_eval.prompting import PromptConfig
from m1_eval.prompting import user_message

PROBLEM_KEYS = ("problem", "question", "prompt")


def find_answer(record: dict) -> str | None:
    """The ground-truth answer of a record: ``answer`` (GSM8K ``#### N`` -> ``N``), else the last box of
    ``solution``; ``None`` when there is none."""
    answer = record.get("answer")
    if answer is not None and str(answer).strip():
        text = str(answer)
        if "####" in text:  # GSM8K: worked solution, then "#### 1,234"
            return text.rsplit("####", 1)[1].strip().replace(",", "")
        return text.strip()
    solution = record.get("solution")
    if solution:
        return extract_boxed(str(solution))
    return None


def find_problem(record: dict) -> str | None:
    """The problem statement of a record (``problem``, ``question`` or ``prompt``)."""
    for key in PROBLEM_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def make_row(
    record: dict,
    index: int,
    *,
    split: str = "train",
    data_source: str = "math",
    suffix: str = PAPER_SUFFIX,
    system: str | None = None,
    require_think: bool = False,
) -> dict | None:
    """One VeRL RL row for ``record``, or ``None`` when it has no problem or no answer."""
    problem, answer = find_problem(record), find_answer(record)
    if problem is None or answer is None:
        return None
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_message(problem, PromptConfig(suffix=suffix))})
    return {
        "data_source": data_source,
        "prompt": messages,
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {
            "split": split,
            "index": index,
            "problem": problem,
            "answer": answer,
            "require_think": require_think,
        },
    }


def convert(
    input_path: str | Path,
    out_path: str | Path,
    *,
    split: str = "train",
    max_rows: int | None = None,
    **row_kwargs,
) -> tuple[int, int]:
    """Write ``input_path`` (JSONL) as a VeRL parquet file; returns ``(rows written, records skipped)``."""
    import pandas as pd

    rows, skipped = [], 0
    for record in read_jsonl(input_path):
        if max_rows is not None and len(rows) >= max_rows:
            break
        row = make_row(record, len(rows), split=split, **row_kwargs)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    if not rows:
        raise ValueError(f"{input_path}: no record with both a problem and an answer")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out_path, index=False)
    return len(rows), skipped


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by ``python -m verl_m1.data`` and ``m1 grpo-data``."""
    p.add_argument("--input", required=True, help="training JSONL (problem + answer, or solution with \\boxed{})")
    p.add_argument("--out", required=True, help="output folder: writes train.parquet (and test.parquet)")
    p.add_argument("--test-input", default=None, help="optional validation JSONL, written as test.parquet")
    p.add_argument("--data-source", default="math", help="data_source column (default: math)")
    p.add_argument("--suffix", default=PAPER_SUFFIX, help="instruction appended to each problem (default: paper's)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--require-think", action="store_true", help="mark rows for the M1 </think> reward rule")
    p.add_argument("--max-rows", type=int, default=None, help="keep at most this many rows per split")


def run(args: argparse.Namespace) -> int:
    """Convert the files named by ``args``; prints one line per split."""
    kw = dict(
        data_source=args.data_source,
        suffix=args.suffix,
        system=args.system,
        require_think=args.require_think,
        max_rows=args.max_rows,
    )
    out = Path(args.out)
    for split, path in (("train", args.input), ("test", args.test_input)):
        if path is None:
            continue
        n, skipped = convert(path, out / f"{split}.parquet", split=split, **kw)
        print(f"{split}: wrote {n} rows to {out / f'{split}.parquet'} ({skipped} skipped)")
    return 0


def register(subparsers) -> None:
    """Add ``m1 grpo-data`` (for ``m1_cli.main.SUBCOMMAND_MODULES``)."""
    p = subparsers.add_parser(
        "grpo-data",
        help="MATH-style JSONL -> VeRL GRPO parquet (paper prompt suffix)",
        description="Turn JSONL rows (problem, answer) into VeRL's RL parquet format with the paper's prompt.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m verl_m1.data``."""
    parser = argparse.ArgumentParser(prog="python -m verl_m1.data", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
