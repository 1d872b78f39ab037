"""GRPO reward for VeRL: the evaluation grader, 1.0 for a correct last ``\\boxed{}`` answer, else 0.0.

Point VeRL at it with::

    reward.custom_reward_function.path=pkg://verl_m1.reward
    reward.custom_reward_function.name=compute_score        # or compute_score_m1 (the released M1 rule)

Options come from ``reward.custom_reward_function.reward_kwargs`` (they override call-time kwargs):
``require_think`` (bool: grade only the text after the last ``</think>``, the released M1/DeepScaleR
rule; a response without ``</think>`` scores 0) and ``timeout_s`` (per-answer time limit of the
math-verify step, default :data:`m1_eval.grading.DEFAULT_TIMEOUT_S`). ``extra_info["require_think"]``
also switches the M1 rule on per sample. Grading never raises and never hangs: math-verify runs in
worker processes that are killed at the limit (the answer then scores 0).

Example::

    >>> from verl_m1.reward import compute_score
    >>> compute_score("math", r"so \\boxed{\\frac{1}{2}}", "0.5")
    1.0
    >>> compute_score("math", "no box here", "0.5")
    0.0
"""

from __future__ import annotations

from m1_eval.grading import DEFAULT_TIMEOUT_S
from m1_eval.grading import grade


def compute_score(
    data_source: str | None,
    solution_str: str,
    ground_truth,
    extra_info: dict | None = None,
    require_think: bool | None = None,
    timeout_s: float | None = None,
    **kwargs,
) -> float:
    """VeRL custom reward function: 1.0 if ``solution_str``'s last boxed answer equals ``ground_truth``.

    ``require_think=None`` defers to ``extra_info["require_think"]`` (default off). ``data_source`` and
    extra keyword arguments (VeRL passes e.g. ``reward_router_address``) are accepted and ignored.
    """
    if require_think is None:
        require_think = bool((extra_info or {}).get("require_think", False))
    if isinstance(ground_truth, (list, tuple)):  # some datasets store several accepted answers
        return max(
            (compute_score(data_source, solution_str, g, extra_info, require_think, timeout_s) for g in ground_truth),
            default=0.0,
        )
    if solution_str is None or ground_truth is None:
        return 0.0
    ok = grade(
        str(solution_str),
        ground_truth,
        timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s),
        require_think=bool(require_think),
    )
    return 1.0 if ok else 0.0


def compute_score_m1(
    data_source: str | None,
    solution_str: str,
    ground_truth,
    extra_info: dict | None = None,
    timeout_s: float | None = None,
    **kwargs,
) -> float:
    """The released M1 reward: as :func:`compute_score` with ``require_think=True`` (answer after ``</think>``)."""
    kwargs.pop("require_think", None)
    return compute_score(data_source, solution_str, ground_truth, extra_info, True, timeout_s)


__all__ = ["compute_score", "compute_score_m1"]
