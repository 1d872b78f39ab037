"""The data script: MATH-style JSONL -> VeRL parquet -> ``RLHFDataset`` with our tokenizer."""

import json
import subprocess
import sys

import pytest

from m1_eval.prompting import PAPER_SUFFIX

RECORDS = [
    {"problem": "What is $1+1$?", "answer": "2"},
    {"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "solution": "It is $\\boxed{\\frac{3}{4}}$."},
    {"question": "Tom has 3 apples and buys 1,000 more. How many?", "answer": "3+1000=1003\n#### 1,003"},
    {"problem": "No answer here"},
    {"problem": "", "answer": "1"},
]


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_data")
    src = d / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    out = d / "out"
    res = subprocess.run(
        [sys.executable, "-m", "verl_m1.data", "--input", str(src), "--out", str(out), "--test-input", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train: wrote 3 rows" in res.stdout and "(2 skipped)" in res.stdout
    return out


def test_rows_follow_verl_schema(parquet_dir):
    import pandas as pd

    df = pd.read_parquet(parquet_dir / "train.parquet")
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert [r["ground_truth"] for r in df["reward_model"]] == ["2", "\\frac{3}{4}", "1003"]
    assert all(r["style"] == "rule" for r in df["reward_model"])
    first = list(df["prompt"][0])
    assert first[0]["role"] == "user" and first[0]["content"] == f"What is $1+1$? {PAPER_SUFFIX}"
    assert list(df["extra_info"][2].keys())[:2] == ["split", "index"] and df["extra_info"][2]["index"] == 2
    assert (parquet_dir / "test.parquet").exists()


def test_rlhf_dataset_loads_with_our_tokenizer(parquet_dir, m1_ckpt):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tok = AutoTokenizer.from_pretrained(m1_ckpt)
    cfg = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "max_prompt_length": 256,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "truncation": "error",
            "cache_dir": str(parquet_dir / "cache"),
        }
    )
    ds = RLHFDataset(str(parquet_dir / "train.parquet"), tok, cfg)
    assert len(ds) == 3
    item = ds[1]
    assert item["reward_model"]["ground_truth"] == "\\frac{3}{4}"
    assert item["index"] == 1 and item["data_source"] == "math"
    # VeRL's agent loop applies the chat template to raw_prompt: ChatML with the paper's suffix.
    text = tok.apply_chat_template(list(item["raw_prompt"]), add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert f"<|im_start|>user\nCompute $\\frac{{1}}{{2}}+\\frac{{1}}{{4}}$. {PAPER_SUFFIX}<|im_end|>" in text


def test_overlong_prompts_are_filtered(parquet_dir, m1_ckpt):
    import pandas as pd
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tok = AutoTokenizer.from_pretrained(m1_ckpt)
    prompts = pd.read_parquet(parquet_dir / "train.parquet")["prompt"]
    texts = [tok.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    limit = sorted(lengths)[1]
    cfg = OmegaConf.create(
        {
            "max_prompt_length": limit,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(parquet_dir / "cache2"),
        }
    )
    ds = RLHFDataset(str(parquet_dir / "train.parquet"), tok, cfg)
    assert len(ds) == sum(n <= limit for n in lengths) < 3
