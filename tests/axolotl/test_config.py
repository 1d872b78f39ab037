"""Plugin config: the model_type spelling, declared keys, the student built on the fly or loaded."""

import pytest
import torch
import yaml
from pydantic import ValidationError

from axolotl_m1.args import M1Args
from axolotl_m1.plugin import alias_model_type
from axolotl_m1.plugin import prepare_student

from .conftest import EXAMPLES


def test_axolotl_config_with_m1_model_type(axolotl_setup):
    """`model_type: m1_hybrid` as users write it: Axolotl loads it, every m1_* key survives validation."""
    from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES

    cfg, _ = axolotl_setup
    assert cfg.type_of_model == "AutoModelForCausalLM"
    assert cfg.model_config_type == "m1_hybrid"
    assert cfg.m1_distill is True and cfg.m1_attn_layers == [3] and cfg.m1_kl_direction == "reverse"
    assert cfg.m1_kl_weight == 1.0 and cfg.m1_ce_weight == 0.0 and cfg.m1_teacher_dtype == "float32"
    assert cfg.base_model.endswith("student_init") and cfg.m1_teacher_model != cfg.base_model
    assert "m1_hybrid" in SUPPORTED_MULTIPACK_MODEL_TYPES


def test_model_type_alias():
    import transformers

    assert not hasattr(transformers, "m1_hybrid")  # what Axolotl would getattr without the plugin
    for spelling in ("m1_hybrid", "M1HybridForCausalLM"):
        cfg = {"model_type": spelling}
        assert alias_model_type(cfg) and cfg["model_type"] == "AutoModelForCausalLM"
    cfg = {"model_type": "AutoModelForCausalLM"}
    assert not alias_model_type(cfg) and cfg["model_type"] == "AutoModelForCausalLM"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yml")), ids=lambda p: p.name)
