"""Datasets, prompting, report (table/JSON), scaling curves and the CLI, without a model."""

import argparse
import json

import pytest

from m1_eval.cli import main
from m1_eval.cli import register
from m1_eval.datasets import DATASETS
from m1_eval.datasets import load_dataset
from m1_eval.prompting import PAPER_SUFFIX
from m1_eval.prompting import PromptConfig
from m1_eval.prompting import build_prompt
from m1_eval.report import compute_metrics
from m1_eval.report import format_table
from m1_eval.report import grade_records
from m1_eval.report import load_results
from m1_eval.report import make_results
from m1_eval.report import save_results
from m1_eval.scaling import length_budget_curve
from m1_eval.scaling import plot_scaling
from m1_eval.scaling import sample_budget_curve


@pytest.mark.parametrize(
    "name,count,first",
    [("math500", 500, None), ("gsm8k", 1319, "18"), ("aime24", 30, "204"), ("aime25", 30, "70"),
     ("amc23", 40, "27"), ("olympiadbench", 675, "2")],
)  # fmt: skip
def test_builtin_datasets(name, count, first):
    probs = load_dataset(name)
    assert len(probs) == count
    assert all(p.problem and p.answer for p in probs)
    assert len({p.id for p in probs}) == count
    if first is not None:
        assert probs[0].answer == first
    assert name in DATASETS


def test_olympiad_multi_answers_and_limit():
    probs = load_dataset("olympiadbench")
    multi = [p for p in probs if p.meta.get("is_multiple_answer")]
    assert multi and all("$" not in p.answer for p in probs)
    assert len(load_dataset("aime", limit=4)) == 4


def test_jsonl_dataset(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(
        json.dumps({"question": "1+1?", "answer": 2})
        + "\n"
        + json.dumps({"problem": "x?", "solution": r"so \boxed{7}"})
    )
    probs = load_dataset(str(f))
    assert [(p.dataset, p.answer) for p in probs] == [("mine", "2"), ("mine", "7")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no fields"}) + "\n")
    with pytest.raises(ValueError, match="problem field"):
        load_dataset(str(bad))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no-such-set")


def test_prompting():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    assert build_prompt("P", Tok()) == f"user:P {PAPER_SUFFIX}|assistant:"
    cfg = PromptConfig(template="Q: {problem}", suffix="", system="S")
    assert build_prompt("P", Tok(), cfg) == "system:S|user:Q: P|assistant:"
    assert build_prompt("P", Tok(), PromptConfig(chat_template=False)) == f"P {PAPER_SUFFIX}"


def _records():
    def s(text, nt):
        return {"text": text, "num_tokens": nt, "finish_reason": "stop"}

    return [
        {"dataset": "a", "id": "0", "answer": "3",
         "samples": [s(r"\boxed{3}", 100), s(r"\boxed{4}", 400), s(r"\boxed{4}", 300), s("none", 800)]},
        {"dataset": "a", "id": "1", "answer": r"\frac12",
         "samples": [s(r"\boxed{0.5}", 200), s(r"\boxed{\tfrac12}", 200), s(r"\boxed{1}", 50), s(r"\boxed{2}", 50)]},
        {"dataset": "b", "id": "0", "answer": "7",
         "samples": [s(r"\boxed{7}", 10), s(r"\boxed{7}", 10), s(r"\boxed{7}", 10), s(r"\boxed{7}", 10)]},
    ]  # fmt: skip


def test_report_and_json_roundtrip(tmp_path):
    recs = grade_records(_records(), progress=False)
    assert [s["correct"] for s in recs[0]["samples"]] == [True, False, False, False]
    assert [s["label"] for s in recs[0]["samples"]] == [0, 1, 1, -1]
    assert [s["label"] for s in recs[1]["samples"]] == [0, 0, 1, 2]
    m = compute_metrics(recs)
    assert m["a"]["pass@1"] == pytest.approx((0.25 + 0.5) / 2)
    assert m["a"]["maj@k"][4] == [pytest.approx(0.5), 0.0]  # problem 0: wrong class wins; problem 1: correct wins
    assert m["b"]["pass@k"][4] == 1.0
    table = format_table(m)
    assert "pass@1" in table and "maj@4" in table and "37.5" in table
    assert "pass@2" in format_table(m, "all")
    res = make_results(recs, m, "/models/tiny", throughput=100.0)
    path = save_results(res, tmp_path / "r.json")
    back = load_results(path)
    assert back["label"] == "tiny" and back["metrics"]["a"]["maj@k"][4][0] == pytest.approx(0.5)
    assert back["problems"][0]["samples"][1]["answer"] == "4"


def test_scaling_curves_and_plot(tmp_path):
    recs = grade_records(_records(), progress=False)
    a = [r for r in recs if r["dataset"] == "a"]
    c3 = sample_budget_curve(a, throughput=100.0)
    mean_len = (100 + 400 + 300 + 800 + 200 + 200 + 50 + 50) / 8
    assert [round(x, 6) for x, _, _ in c3] == [round(k * mean_len / 100.0, 6) for k in (1, 2, 4)]
    c4 = length_budget_curve(a, throughput=100.0, limits=[100, 250, 1000])
    assert [acc for _, acc, _ in c4] == [pytest.approx(1 / 8), pytest.approx(3 / 8), pytest.approx(3 / 8)]
    assert c4[0][0] == pytest.approx((100 * 4 + 50 * 2 + 100 * 2) / 8 / 100.0)
    fast = make_results(recs, compute_metrics(recs), "fast", throughput=400.0)
    slow = make_results(recs, compute_metrics(recs), "slow", throughput=100.0)
    png = plot_scaling([fast, slow], tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help_and_rescore(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="m1")
    sub = parser.add_subparsers()
    p = register(sub)
    args = parser.parse_args(["eval", "--model", "x", "--datasets", "math500,aime24", "--n", "16",
                              "--max-tokens-per-dataset", "aime24=24576"])  # fmt: skip
    assert args.func.__name__ == "run" and args.n == 16 and args.max_tokens_per_dataset == {"aime24": 24576}
    assert "--temperature" in p.format_help() and "maj@k" in p.format_help()
    recs = grade_records(_records(), progress=False)
    for s in recs[0]["samples"]:
        s["correct"], s["label"] = None, None  # stale verdicts: --rescore re-grades them
    save_results(make_results(recs, {}, "m", throughput=50.0), tmp_path / "in.json")
    rc = main(["eval", "--rescore", str(tmp_path / "in.json"), "--output-dir", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "pass@1" in out
    res = load_results(tmp_path / "out" / "results.json")
    assert res["problems"][0]["samples"][0]["correct"] is True
    assert (tmp_path / "out" / "scaling.png").exists()
    assert main(["eval"]) == 2  # no --model
