"""Fixtures: the real SmolLM2 teacher (a 4-layer slice, exported once and cached) and tiny configs."""

import pytest
import torch

from m1_hybrid import M1HybridForCausalLM
from tests.testing import tiny_m1_config

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


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> M1HybridForCausalLM:
    """Random tiny hybrid; A_log/dt spread so the states decay at varied rates."""
    torch.manual_seed(seed)
    model = M1HybridForCausalLM(tiny_m1_config(**overrides)).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            if not layer.is_attention:
                layer.mamba.conv1d.bias.normal_(0, 0.3)
                layer.mamba.D.normal_(1, 0.3)
    return model.eval()
