"""Accuracy metrics over ``n`` samples per problem: unbiased pass@k, pass@1 (mean over samples), maj@k.

Definitions (per problem with ``n`` samples of which ``c`` are correct; dataset values are means over
problems):

- **pass@k** (Chen et al. 2021, unbiased): ``1 - C(n-c, k) / C(n, k)``, the probability that at least
  one of ``k`` samples drawn without replacement from the ``n`` is correct, computed in the
  numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``. Requires ``k <= n``.
- **pass@1** = ``c / n``: the mean accuracy over the ``n`` samples (what the M1 paper reports).
- **maj@k**: draw ``k`` of the ``n`` samples without replacement, take the majority answer, where answers
  are grouped into equivalence classes (:func:`m1_eval.grading.answer_labels`: class 0 = correct answers,
  ``-1`` = no answer, which does not vote). **Tie rule**: when several classes share the top count the
  draw scores ``1/t`` if the correct class is one of the ``t`` tied classes, else 0 (the expected score of
  a uniformly random tie-break; deterministic). A draw where no sample has an answer scores 0. The
  draw is repeated ``R`` times (default 100) with a seeded generator; the dataset accuracy of each
  repetition is the mean over problems, and maj@k is reported as the mean and standard deviation
  (population, ``ddof=0``) over the ``R`` repetitions. :func:`maj_at_k_exact` gives the exact expectation
  over all ``C(n, k)`` subsets (small cases only).

Example::

    >>> from m1_eval.metrics import pass_at_k, maj_at_k
    >>> round(pass_at_k(4, 1, 2), 4)
    0.5
    >>> mean, std = maj_at_k([[0, 0, 1, -1]], k=4)
    >>> mean, std
    (1.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` correct (``1 <= k <= n``).

    Example::

        >>> pass_at_k(10, 0, 5), pass_at_k(10, 6, 5), round(pass_at_k(10, 3, 1), 3)
        (0.0, 1.0, 0.3)
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n], got c={c}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Dataset pass@k: mean over problems (``correct[i][j]``: sample ``j`` of problem ``i``)."""
    if not correct:
        return 0.0
    return float(np.mean([pass_at_k(len(c), int(sum(c)), k) for c in correct]))


def _draw_score(counts: np.ndarray) -> float:
    """Score of one draw from per-class vote counts (index 0 = the correct class)."""
    top = counts.max() if counts.size else 0
    if top == 0:
        return 0.0
    if counts[0] != top:
        return 0.0
    return 1.0 / int((counts == top).sum())


def _counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    votes = labels[labels >= 0]
    return np.bincount(votes, minlength=num_classes)


def maj_at_k_exact(labels: Sequence[int], k: int) -> float:
    """Exact expected maj@k score of one problem over all ``C(n, k)`` subsets (small ``n`` only).

    Example::

        >>> maj_at_k_exact([0, 1, 1], 1), maj_at_k_exact([0, 1], 2)
        (0.3333333333333333, 0.5)
    """
    lab = np.asarray(labels, dtype=np.int64)
    n = len(lab)
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got k={k}, n={n}")
    if math.comb(n, k) > 2_000_000:
        raise ValueError("too many subsets for the exact maj@k; use maj_at_k")
    nc = int(lab.max(initial=0)) + 1
    scores = [_draw_score(_counts(lab[list(s)], nc)) for s in combinations(range(n), k)]
    return float(np.mean(scores))


def maj_at_k_scores(labels: Sequence[int], k: int, repeats: int = 100, rng: np.random.Generator | None = None):
    """``repeats`` sampled maj@k draw scores of one problem (array of shape ``[repeats]``)."""
    lab = np.asarray(labels, dtype=np.int64)
    n = len(lab)
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got k={k}, n={n}")
    rng = rng if rng is not None else np.random.default_rng(0)
    nc = int(lab.max(initial=0)) + 1
    if k == n:  # every draw is the whole set
        return np.full(repeats, _draw_score(_counts(lab, nc)))
    idx = np.argsort(rng.random((repeats, n)), axis=1)[:, :k]  # k distinct indices per repeat
    return np.array([_draw_score(_counts(lab[row], nc)) for row in idx])


def maj_at_k(labels: Sequence[Sequence[int]], k: int, repeats: int = 100, seed: int = 0) -> tuple[float, float]:
    """Dataset maj@k: (mean, std) over ``repeats`` repetitions of the per-problem draws.

    ``labels[i]`` are the equivalence-class labels of problem ``i``'s samples (0 = correct, -1 = none).

    Example::

        >>> maj_at_k([[0, 1, 1], [0, 0, 2]], k=3)
        (0.5, 0.0)
    """
    if not labels:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    per = np.stack([maj_at_k_scores(lab, k, repeats, rng) for lab in labels])  # [P, R]
    acc = per.mean(axis=0)
    return float(acc.mean()), float(acc.std())


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, with ``n`` itself included."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def summarize(
    correct: Sequence[Sequence[bool]],
    labels: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] | None = None,
    repeats: int = 100,
    seed: int = 0,
) -> dict:
    """All metrics for one dataset: ``{"num_problems", "n", "pass@1", "pass@k": {k: v}, "maj@k": {k: [mean, std]}}``.

    Example::

        >>> s = summarize([[True, False], [False, False]], [[0, 1], [1, 1]])
        >>> s["pass@1"], s["pass@k"][2], s["maj@k"][2]
        (0.25, 0.5, [0.25, 0.0])
    """
    if not correct:
        return {"num_problems": 0, "n": 0, "pass@1": 0.0, "pass@k": {}, "maj@k": {}}
    n = min(len(c) for c in correct)
    ks = [k for k in (ks or default_ks(n)) if 1 <= k <= n]
    out = {
        "num_problems": len(correct),
        "n": n,
        "pass@1": float(np.mean([sum(c) / len(c) for c in correct])),
        "pass@k": {k: mean_pass_at_k(correct, k) for k in ks},
        "maj@k": {},
    }
    if labels is not None:
        out["maj@k"] = {k: list(maj_at_k(labels, k, repeats, seed)) for k in ks}
    return out
