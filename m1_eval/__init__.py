"""m1_eval: math-benchmark evaluation for M1 hybrids and Transformer baselines.

Datasets (MATH500, GSM8K, AIME24/25, AMC23, OlympiadBench, any JSONL), chat-template prompting, vLLM
sampling, a hang-proof math-verify grader (also the VeRL reward), pass@k / maj@k metrics, and
accuracy-vs-generation-time curves. Heavy dependencies load lazily.

Example::

    >>> from m1_eval import grade, pass_at_k
    >>> grade(r"so \\boxed{42}", "42"), pass_at_k(2, 1, 1)
    (True, 0.5)
"""

__all__ = [
    "compute_score",
    "evaluate",
    "extract_boxed",
    "grade",
    "grade_many",
    "is_equiv",
    "maj_at_k",
    "pass_at_k",
    "run_evaluation",
]


_HOME = {
    "compute_score": "grading",
    "extract_boxed": "grading",
    "grade": "grading",
    "grade_many": "grading",
    "is_equiv": "grading",
    "maj_at_k": "metrics",
    "pass_at_k": "metrics",
    "evaluate": "runner",
    "run_evaluation": "runner",
}


def __getattr__(name: str):
    """Lazy exports: ``import m1_eval`` stays cheap (numpy, vLLM and math-verify load on use)."""
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"m1_eval.{_HOME[name]}"), name)
    raise AttributeError(f"module 'm1_eval' has no attribute {name!r}")
