"""Held-out top-1 agreement of several distillation runs on one plot, each run a chain of stages.

A stage is one ``distill_gpu.py`` output folder (``distill_eval.csv`` + ``summary.json``); a run
continued with ``--init-student`` is the list of its stages, and its curve goes on where the last
stage ended (x: KL-stage minutes, summed over the stages; the alignment before the first is not
counted)::

    python benchmarks/plot_distill_runs.py --out benchmarks/results/distill_runs.png \\
        --run "even layers=benchmarks/results/distill_gpu" \\
        --run "auto layers=$R/select_align_kl,$R/more_1"    # R=benchmarks/results/distill_gpu_auto
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from results_io import pyplot


def chain_points(stages: list[Path]) -> list[tuple[float, float]]:
    """``(KL minutes so far, held-out top-1)`` over the stages of one run, in order.

    Each stage's evaluation at step s is placed at ``(s - start) / steps * train_seconds`` of that stage
    (its steps ran at a steady rate) plus the minutes of the stages before it, where ``start`` is the step
    a ``--state`` stage resumed from (its ``resumed`` evaluation; 0 otherwise); a continued stage's own
    first evaluation repeats the previous end point and is skipped, as is the converted student's
    (``init``) when the stage aligned it first: the curve starts at the aligned student.
    """
    points, offset = [], 0.0
    for k, stage in enumerate(stages):
        summary = json.loads((stage / "summary.json").read_text())
        minutes, steps = summary["train_seconds"] / 60, max(summary["steps"], 1)
        with open(stage / "distill_eval.csv") as f:
            rows = list(csv.DictReader(f))
        aligned = any(r["stage"] == "aligned" for r in rows)
        start = int(rows[0]["step"]) if rows and rows[0]["stage"] == "resumed" else 0
        for row in rows:
            step = int(row["step"])
            if (k > 0 and step == start) or (aligned and row["stage"] == "init"):
                continue
            points.append((offset + (step - start) / steps * minutes, float(row["top1"])))
        offset += minutes
    return points


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=DIR[,DIR...]", help="one run's stages")
    p.add_argument("--target", type=float, default=0.90, help="horizontal target line (default 0.90)")
    p.add_argument("--title", default="Distilling SmolLM2-135M-Instruct into M1 hybrids (H100)")
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, spec in enumerate(args.run):
        label, _, dirs = spec.partition("=")
        pts = chain_points([Path(d) for d in dirs.split(",")])
        label = f"{label} (end {100 * pts[-1][1]:.1f}%)"
        style = "-" if i < 10 else "--"  # the colour cycle has ten colours: later runs dashed, never look-alikes
        ax.plot([x for x, _ in pts], [100 * y for _, y in pts], style, marker=".", label=label)
    ax.axhline(100 * args.target, color="k", ls=":", lw=1, label=f"target {100 * args.target:.0f}%")
    ax.set_xlabel("KL-stage minutes (summed over continued stages)")
    ax.set_ylabel("held-out top-1 agreement (%), 200 MATH500 solutions")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
