"""Test-time scaling under a generation-time budget (the M1 paper's Figures 3 and 4).

Both curves turn a run's generated lengths into seconds with one number, the model's decode
throughput ``T`` in tokens/s at its best batch size (measured by the run, or given with
``--throughput`` from a benchmark). Time is **seconds per problem** at that throughput:

- **More samples (Figure 3)**: for ``k = 1, 2, 4, ... n``, ``seconds(k) = k * L / T`` where ``L`` is the mean
  generated length (tokens) over all samples of the dataset; accuracy is maj@k (mean over ``R`` draws).
- **Longer generation (Figure 4)**: for limits ``B`` (powers of two up to the run's ``max_tokens``),
  a sample counts as correct only if it was correct **and** finished within ``B`` tokens (a longer
  one would have been cut before its final answer); ``seconds(B) = mean(min(len, B)) / T``;
  accuracy is pass@1 (mean over samples). This is a lower bound on a real run at limit ``B``.

A faster model (larger ``T``) shifts its whole curve left: at a fixed budget it can afford more
samples or longer chains.

Example::

    >>> from m1_eval.scaling import sample_budget_curve
    >>> recs = [{"dataset": "d", "samples": [{"correct": True, "label": 0, "num_tokens": 100},
    ...                                       {"correct": False, "label": 1, "num_tokens": 300}]}]
    >>> [(round(s, 1), a) for s, a, _ in sample_budget_curve(recs, throughput=100.0)]
    [(2.0, 0.48), (4.0, 0.5)]
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def _flat(records: list[dict]) -> list[dict]:
    return [s for r in records for s in r["samples"]]


def sample_budget_curve(
    records: list[dict], throughput: float, ks: list[int] | None = None, repeats: int = 100, seed: int = 0
) -> list[tuple[float, float, float]]:
    """Figure 3: ``[(seconds per problem, maj@k mean, maj@k std)]`` for ``k`` in ``ks`` (default 1, 2, 4.. n)."""
    from m1_eval.metrics import default_ks
    from m1_eval.metrics import maj_at_k

    if not records or throughput <= 0:
        return []
    n = min(len(r["samples"]) for r in records)
    mean_len = float(np.mean([s["num_tokens"] for s in _flat(records)]))
    labels = [[int(s.get("label", 0 if s["correct"] else -1)) for s in r["samples"]] for r in records]
    out = []
    for k in ks or default_ks(n):
        if 1 <= k <= n:
            m, sd = maj_at_k(labels, k, repeats, seed)
            out.append((k * mean_len / throughput, m, sd))
    return out


def length_budget_curve(
    records: list[dict], throughput: float, limits: list[int] | None = None
) -> list[tuple[float, float, int]]:
    """Figure 4: ``[(seconds per sample, pass@1, limit)]`` for generation limits ``limits``."""
    samples = _flat(records)
    if not samples or throughput <= 0:
        return []
    lens = np.array([s["num_tokens"] for s in samples], dtype=np.float64)
    ok = np.array([bool(s["correct"]) for s in samples])
    if limits is None:
        top = int(lens.max()) if lens.size else 1
        limits, b = [], 1
        while b < top:
            if b >= max(1, top // 64):
                limits.append(b)
            b *= 2
        limits.append(top)
    out = []
    for b in limits:
        acc = float(np.mean(ok & (lens <= b)))
        secs = float(np.mean(np.minimum(lens, b))) / throughput
        out.append((secs, acc, int(b)))
    return out


def plot_scaling(runs: list[dict], out_png: str | Path, datasets: list[str] | None = None, repeats: int = 100) -> Path:
    """Accuracy vs seconds for several runs (models) on one PNG: one row per dataset, two panels each.

    ``runs`` are results dicts (:func:`m1_eval.report.load_results`), each with ``throughput_tok_s``.

    Example::

        >>> from m1_eval.report import load_results                               # doctest: +SKIP
        >>> plot_scaling([load_results("m1.json"), load_results("llama.json")], "tts.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    by_run = []
    for run in runs:
        d = defaultdict(list)
        for r in run["problems"]:
            d[r["dataset"]].append(r)
        by_run.append(d)
    names = datasets or list(dict.fromkeys(ds for d in by_run for ds in d))
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, ds in enumerate(names):
        ax3, ax4 = axes[row]
        for run, d in zip(runs, by_run):
            recs, tput = d.get(ds), run.get("throughput_tok_s") or 0.0
            if not recs or tput <= 0:
                continue
            label = f"{run.get('label', run.get('model'))} ({tput:.0f} tok/s)"
            c3 = sample_budget_curve(recs, tput, repeats=repeats)
            x, y, e = (np.array(v) for v in zip(*c3))
            line = ax3.plot(x, 100 * y, marker="o", label=label)[0]
            ax3.fill_between(x, 100 * (y - e), 100 * (y + e), alpha=0.15, color=line.get_color())
            for xi, yi, k in zip(x, y, [round(v * tput / np.mean([s["num_tokens"] for s in _flat(recs)])) for v in x]):
                ax3.annotate(f"k={k}", (xi, 100 * yi), fontsize=7, textcoords="offset points", xytext=(2, 3))
            c4 = length_budget_curve(recs, tput)
            x4, y4, _ = zip(*c4)
            ax4.plot(x4, 100 * np.array(y4), marker="s", label=label)
        ax3.set(title=f"{ds}: more samples (maj@k)", xlabel="generation time per problem (s)", ylabel="accuracy (%)")
        ax4.set(
            title=f"{ds}: longer generation (pass@1)", xlabel="generation time per sample (s)", ylabel="accuracy (%)"
        )
        for ax in (ax3, ax4):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
