"""The GRPO reward: loaded through VeRL's own custom-reward loader, graded by the evaluation grader."""

import time

import pytest


@pytest.fixture(scope="module")
def reward_fn():
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://verl_m1.reward",
                    "name": "compute_score",
                    "reward_kwargs": {"timeout_s": 2.0},
                }
            }
        }
    )
    return get_custom_reward_fn(cfg)


@pytest.mark.parametrize(
    "response, truth, want",
    [
        (r"First 2+3=5, so the answer is \boxed{5}.", "5", 1.0),
        (r"\boxed{\dfrac{1}{2}}", "0.5", 1.0),
        (r"The answer is \boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        (r"earlier \boxed{7}, corrected: \boxed{5}", "5", 1.0),  # the last box counts
        (r"\boxed{5} ... on second thought \boxed{7}", "5", 0.0),
        (r"The answer is \boxed{6}.", "5", 0.0),
        ("The answer is 5.", "5", 0.0),  # no box
        (r"\boxed{}", "5", 0.0),  # empty box
        (r"\boxed{5", "5", 0.0),  # unbalanced
        ("", "5", 0.0),
    ],
    ids=["correct", "frac", "sqrt", "last-box", "last-box-wrong", "wrong", "missing", "empty", "unbalanced", "blank"],
)
def test_reward_cases(reward_fn, response, truth, want):
    assert reward_fn(data_source="math", solution_str=response, ground_truth=truth, extra_info={}) == want


def test_pathological_answer_returns_within_limit(reward_fn):
    start = time.monotonic()
    got = reward_fn(data_source="math", solution_str=r"\boxed{9^{9^{9^{9^{9^{9}}}}}}", ground_truth="1")
    assert got == 0.0
    assert time.monotonic() - start < 2.0 + 3.0  # the 2 s limit plus worker restart slack


def test_huge_response_is_cheap(reward_fn):
    start = time.monotonic()
    text = "x" * 200_000 + r" \boxed{" + "1+" * 2000 + "1}"
    assert reward_fn(data_source="math", solution_str=text, ground_truth="5") == 0.0
    assert time.monotonic() - start < 5.0


def test_m1_think_rule():
    from verl_m1.reward import compute_score
    from verl_m1.reward import compute_score_m1

    good = r"<think>try \boxed{4}</think> So \boxed{5}"
    assert compute_score_m1("math", good, "5") == 1.0
    assert compute_score_m1("math", r"<think>... \boxed{5}", "5") == 0.0  # no </think>: 0
    assert compute_score_m1("math", r"\boxed{5}", "5") == 0.0
    assert compute_score("math", r"\boxed{5}", "5") == 1.0  # default rule: no </think> needed
    assert compute_score("math", r"\boxed{5}", "5", extra_info={"require_think": True}) == 0.0
    assert compute_score("math", r"\boxed{5}", ["4", "5"]) == 1.0  # several accepted answers
    assert compute_score("math", None, "5") == 0.0
