"""Shared test helpers: closeness checks that print the worst element, CPU/CUDA device params, tiny configs,
the benchmark scripts as modules."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
# Parametrize over these: the CUDA variant skips (with a reason the skip audit accepts) without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU variant skipped")),
]


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Assert ``|got - ref| <= atol + rtol * |ref|`` elementwise, naming the worst element on failure."""
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    ref64, got64 = ref.detach().double().cpu(), got.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values in the result"
    err = (ref64 - got64).abs()
    excess = err - (atol + rtol * ref64.abs())
    if (excess > 0).any():
        i = int(excess.argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), ref.shape))
        raise AssertionError(
            f"{name}: max abs err {err.max().item():.3e} (atol {atol}, rtol {rtol}); worst at {idx}: "
            f"ref {ref64.flatten()[i].item():.6g} got {got64.flatten()[i].item():.6g}"
        )


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Relative error ||got - ref|| / ||ref|| (Frobenius), in float64."""
    ref64, got64 = ref.detach().double().cpu(), got.detach().double().cpu()
    return ((ref64 - got64).norm() / ref64.norm().clamp_min(1e-30)).item()


def check_rel(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    """Relative Frobenius error <= tol, and every element within tol * max|ref| (abs floor) + 4 * tol * |ref|."""
    err = rel_err(ref, got)
    assert err <= tol, f"{name}: rel err {err:.3e} > {tol:.1e}"
    assert_close(name, ref, got, atol=tol * ref.detach().abs().max().item() + 1e-30, rtol=4 * tol)


def random_cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """int32 document offsets ``[0, l0, l0 + l1, ...]`` for packed inputs."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def tiny_m1_config(**overrides):
    """A small M1HybridConfig: 4 layers with attention at layer 2, the M1 GQA repeat (3 C groups per x/B
    group), an odd vocabulary and an untied head; ``overrides`` replace or add any config field."""
    from m1_hybrid import M1HybridConfig

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


def benchmark_script(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (the scripts import their siblings, e.g.
    ``results_io``, so ``benchmarks/`` is on ``sys.path`` while it loads)."""
    folder = str(REPO / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)
