"""Grading a run's samples, computing its metrics, the results JSON and the text table.

Results JSON (``format: "m1_eval/1"``), written by :func:`save_results`, holds everything needed to
audit a run and re-score it offline (:func:`rescore`):

- ``model``, ``label`` (legend name), ``created``, ``sampling`` (n, temperature, top_p, max_tokens, seed),
  ``prompt`` (template, suffix, system, chat_template), ``grading`` (timeout_s, require_think),
  ``throughput_tok_s`` and ``throughput_source`` (``"measured"`` or ``"given"``), ``generation``
  (wall_s, total_tokens);
- ``metrics``: per dataset ``num_problems``, ``n``, ``pass@1``, ``pass@k`` ``{k: value}``,
  ``maj@k`` ``{k: [mean, std]}`` (``k`` keys are strings in the file);
- ``problems``: one record per problem: ``dataset``, ``id``, ``problem``, ``answer`` (gold), ``prompt``,
  ``prompt_tokens`` and ``samples``, each with ``text``, ``answer`` (extracted, or null), ``correct``,
  ``label`` (equivalence class for maj@k: 0 correct, -1 no answer, 1.. wrong classes), ``num_tokens``
  and ``finish_reason``.

Example::

    >>> from m1_eval.report import grade_records, compute_metrics, format_table
    >>> recs = [{"dataset": "toy", "id": "0", "answer": "3",
    ...          "samples": [{"text": r"\\boxed{3}", "num_tokens": 5}, {"text": r"\\boxed{4}", "num_tokens": 5}]}]
    >>> _ = grade_records(recs, progress=False)
    >>> print(format_table(compute_metrics(recs)))  # doctest: +NORMALIZE_WHITESPACE
    dataset  problems  n  pass@1  pass@2       maj@2
    -------  --------  -  ------  ------  ----------
    toy             1  2    50.0   100.0  50.0 ± 0.0
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from m1_eval.grading import DEFAULT_TIMEOUT_S

FORMAT = "m1_eval/1"


def grade_records(
    records: list[dict],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    require_think: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Fill ``answer``, ``correct`` and ``label`` of every sample in place (parallel over the grader pool)."""
    from m1_eval.grading import answer_labels
    from m1_eval.grading import extract_answer
    from m1_eval.grading import get_pool
    from m1_eval.grading import is_equiv

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(r["samples"]) for r in records), desc="grading", unit="sample")

    def one(rec: dict) -> None:
        for s in rec["samples"]:
            try:
                s["answer"] = extract_answer(s.get("text"), require_think)
            except Exception:  # noqa: BLE001
                s["answer"] = None
            s["correct"] = bool(is_equiv(rec["answer"], s["answer"], timeout_s)) if s["answer"] else False
            if bar is not None:
                bar.update(1)
        labels = answer_labels([s["answer"] for s in rec["samples"]], [s["correct"] for s in rec["samples"]], timeout_s)
        for s, lab in zip(rec["samples"], labels):
            s["label"] = lab

    with ThreadPoolExecutor(max_workers=get_pool().size) as ex:
        list(ex.map(one, records))
    if bar is not None:
        bar.close()
    return records


def compute_metrics(records: list[dict], ks: list[int] | None = None, repeats: int = 100, seed: int = 0) -> dict:
    """Per-dataset :func:`m1_eval.metrics.summarize` over graded records (dataset order kept)."""
    from m1_eval.metrics import summarize

    by_ds: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_ds[r["dataset"]].append(r)
    return {
        ds: summarize(
            [[bool(s["correct"]) for s in r["samples"]] for r in recs],
            [[int(s.get("label", 0 if s["correct"] else -1)) for s in r["samples"]] for r in recs],
            ks,
            repeats,
            seed,
        )
        for ds, recs in by_ds.items()
    }


def _k_int(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


def format_table(metrics: dict, columns: str = "compact") -> str:
    """Plain-text table, one row per dataset: problems, n, pass@1, pass@n, maj@n (mean ± std), in percent.

    ``columns="all"`` shows every computed pass@k and maj@k.
    """
    rows = []
    all_k: list[int] = []
    for m in metrics.values():
        for k in _k_int(m.get("pass@k", {})):
            if k not in all_k:
                all_k.append(k)
    all_k.sort()
    header = ["dataset", "problems", "n", "pass@1"]
    if columns == "all":
        pk = [k for k in all_k if k > 1]
        header += [f"pass@{k}" for k in pk] + [f"maj@{k}" for k in all_k]
    else:
        nmax = max((m.get("n", 0) for m in metrics.values()), default=0)
        pk = [nmax] if nmax > 1 else []
        header += [f"pass@{k}" for k in pk] + [f"maj@{nmax}"]
    for ds, m in metrics.items():
        p, mj = _k_int(m.get("pass@k", {})), _k_int(m.get("maj@k", {}))
        row = [ds, str(m["num_problems"]), str(m["n"]), f"{100 * m['pass@1']:.1f}"]
        row += [f"{100 * p[k]:.1f}" if k in p else "-" for k in pk]
        mk = all_k if columns == "all" else [m["n"]]
        for k in mk:
            row.append(f"{100 * mj[k][0]:.1f} ± {100 * mj[k][1]:.1f}" if k in mj else "-")
        if columns != "all":
            row = row[: 4 + len(pk)] + [row[-1]]
        rows.append(row)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def make_results(
    records: list[dict],
    metrics: dict,
    model: str,
    label: str | None = None,
    sampling: dict | None = None,
    prompt: dict | None = None,
    grading: dict | None = None,
    throughput: float | None = None,
    throughput_source: str = "measured",
    generation: dict | None = None,
) -> dict:
    """Assemble the results dictionary (see the module docstring for its fields)."""
    return {
        "format": FORMAT,
        "model": str(model),
        "label": label or Path(str(model).rstrip("/")).name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sampling": sampling or {},
        "prompt": prompt or {},
        "grading": grading or {},
        "throughput_tok_s": throughput,
        "throughput_source": throughput_source,
        "generation": generation or {},
        "metrics": metrics,
        "problems": records,
    }


def save_results(results: dict, path: str | Path) -> Path:
    """Write the results JSON (UTF-8, indented)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def load_results(path: str | Path) -> dict:
    """Read a results JSON, turning the ``k`` keys of the metrics back into integers."""
    res = json.loads(Path(path).read_text(encoding="utf-8"))
    if res.get("format") != FORMAT:
        raise ValueError(f"{path}: not an m1_eval results file (format {res.get('format')!r})")
    for m in res.get("metrics", {}).values():
        m["pass@k"] = _k_int(m.get("pass@k", {}))
        m["maj@k"] = _k_int(m.get("maj@k", {}))
    return res


def rescore(
    results: dict,
    regrade: bool = True,
    timeout_s: float | None = None,
    require_think: bool | None = None,
    ks: list[int] | None = None,
    repeats: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Re-grade (optionally) and recompute the metrics of a loaded results dict, offline; returns it."""
    g = results.setdefault("grading", {})
    if timeout_s is not None:
        g["timeout_s"] = timeout_s
    if require_think is not None:
        g["require_think"] = require_think
    if regrade:
        grade_records(
            results["problems"], g.get("timeout_s", DEFAULT_TIMEOUT_S), g.get("require_think", False), progress
        )
    results["metrics"] = compute_metrics(results["problems"], ks, repeats, seed)
    return results