def test_examples_use_only_declared_keys(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["plugins"] == ["axolotl_m1.M1Plugin"] and cfg["model_type"] == "m1_hybrid"
    keys = {k for k in cfg if k.startswith("m1_")}
    assert keys <= set(M1Args.model_fields), keys - set(M1Args.model_fields)
    M1Args(**{k: cfg[k] for k in keys})


def test_args_validation():
    with pytest.raises(ValidationError, match="needs a teacher"):
        M1Args(m1_distill=True)
    with pytest.raises(ValidationError, match="nothing to train"):
        M1Args(m1_distill=True, m1_teacher_model="t", m1_kl_weight=0.0, m1_ce_weight=0.0)
    with pytest.raises(ValidationError, match="duplicates"):
        M1Args(m1_attn_layers=[1, 1])
    with pytest.raises(ValidationError):
        M1Args(m1_kl_direction="sideways")
    assert M1Args(m1_attn_layers=[5, 2]).m1_attn_layers == [2, 5]
    # auto: only with distillation and alignment (the choice is made from aligned mixers)
    with pytest.raises(ValidationError, match="auto chooses .* m1_align_steps > 0"):
        M1Args(m1_attn_layers="auto", m1_distill=True, m1_teacher_model="t")
    with pytest.raises(ValidationError, match="m1_num_attn_layers only applies to m1_attn_layers: auto"):
        M1Args(m1_attn_layers=[1], m1_num_attn_layers=2)
    with pytest.raises(ValidationError):
        M1Args(m1_attn_layers="all")
    ok = M1Args(m1_attn_layers="auto", m1_num_attn_layers=3, m1_distill=True, m1_teacher_model="t", m1_align_steps=5)
    assert ok.m1_attn_layers == "auto" and ok.m1_num_attn_layers == 3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    out = tmp_path_factory.mktemp("llama") / "teacher"
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_student_built_on_the_fly_and_reused(llama_dir, tmp_path):
    from m1_hybrid import M1HybridForCausalLM

    with pytest.raises(ValueError, match="not an M1 hybrid: set m1_attn_layers"):
        prepare_student({"base_model": str(llama_dir)})
    cfg = {"base_model": str(llama_dir), "m1_attn_layers": [1], "m1_distill": True, "output_dir": str(tmp_path)}
    prepare_student(cfg)
    assert cfg["base_model"] == str((tmp_path / "m1_student_init").resolve())
    assert cfg["m1_teacher_model"] == str(llama_dir)
    student = M1HybridForCausalLM.from_pretrained(cfg["base_model"])
    assert student.config.layers_block_type == ["mamba", "attention", "mamba"]
    mtime = (tmp_path / "m1_student_init" / "model.safetensors").stat().st_mtime
    again = {"base_model": str(llama_dir), "m1_attn_layers": [1], "output_dir": str(tmp_path)}
    prepare_student(again)
    assert (tmp_path / "m1_student_init" / "model.safetensors").stat().st_mtime == mtime  # reused
    with pytest.raises(ValueError, match="delete that folder"):
        prepare_student({"base_model": str(llama_dir), "m1_attn_layers": [2], "output_dir": str(tmp_path)})
    # An M1 checkpoint is used as is; a conflicting m1_attn_layers is refused.
    ckpt = {"base_model": cfg["base_model"]}
    prepare_student(ckpt)
    assert ckpt["base_model"] == cfg["base_model"]
    with pytest.raises(ValueError, match="already an M1 hybrid"):
        prepare_student({"base_model": cfg["base_model"], "m1_attn_layers": [0]})
    with pytest.raises(ValueError, match="auto only applies when base_model is a teacher"):
        prepare_student({"base_model": cfg["base_model"], "m1_attn_layers": "auto"})
    # auto converts every layer into a mixer (the trainer gives the chosen ones attention back after alignment)
    auto = {"base_model": str(llama_dir), "m1_attn_layers": "auto", "output_dir": str(tmp_path / "auto")}
    prepare_student(auto)
    assert M1HybridForCausalLM.from_pretrained(auto["base_model"]).config.attn_layers == []


def test_align_steps_need_distillation(axolotl_setup, tmp_path):
    """m1_align_steps > 0 without m1_distill is refused, by the plugin's args and by Axolotl's config load."""
    from axolotl.cli.config import load_cfg

    from .conftest import tiny_yaml

    with pytest.raises(ValidationError, match="set m1_distill: true"):
        M1Args(m1_align_steps=3)
    with pytest.raises(ValidationError):
        M1Args(m1_distill=True, m1_teacher_model="t", m1_align_steps=-1)
    assert M1Args(m1_align_steps=0).m1_align_steps == 0
    assert M1Args(m1_distill=True, m1_teacher_model="t", m1_align_steps=3, m1_align_lr=0.01).m1_align_lr == 0.01
    cfg, _ = axolotl_setup
    assert cfg.m1_align_steps == 4 and cfg.m1_align_lr == 0.001  # declared: survive Axolotl's validation
    path = tiny_yaml(
        tmp_path / "sft.yml",
        "tiny_cpu_sft.yml",
        base_model=cfg.base_model,
        output_dir=str(tmp_path / "out"),
        m1_align_steps=3,
    )
    with pytest.raises(ValueError, match="m1_align_steps: 3 .* set m1_distill: true"):
        load_cfg(str(path))


def test_fsdp_gets_one_parameter_dtype(tmp_path):
    """A bf16-loaded M1 keeps A_log in fp32; FSDP2 refuses mixed dtypes in a wrapped layer (found on the H100:
    "FSDP expects uniform original parameter dtype"), so post_model_load unifies them under FSDP only."""
    from axolotl.utils.dict import DictDefault

    from axolotl_m1.plugin import M1Plugin
    from m1_hybrid import M1HybridForCausalLM
    from tests.testing import tiny_m1_config

    M1HybridForCausalLM(tiny_m1_config()).save_pretrained(tmp_path)
    for fsdp, expect in ((None, {torch.bfloat16, torch.float32}), ({"fsdp_version": 2}, {torch.bfloat16})):
        model = M1HybridForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
        assert model.model.layers[0].mamba.A_log.dtype == torch.float32  # mamba's fp32 A_log
        M1Plugin().post_model_load(DictDefault(base_model=str(tmp_path), m1_distill=False, fsdp_config=fsdp), model)
        assert {p.dtype for p in model.parameters()} == expect


def test_fsdp_saved_model_gets_m1_code_back(tmp_path):
    """FSDP2 swaps the model's class for torch's FSDPM1HybridForCausalLM, so save_pretrained wrote torch's FSDP
    source and an auto_map naming the wrapper (seen in the H100 run's output folder); post_train repairs it."""
    import json

    import torch.distributed as dist
    from axolotl.utils.dict import DictDefault
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    import m1_hybrid.checkpoint  # auto_map registration, as in training
    from axolotl_m1.plugin import M1Plugin
    from m1_hybrid import M1HybridForCausalLM
    from tests.testing import tiny_m1_config

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = M1HybridForCausalLM(tiny_m1_config())
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        out = tmp_path / "out"
        model.save_pretrained(out, state_dict=dict(full))  # (save_pretrained empties the dict it gets)
        broken = json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        assert "FSDP" in broken and (out / "_fsdp_state.py").exists() and not (out / "modeling_m1.py").exists()
        M1Plugin().post_train(DictDefault(output_dir=str(out), fsdp_config={"fsdp_version": 2}), model)
    finally:
        dist.destroy_process_group()
    assert not list(out.glob("_fsdp*.py"))
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_m1.M1HybridForCausalLM"
    )
    assert all((out / f.name).exists() for f in m1_hybrid.checkpoint.model_code_files())
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert all(torch.equal(v, full[k]) for k, v in loaded.state_dict().items())
