"""Shared test helpers: one closeness check that prints the worst element."""

import torch


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


def random_cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """int32 document offsets ``[0, l0, l0 + l1, ...]`` for packed inputs."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)
