"""Fixtures: the real SmolLM2 teacher (a 4-layer slice, exported once and cached) and tiny configs."""

import pytest
import torch

from m1_hybrid import M1HybridConfig
from m1_hybrid import M1HybridForCausalLM

PROMPTS = [
    "What is the sum of the first ten positive integers?",
    "Solve for x: 3x + 5 = 20.",
    "Hi",
    "Explain why the square root of two is irrational, briefly.",
]


@pytest.fixture(scope="session")
def teacher_dir():
    from m1_hybrid.teacher import smollm2_slice_path

    return smollm2_slice_path(4)


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tok.padding_side = "left"
    return tok


def tiny_config(**overrides) -> M1HybridConfig:
    """A small hybrid with the M1 GQA repeat (3 C groups per x/B group) and an odd vocabulary."""
    kw = dict(
        vocab_size=97,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        attn_layers=[2],
        d_state=16,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return M1HybridConfig(**kw)


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> M1HybridForCausalLM:
    """Random tiny hybrid; A_log/dt spread so the states decay at varied rates."""
    torch.manual_seed(seed)
    model = M1HybridForCausalLM(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            if not layer.is_attention:
                layer.mamba.conv1d.bias.normal_(0, 0.3)
                layer.mamba.D.normal_(1, 0.3)
    return model.eval()
