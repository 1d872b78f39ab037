"""The tiny CPU configs through Axolotl's own entry point (``axolotl train``): align + distill, resume, SFT."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import axolotl_env
from .conftest import chat_datasets
from .conftest import tiny_yaml

pytestmark = pytest.mark.slow

STEPS, SAVE = 10, 5
ALIGN_STEPS = 4
ALIGN_KEYS = {"align_rel_err_first", "align_rel_err_last", "align_rel_err_max_first", "align_rel_err_max_last"}


def axolotl_train(cfg_path: Path, log: Path) -> None:
    exe = Path(sys.executable).parent / "axolotl"
    with open(log, "w") as fh:
        proc = subprocess.run(
            [str(exe), "train", str(cfg_path)], stdout=fh, stderr=subprocess.STDOUT, env=axolotl_env()
        )
    assert proc.returncode == 0, f"axolotl train failed, log tail:\n{log.read_text()[-4000:]}"


def history(ckpt: Path) -> dict[int, dict]:
    rows = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    return {r["step"]: r for r in rows if "loss" in r}


def distill_keys(root: Path, teacher_dir, tiny_data, **more) -> dict:
    """The YAML keys every distillation run here shares (teacher = base_model, files under ``root``), plus ``more``."""
    return dict(
        base_model=str(teacher_dir),
        m1_teacher_model=str(teacher_dir),
        m1_student_init_dir=str(root / "student_init"),
        datasets=chat_datasets(tiny_data),
        dataset_prepared_path=str(root / "prepared"),
        **more,
    )


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, teacher_dir, tiny_data):
    root = tmp_path_factory.mktemp("e2e")
    common = distill_keys(
        root,
        teacher_dir,
        tiny_data,
        max_steps=STEPS,
        save_steps=SAVE,
        m1_align_steps=ALIGN_STEPS,
        m1_align_lr=1e-3,
    )
    cfg_a = tiny_yaml(root / "a.yml", "tiny_cpu_distill.yml", output_dir=str(root / "a"), **common)
    axolotl_train(cfg_a, root / "a.log")
    return root, common


def test_distill_loss_falls_and_logs_stats(distill_run):
    root, _ = distill_run
    h = history(root / "a" / f"checkpoint-{STEPS}")
    assert sorted(h) == list(range(1, STEPS + 1))
    losses = [h[s]["loss"] for s in sorted(h)]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    for s in h.values():
        assert {"kl", "ce", "top1_agreement"} <= set(s)
        assert abs(s["kl"] - s["loss"]) < 1e-3  # m1_kl_weight 1, m1_ce_weight 0
        assert 0.0 <= s["top1_agreement"] <= 1.0


def test_alignment_ran_before_training(distill_run):
    """m1_align_steps: the fresh run aligned the mixers first; the relative error fell and joined step 1's log."""
    root, _ = distill_run
    h = history(root / "a" / f"checkpoint-{STEPS}")
    assert ALIGN_KEYS <= set(h[1]) and not any(ALIGN_KEYS & set(h[s]) for s in range(2, STEPS + 1))
    first, last = h[1]["align_rel_err_first"], h[1]["align_rel_err_last"]
    assert 0.0 < last < first <= h[1]["align_rel_err_max_first"], h[1]
    log = (root / "a.log").read_text()
    assert f"m1 alignment: {ALIGN_STEPS} steps" in log


