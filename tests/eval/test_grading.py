r"""The grader on hand-written answer pairs, hostile inputs, thread and process safety."""

import multiprocessing as mp
import threading
import time

import pytest

from m1_eval.grading import answer_labels
from m1_eval.grading import compute_score
from m1_eval.grading import extract_boxed
from m1_eval.grading import get_pool
from m1_eval.grading import grade
from m1_eval.grading import grade_many
from m1_eval.grading import is_equiv
from m1_eval.grading import normalize_answer


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the grader workers once: their start-up (importing math-verify) is not part of the time limit."""
    assert grade(r"\boxed{\sqrt{4}}", "2", timeout_s=120.0)
    yield


def B(s: str) -> str:
    """A response that ends with the boxed answer ``s``."""
    return f"Some reasoning... so the final answer is $\\boxed{{{s}}}$."


# (response, gold, expected)
PAIRS = [
    # integers, signs, leading zeros, thousands separators, floats from AMC
    (B("42"), "42", True),
    (B("43"), "42", False),
    (B("-7"), "-7", True),
    (B("7"), "-7", False),
    (B("025"), "25", True),
    (B("27"), 27.0, True),
    (B("27.0"), "27", True),
    (B("27.5"), "27", False),
    (B("1,000"), "1000", True),
    (B("1{,}000"), "1000", True),
    (B("10000"), "1000", False),
    (B("+5"), "5", True),
    (B("0"), "0", True),
    (B("-0"), "0", True),
    # fractions
    (B(r"\frac{1}{2}"), "0.5", True),
    (B(r"\dfrac{1}{2}"), r"\frac12", True),
    (B(r"\tfrac{3}{4}"), "0.75", True),
    (B(r"\frac{3}{4}"), r"\frac{4}{3}", False),
    (B("1/2"), r"\frac{1}{2}", True),
    (B(r"\frac{2}{4}"), r"\frac{1}{2}", True),
    (B(r"-\frac{1}{3}"), r"\frac{-1}{3}", True),
    (B(r"\frac{1}{3}"), r"-\frac{1}{3}", False),
    (B(r"\frac{10}{3}"), r"\frac{10}{3}", True),
    (B(r"\dfrac{14}{3}"), r"\frac{14}{3}", True),
    (B(r"\frac{7}{2}"), "3.5", True),
    (B(r"\frac{1}{7}"), "0.14", False),
    # mixed numbers
    (B(r"2\frac{1}{2}"), r"\frac{5}{2}", True),
    (B(r"3\dfrac{1}{4}"), "3.25", True),
    (B(r"1\frac{1}{3}"), r"\frac{4}{3}", True),
    (B(r"2\frac{1}{2}"), "1", False),
    # radicals
    (B(r"2\sqrt{2}"), r"\sqrt{8}", True),
    (B(r"\sqrt{8}"), r"2\sqrt2", True),
    (B(r"3\sqrt{3}"), r"\sqrt{27}", True),
    (B(r"\frac{\sqrt{3}}{2}"), r"\frac{\sqrt3}{2}", True),
    (B(r"\frac{1}{\sqrt{2}}"), r"\frac{\sqrt{2}}{2}", True),
    (B(r"\sqrt{2}"), r"\sqrt{3}", False),
    (B(r"2+\sqrt{3}"), r"\sqrt{3}+2", True),
    (B(r"4\sqrt{2}"), r"2\sqrt{2}", False),
    (B(r"\sqrt[3]{8}"), "2", True),
    (B(r"5\sqrt{5}"), r"\sqrt{125}", True),
    # pi
    (B(r"\pi"), r"\pi", True),
    (B(r"2\pi"), r"2 \pi", True),
    (B(r"\frac{\pi}{2}"), r"\pi/2", True),
    (B(r"\frac{\pi}{3}"), r"\frac{\pi}{2}", False),
    (B(r"4\pi"), r"4 \pi", True),
    (B(r"16\pi"), r"16 \pi", True),
    (B(r"\pi r^2"), r"\pi r^{2}", True),
    (B("3.14"), r"\pi", False),
    (B(r"\frac{3\pi}{4}"), r"\frac{3 \pi}{4}", True),
    (B(r"-\frac{\pi}{4}"), r"\frac{\pi}{4}", False),
    # intervals
    (B("[1,2)"), "[1,2)", True),
    (B("(1,2]"), "[1,2)", False),
    (B(r"(-\infty, 3)"), r"(-\infty,3)", True),
    (B(r"(-\infty, 3]"), r"(-\infty,3)", False),
    (B(r"[0,\infty)"), r"[0, \infty)", True),
    (B(r"(-\infty,-2)\cup(2,\infty)"), r"(-\infty, -2) \cup (2, \infty)", True),
    (B(r"(2,\infty)"), r"(-\infty,-2)\cup(2,\infty)", False),
    (B(r"\left[ -1, \frac{1}{2} \right)"), r"[-1, \frac12)", True),
    # sets and lists of solutions
    (B(r"\{1,2,3\}"), r"\{3,2,1\}", True),
    (B(r"\{1,2\}"), r"\{1,2,3\}", False),
    (B("1, 2"), "2, 1", True),
    (B("3, 5"), "5, 3", True),
    (B("-2, 3"), "3, -2", True),
    (B("1, 2"), "1, 3", False),
    (B(r"1, -1, 2"), r"-1, 1, 2", True),
    # tuples, points, vectors
    (B("(1,2)"), "(1,2)", True),
    (B("(2,1)"), "(1,2)", False),
    (B(r"\left( 3, \frac{\pi}{2} \right)"), r"\left( 3, \frac{\pi}{2} \right)", True),
    (B(r"(3, \frac{\pi}{2})"), r"\left( 3, \frac{\pi}{2} \right)", True),
    (B(r"(3, \pi)"), r"\left( 3, \frac{\pi}{2} \right)", False),
    (B("(1, 2, 3)"), "(1,2,3)", True),
    (B("(1, 3, 2)"), "(1,2,3)", False),
    (B("(3,2),(-3,2)"), "(-3,2),(3,2)", True),
    (B(r"(\frac{1}{2}, 0)"), "(0.5, 0)", True),
    # degrees
    (B(r"90^\circ"), "90", True),
    (B(r"90^{\circ}"), "90", True),
    (B("90°"), "90", True),
    (B(r"45^\circ"), "90", False),
    (B(r"120^\circ"), r"120^{\circ}", True),
    (B(r"30^\circ"), "30", True),
    # percent
    (B(r"10\%"), "10", True),
    (B("25%"), "25", True),
    (B(r"50\%"), r"50\%", True),
    (B(r"40\%"), "50", False),
    # units and text
    (B(r"5 \text{ cm}"), "5", True),
    (B(r"12\text{ inches}"), "12", True),
    (B(r"\$18"), "18", True),
    (B(r"18 \text{ dollars}"), "18", True),
    (B(r"7 \text{ cm}"), "5", False),
    (B(r"\text{Monday}"), "Monday", True),
    (B(r"\text{Tuesday}"), "Monday", False),
    (B(r"\text{(A)}"), "A", True),
    (B(r"\text{(C)}"), r"\text{(C)}", True),
    (B("B"), r"\text{(C)}", False),
    (B(r"\text{even}"), r"\text{even}", True),
    (B(r"\text{odd}"), r"\text{even}", False),
    (B(r"6 \text{ square units}"), "6", True),
    (B(r"40 \mbox{ mph}"), "40", True),
    # scientific notation
    (B(r"1.5 \times 10^{3}"), "1500", True),
    (B(r"2 \times 10^5"), "200000", True),
    (B(r"3 \times 10^{-2}"), "0.03", True),
    (B(r"1.5\times10^{4}"), "1500", False),
    (B("1e3"), "1000", True),
    # equations and assignments
    (B("x=3"), "3", True),
    (B("x = 3"), "3", True),
    (B("x=4"), "3", False),
    (B("3"), "x=3", True),
    (B("y=2x+1"), "y = 2x + 1", True),
    (B("y=2x-1"), "y = 2x + 1", False),
    (B("2x+1"), "y=2x+1", True),
    (B("k+4"), "n=k+4", True),
    (B("x^2+2x+1"), "(x+1)^2", True),
    (B("x^2+1"), "(x+1)^2", False),
    (B(r"\frac{n(n+1)}{2}"), r"\frac{n^2+n}{2}", True),
    (B(r"\frac{n(n+1)(2 n+1)}{6}"), r"\frac{2n^3+3n^2+n}{6}", True),
    (B("2n+1"), "2n-1", False),
    (B("a=2, b=3"), "a=2, b=3", True),
    # matrices
    (B(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"), r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
    (B(r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}"), r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", False),
    (B(r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}"), r"\begin{pmatrix}1&0\\0&1\end{pmatrix}", True),
    (B(r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"), r"\begin{pmatrix}1&2\\4&3\end{pmatrix}", False),
    (B(r"\begin{pmatrix} \frac{1}{2} \\ -1 \end{pmatrix}"), r"\begin{pmatrix} 0.5 \\ -1 \end{pmatrix}", True),
    (B(r"\begin{bmatrix} 1 \\ 2 \end{bmatrix}"), r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
    # other expressions
    (B(r"\infty"), r"\infty", True),
    (B(r"-\infty"), r"\infty", False),
    (B(r"e^{2}"), r"e^2", True),
    (B(r"\log_2 8"), "3", True),
    (B(r"\binom{5}{2}"), "10", True),
    (B("5!"), "120", True),
    (B(r"2^{10}"), "1024", True),
    (B(r"\cos\theta"), r"\cos \theta", True),
    (B(r"\sin x"), r"\cos x", False),
    (B("0.333"), r"\frac{1}{3}", False),
    (B(r"\frac{a+b}{2}"), r"\frac{b+a}{2}", True),
    (B(r"ab"), "ba", True),
    (B("i"), "i", True),
    (B("1+i"), "1 + i", True),
    (B("1-i"), "1+i", False),
    # boxed variants: fbox, nesting, several boxes, boxed ground truth
    (r"\fbox{12}", "12", True),
    (r"first \boxed{3} then corrected \boxed{4}", "4", True),
    (r"first \boxed{4} then corrected \boxed{3}", "4", False),
    (r"\boxed{\frac{\sqrt{\frac{1}{2}}}{2}}", r"\frac{\sqrt{2}}{4}", True),
    (r"\boxed {7}", "7", True),
    (r"\boxed 7", "7", True),
    (r"\boxed{5}.", r"\boxed{5}", True),
    (r"answer: \boxed{\{1,2\}}", r"\{1,2\}", True),
    (r"\boxed{\text{(B)}}", "B", True),
    # missing, empty and malformed boxes
    ("The answer is 42.", "42", False),
    ("", "42", False),
    (r"\boxed{}", "42", False),
    (r"\boxed{ }", "42", False),
    (r"\boxed{42", "42", False),
    (r"\boxed{4}2}", "42", False),
    (r"\boxed", "42", False),
    (r"\boxed{\frac{1}{2}", r"\frac12", False),
    (r"\boxed{)(}", "42", False),
    (r"\boxed{\\\\}", "42", False),
    (r"\boxed{???}", "42", False),
    (r"\boxed{\frac{}{}}", "1", False),
    (r"\boxed{1/0}", "1", False),
    (r"\boxed{}}}}}", "1", False),
    (r"\boxed{\undefinedmacro{3}}", "42", False),
    ("42", "42", False),  # no box: no answer (by design)
]


def test_enough_pairs():
    assert len(PAIRS) >= 150
    assert sum(e for *_, e in PAIRS) >= 60 and sum(not e for *_, e in PAIRS) >= 50


def test_pairs_sequential_sample():
    bad = [(r, g, e) for r, g, e in PAIRS[::8] if grade(r, g, timeout_s=10.0) is not e]
    assert not bad, "\n".join(f"{e!s:5} expected: gold={g!r} response={r!r}" for r, g, e in bad)


def test_pairs_batched_agree_and_fast():
    t0 = time.perf_counter()
    got = grade_many([r for r, _, _ in PAIRS], [g for _, g, _ in PAIRS], timeout_s=10.0)
    dt = time.perf_counter() - t0
    bad = [(r, g, e) for (r, g, e), v in zip(PAIRS, got) if v is not e]
    assert not bad, "\n".join(f"{e!s:5} expected: gold={g!r} response={r!r}" for r, g, e in bad)
    assert dt < 60, dt


def test_extract_boxed():
    assert extract_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed(r"\boxed{\{1\}}") == r"\{1\}"
    assert extract_boxed(r"\boxed{1} \fbox{2}") == "2"
    assert extract_boxed(r"\boxed{1} \boxed{2") == "1"  # the unbalanced last box falls back to the earlier one
    assert extract_boxed(r"\boxedx{3}") is None
    assert extract_boxed("") is None and extract_boxed(None) is None


def test_normalize_and_think():
    assert normalize_answer(r"\left( 1, 2 \right)") == "( 1, 2 )"
    assert normalize_answer(r"$90^\circ$") == "90"
    assert normalize_answer(3.0) == "3"
    assert grade(r"<think>\boxed{1}</think> so \boxed{2}", "2", require_think=True)
    assert not grade(r"<think>\boxed{2} ...", "2", require_think=True)  # no </think>
    assert not grade(r"\boxed{2}</think> nothing boxed after", "2", require_think=True)
    assert compute_score("x", r"\boxed{10}", "10") == 1.0
    assert compute_score("x", r"\boxed{10}", "10", {"require_think": True}) == 0.0


def test_answer_labels_classes():
    labels = answer_labels(
        ["3", None, "4", "4.0", r"\frac{8}{2}", "5", r"\frac{6}{2}"], [True, False, False, False, False, False, True]
    )
    assert labels == [0, -1, 1, 1, 1, 2, 0]


@pytest.mark.parametrize(
    "hostile",
    [
        r"9^{9^{9^{9^{9}}}}",  # sympy would evaluate this forever
        "9" * 5000,  # huge literal
        r"\frac{1}{" * 2000 + "1" + "}" * 2000,  # very deep nesting
        "(" * 3000 + "1" + ")" * 3000,
        "x" * 100_000,
    ],
)
def test_hostile_answer_returns_quickly(hostile):
    t0 = time.perf_counter()
    assert grade(f"\\boxed{{{hostile}}}", "1", timeout_s=1.0) is False
    assert time.perf_counter() - t0 < 1.0 + 2.0  # the limit plus killing the stuck worker


def test_pool_kills_a_stuck_worker(monkeypatch):
    import m1_eval.grading as grading

    monkeypatch.setattr(grading, "SOFT_FRACTION", 0.0)  # no in-worker timer: force the parent's hard kill
    before = get_pool().timeouts
    t0 = time.perf_counter()
    assert grade(r"\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout_s=0.5) is False
    assert time.perf_counter() - t0 < 0.5 + 2.0
    assert get_pool().timeouts == before + 1
    assert grade(r"\boxed{2\sqrt{2}}", r"\sqrt8", timeout_s=60.0)  # the warm spare answers


def test_huge_response_text_is_cheap():
    text = "blah " * 400_000 + r"\boxed{7}"
    t0 = time.perf_counter()
    assert grade(text, "7")
    assert time.perf_counter() - t0 < 2.0


def test_thread_safety():
    items = [(B(r"\frac{1}{2}"), "0.5", True), (B(r"2\sqrt2"), r"\sqrt8", True), (B("(2,1)"), "(1,2)", False)] * 8
    results = [None] * len(items)

    def work(i):
        r, g, _ = items[i]
        results[i] = grade(r, g, timeout_s=30.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [e for *_, e in items]


def _grade_in_child(q):
    import os

    os.environ["M1_EVAL_GRADER_WORKERS"] = "1"
    os.environ["M1_EVAL_GRADER_SPARE"] = "0"
    q.put(grade(r"\boxed{\dfrac{3}{6}}", "0.5", timeout_s=30.0))


def test_many_processes():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_grade_in_child, args=(q,)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert got == [True, True]


def test_math500_self_consistency_speed():
    from m1_eval.datasets import load_dataset

    probs = load_dataset("math500")
    t0 = time.perf_counter()
    got = grade_many([f"\\boxed{{{p.answer}}}" for p in probs], [p.answer for p in probs])
    dt = time.perf_counter() - t0
    assert all(got), [p.answer for p, ok in zip(probs, got) if not ok]
    assert dt < 10, dt
    assert is_equiv("7", "7")
