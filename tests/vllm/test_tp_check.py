"""The comparison logic of ``benchmarks/vllm_tp_check.py`` (the engines themselves need 2 GPUs: run on the H200s)."""

from tests.testing import benchmark_script


def _script():
    return benchmark_script("vllm_tp_check")


def test_first_diff():
    first_diff = _script().first_diff
    assert first_diff([1, 2, 3], [1, 2, 3]) is None
    assert first_diff([1, 2, 3], [1, 5, 3]) == 1
    assert first_diff([1, 2], [1, 2, 3]) == 2  # a shorter continuation differs where it stops


def test_compare_flags_a_tp_mismatch_and_measures_logprobs():
    script = _script()
    n = len(script.PROMPT_LENS)
    hf = [[7, 8, 9]] * n
    tp1 = [{"tokens": [7, 8, 9], "logprobs": [{"7": -0.1}, {"8": -0.2}, {"9": -0.3}]}] * n
    same = [{"tokens": [7, 8, 9], "logprobs": [{"7": -0.1}, {"8": -0.25}, {"9": -0.3}]}] * n
    ok = script.compare(hf, tp1, same, 2)
    assert ok["all_equal"] and abs(ok["max_abs_logprob_diff"] - 0.05) < 1e-9
    off = [dict(same[0], tokens=[7, 4, 9])] + same[1:]
    bad = script.compare(hf, tp1, off, 2)
    assert not bad["all_equal"]
    assert bad["prompts"][0]["tp2_first_diff_vs_tp1"] == 1 and not bad["prompts"][0]["tp2_equals_hf"]
    assert bad["prompts"][0]["max_abs_logprob_diff"] < 1e-9  # only the common prefix (token 0) is compared
