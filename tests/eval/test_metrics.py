"""pass@k and maj@k against brute-force enumeration of all k-subsets."""

import math
import random
from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from m1_eval.metrics import default_ks
from m1_eval.metrics import maj_at_k
from m1_eval.metrics import maj_at_k_exact
from m1_eval.metrics import maj_at_k_scores
from m1_eval.metrics import mean_pass_at_k
from m1_eval.metrics import pass_at_k
from m1_eval.metrics import summarize


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def brute_maj(labels: list[int], k: int) -> float:
    """Documented tie rule: the correct class (0) among t tied top classes scores 1/t; -1 never votes."""
    total, count = 0.0, 0
    for s in combinations(range(len(labels)), k):
        votes = Counter(labels[i] for i in s if labels[i] >= 0)
        count += 1
        if not votes:
            continue
        top = max(votes.values())
        tied = [c for c, v in votes.items() if v == top]
        if 0 in tied:
            total += 1.0 / len(tied)
    return total / count


def test_pass_at_k_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        correct = [rng.random() < rng.random() for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(correct), k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12)


def test_pass_at_k_edges_and_stability():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)
    # large n: the product form agrees with exact big-integer binomials
    n, c, k = 1000, 7, 300
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)
    assert mean_pass_at_k([[True, False], [False, False]], 1) == 0.25


def test_maj_exact_matches_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 8)
        labels = [rng.choice([-1, 0, 0, 1, 2, 3]) for _ in range(n)]
        for k in range(1, n + 1):
            assert maj_at_k_exact(labels, k) == pytest.approx(brute_maj(labels, k), abs=1e-12), (labels, k)


def test_maj_sampled_converges_to_exact():
    rng = random.Random(2)
    problems = [[rng.choice([-1, 0, 1, 1, 2]) for _ in range(6)] for _ in range(5)]
    for k in (1, 2, 3, 5):
        exact = float(np.mean([brute_maj(p, k) for p in problems]))
        mean, std = maj_at_k(problems, k, repeats=4000, seed=3)
        assert mean == pytest.approx(exact, abs=0.02)
        assert std >= 0.0


def test_maj_tie_rule_and_no_answer():
    assert maj_at_k_exact([0, 1], 2) == 0.5  # one correct vs one wrong: tie -> 1/2
    assert maj_at_k_exact([0, 1, 2], 3) == pytest.approx(1 / 3)
    assert maj_at_k_exact([-1, -1], 2) == 0.0  # nobody answered
    assert maj_at_k_exact([0, -1, -1], 3) == 1.0  # missing answers do not vote
    assert maj_at_k_exact([1, 1, 0], 3) == 0.0
    # k == n: deterministic, zero std
    assert maj_at_k([[0, 0, 1], [1, 1, 0]], 3) == (0.5, 0.0)


def test_maj_draws_are_without_replacement():
    scores = maj_at_k_scores([0, 1, 2, 3], 4, repeats=10)  # all four distinct classes tie every time
    assert np.allclose(scores, 0.25)
    idx_rng = np.random.default_rng(0)
    s = maj_at_k_scores([0, 1, 1, 1], 2, repeats=5000, rng=idx_rng)
    # P(draw = {0, 1}) = 1/2 -> tie -> 1/2; P({1, 1}) = 1/2 -> 0; expectation 1/4
    assert s.mean() == pytest.approx(0.25, abs=0.02)


def test_summarize_and_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(6) == [1, 2, 4, 6]
    s = summarize([[True, False, False], [False, False, True]], [[0, 1, 1], [2, 3, 0]])
    assert s["num_problems"] == 2 and s["n"] == 3
    assert s["pass@1"] == pytest.approx(1 / 3)
    assert s["pass@k"][3] == 1.0
    assert s["maj@k"][3][0] == pytest.approx((0 + 1 / 3) / 2)
