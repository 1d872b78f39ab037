"""Fixtures for the VeRL integration tests: a small real M1 hybrid (SmolLM2 2-layer slice, attention at
layer 1, real tokenizer and ChatML template), converted once per session."""

import pytest

from tests.conftest import OFFLINE_ENV  # noqa: F401  (offline settings applied on import)


@pytest.fixture(scope="session")
def m1_ckpt(tmp_path_factory):
    from m1_hybrid.convert import convert_checkpoint
    from m1_hybrid.teacher import smollm2_slice_path

    out = tmp_path_factory.mktemp("m1_ckpt")
    return convert_checkpoint(smollm2_slice_path(2), out / "hybrid", [1], "fp32")


@pytest.fixture(scope="session")
def m1_model(m1_ckpt):
    import torch

    from m1_hybrid import M1HybridForCausalLM

    return M1HybridForCausalLM.from_pretrained(m1_ckpt, dtype=torch.float32).eval()