def test_checkpoint_loads_with_from_pretrained(distill_run):
    from m1_hybrid import M1HybridForCausalLM

    out = distill_run[0] / "a"
    model = M1HybridForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.attn_layers == [3] and model.config.model_type == "m1_hybrid"
    code = (
        "import sys; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True); "
        "assert 'm1_hybrid' not in sys.modules, 'loaded through the installed package, not the checkpoint code'; "
        "print(type(m).__module__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=axolotl_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transformers_modules" in proc.stdout


def test_checkpoint_loads_in_vllm(distill_run):
    """The distilled checkpoint serves through vLLM (the vllm_m1 plugin) with HF's greedy tokens."""
    from m1_hybrid import M1HybridForCausalLM

    out = distill_run[0] / "a"
    prompt = [1, 9690, 198, 2683, 314, 216, 34, 30, 34, 47]
    model = M1HybridForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    code = (
        "import os, json; os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'\n"
        "from vllm import LLM, SamplingParams\n"
        "from vllm.inputs import TokensPrompt\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({str(out)!r}, dtype='float32', enforce_eager=True, max_model_len=256, max_num_seqs=2)\n"
        f"    o = llm.generate([TokensPrompt(prompt_token_ids={prompt})], "
        "SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))\n"
        "    print('TOKENS', json.dumps(list(o[0].outputs[0].token_ids)))\n"
    )
    env = dict(axolotl_env(), VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    assert got[: len(ref)] == ref


def test_resume_from_mid_run_checkpoint_continues_the_run(distill_run):
    root, common = distill_run
    cfg_b = tiny_yaml(
        root / "b.yml",
        "tiny_cpu_distill.yml",
        output_dir=str(root / "b"),
        resume_from_checkpoint=str(root / "a" / f"checkpoint-{SAVE}"),
        **common,
    )
    axolotl_train(cfg_b, root / "b.log")
    a, b = history(root / "a" / f"checkpoint-{STEPS}"), history(root / "b" / f"checkpoint-{STEPS}")
    assert sorted(b) == list(range(1, STEPS + 1))
    # The aligned weights are in the checkpoint: the resumed run does not align again.
    assert "m1 align" not in (root / "b.log").read_text()
    assert not any(ALIGN_KEYS & set(b[s]) for s in range(SAVE + 1, STEPS + 1))
    for step in range(SAVE + 1, STEPS + 1):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-3 * max(1.0, abs(a[step]["loss"])), (step, a[step], b[step])


def test_sft_on_the_distilled_checkpoint(distill_run):
    root, common = distill_run
    cfg = tiny_yaml(
        root / "sft.yml",
        "tiny_cpu_sft.yml",
        base_model=str(root / "a"),
        output_dir=str(root / "sft"),
        datasets=common["datasets"],
        dataset_prepared_path=str(root / "prepared_sft"),
        max_steps=6,
        save_steps=6,
    )
    axolotl_train(cfg, root / "sft.log")
    h = history(root / "sft" / "checkpoint-6")
    losses = [h[s]["loss"] for s in sorted(h)]
    assert len(losses) == 6 and all(0 < v < 50 for v in losses)
    assert "kl" not in h[1]
    assert min(losses[-2:]) < losses[0], losses


def test_auto_attention_layers_are_chosen_after_alignment_and_resume(tmp_path, teacher_dir, tiny_data):
    """``m1_attn_layers: auto``: the all-Mamba student is aligned, two layers get attention back before the
    first step, checkpoints carry them, and a resumed run rebuilds them and continues the same run."""
    from transformers import AutoModelForCausalLM

    common = distill_keys(
        tmp_path,
        teacher_dir,
        tiny_data,
        max_steps=4,
        save_steps=2,
        m1_attn_layers="auto",
        m1_num_attn_layers=2,
        m1_align_steps=2,
    )
    axolotl_train(tiny_yaml(tmp_path / "a.yml", "tiny_cpu_distill.yml", output_dir=str(tmp_path / "a"), **common),
                  tmp_path / "a.log")  # fmt: skip
    assert "m1 attention layers chosen" in (tmp_path / "a.log").read_text()
    init = json.loads((tmp_path / "student_init" / "config.json").read_text())
    assert init["attn_layers"] == []  # converted with every layer a mixer
    chosen = json.loads((tmp_path / "a" / "checkpoint-2" / "config.json").read_text())["attn_layers"]
    assert len(chosen) == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-4", trust_remote_code=True)
    assert [i for i, layer in enumerate(model.model.layers) if layer.is_attention] == chosen

    cfg_b = tiny_yaml(tmp_path / "b.yml", "tiny_cpu_distill.yml", output_dir=str(tmp_path / "b"),
                      resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"), **common)  # fmt: skip
    axolotl_train(cfg_b, tmp_path / "b.log")
    a, b = history(tmp_path / "a" / "checkpoint-4"), history(tmp_path / "b" / "checkpoint-4")
    assert "m1 align" not in (tmp_path / "b.log").read_text()
    for step in (3, 4):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-3 * max(1.0, abs(a[step]["loss"])), (step, a[step], b[step])
