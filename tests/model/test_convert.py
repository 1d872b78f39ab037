"""Llama -> M1 conversion: exact when every layer stays attention, Algorithm 1 mapping, errors."""

import pytest
import torch
from transformers import LlamaConfig
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM

from m1_hybrid import M1HybridConfig
from m1_hybrid.convert import convert_model
from m1_hybrid.convert import default_attn_layers
from m1_hybrid.convert import parse_layers
from m1_hybrid.convert import student_config
from tests.model.conftest import PROMPTS


def _batch(tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    # Same positions for teacher and student (HF Llama would count positions over the left pads).
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return enc


def test_all_attention_conversion_reproduces_teacher_logits(teacher, tokenizer):
    student = convert_model(teacher, attn_layers=list(range(teacher.config.num_hidden_layers)))
    enc = _batch(tokenizer)
    with torch.no_grad():
        ref, got = teacher(**enc).logits, student(**enc).logits
    real = enc["attention_mask"].bool()
    assert real.sum() >= 40
    assert (ref - got)[real].abs().max().item() < 1e-5


def test_mamba_layers_take_attention_weights(teacher):
    student = convert_model(teacher, attn_layers=[1])
    cfg = student.config
    d_in, d_xb = cfg.d_inner, cfg.d_xb
    t0, s0 = teacher.model.layers[0].self_attn, student.model.layers[0].mamba
    w = s0.in_proj.weight
    assert torch.equal(w[d_in : d_in + d_xb], t0.v_proj.weight)
    assert torch.equal(w[d_in + d_xb : d_in + 2 * d_xb], t0.k_proj.weight)
    assert torch.equal(w[d_in + 2 * d_xb : 2 * d_in + 2 * d_xb], t0.q_proj.weight)
    assert torch.equal(s0.out_proj.weight, t0.o_proj.weight)
    assert torch.allclose(s0.A_log, torch.log(torch.arange(1, cfg.d_state + 1.0)).expand(d_in, -1))
    assert torch.equal(s0.D, torch.ones(d_in))
    dt = torch.nn.functional.softplus(s0.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    t1 = teacher.model.layers[1]
    qkv = torch.cat([t1.self_attn.q_proj.weight, t1.self_attn.k_proj.weight, t1.self_attn.v_proj.weight])
    assert torch.equal(student.model.layers[1].mha.in_proj.weight, qkv)
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # tied like SmolLM2
    assert cfg.dt_bias_twice is False and cfg.repeat_group == 3


def test_default_attention_layers_follow_m1():
    assert default_attn_layers(28) == [3, 8, 13, 18, 23, 27]
    assert default_attn_layers(4) == [3]
    for n in (12, 16, 30, 32, 80):
        layers = default_attn_layers(n)
        assert layers[-1] == n - 1 and len(set(layers)) == len(layers)
        assert 0.15 <= len(layers) / n <= 0.3, (n, layers)


def test_parse_layers():
    assert parse_layers("3, 8,13") == [3, 8, 13]
    assert parse_layers("none") == [] and parse_layers(None) is None
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_layers("3;8")


def test_qwen2_teacher_with_biases_converts_exactly():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        num_hidden_layers=3,
        vocab_size=120,
        tie_word_embeddings=False,
    )
    teacher = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.bias.normal_()
            layer.self_attn.k_proj.bias.normal_()
    ids = torch.randint(0, 120, (2, 11))
    student = convert_model(teacher, attn_layers=[0, 1, 2])
    with torch.no_grad():
        assert (teacher(ids).logits - student(ids).logits).abs().max() < 1e-5
    hybrid = convert_model(teacher, attn_layers=[1])
    bias = hybrid.model.layers[0].mamba.in_proj.bias
    assert torch.equal(bias[64 + 32 : 64 + 64], teacher.model.layers[0].self_attn.k_proj.bias)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attn_layers=[1, 4]), r"out of range .* 4 layers \(valid: 0..3\)"),
        (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
        (dict(d_state=24), "multiple of d_state"),
        (dict(ssm_cache_dtype="fp8"), "ssm_cache_dtype"),
    ],
)
def test_bad_configs_name_the_fix(kwargs, message):
    base = dict(num_hidden_layers=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        M1HybridConfig(**base)


def test_layer_types_must_match_attn_layers():
    with pytest.raises(ValueError, match="disagrees with attn_layers"):
        M1HybridConfig(num_hidden_layers=2, attn_layers=[0], layers_block_type=["mamba", "attention"])


def test_unsupported_teacher_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported teacher architecture 'gpt2'"):
        student_config(GPT2Config())


def test_teacher_attention_out_of_range():
    teacher_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    with pytest.raises(ValueError, match="fix attn_layers / --attn-layers"):
        student_config(teacher_cfg, attn_layers=[5])


def test_restore_attention_equals_converting_with_those_layers(teacher):
    """An all-Mamba student with layers 0 and 2 restored == converted with attn [0, 2], except that the other
    mixers keep what they learned; bf16 students stay bf16 (and A_log fp32) around the new layers."""
    from m1_hybrid.convert import restore_attention

    n = teacher.config.num_hidden_layers
    student = convert_model(teacher, attn_layers=[], d_state=4)
    for p in student.model.layers[1].mamba.parameters():  # stand-in for alignment
        p.data.add_(0.01)
    learned = {k: v.clone() for k, v in student.model.layers[1].state_dict().items()}
    restore_attention(student, teacher, [2, 0])
    assert student.config.attn_layers == [0, 2] and student.config.layers_block_type[:3] == [
        "attention", "mamba", "attention"]  # fmt: skip
    expected = convert_model(teacher, attn_layers=[0, 2], d_state=4).state_dict()
    got = student.state_dict()
    assert set(got) == set(expected)
    for k, v in got.items():
        if k.startswith("model.layers.1."):
            torch.testing.assert_close(v, learned[k[len("model.layers.1.") :]], rtol=0, atol=0)
        elif k.startswith(("model.layers.0.", "model.layers.2.")):
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    # The rebuilt model runs as one built with that config from the start (same weights).
    ids = torch.randint(0, teacher.config.vocab_size, (1, 7))
    restored = convert_model(teacher, attn_layers=[0, 2], d_state=4)
    restored.load_state_dict(got)
    torch.testing.assert_close(student(ids).logits, restored(ids).logits, rtol=0, atol=0)

    half = convert_model(teacher, attn_layers=[], d_state=4).to(torch.bfloat16)
    half.model.layers[0].mamba.A_log.data = half.model.layers[0].mamba.A_log.float()
    restore_attention(half, teacher, [0])
    assert {p.dtype for p in half.model.layers[0].parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match=f"out of range for a {n}-layer student"):
        restore_attention(half, teacher, [n])
