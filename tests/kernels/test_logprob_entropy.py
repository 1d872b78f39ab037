"""Fused token log-prob + entropy: fused vs naive.py, naive vs float64 truth, masking, memory, Triton."""

import textwrap

import pytest
import torch

from m1_kernels.logprob_entropy import fused_linear_logprob_entropy
from m1_kernels.logprob_entropy import fused_linear_logprob_entropy_ref
from m1_kernels.logprob_entropy import logprob_entropy_from_logits
from m1_kernels.logprob_entropy import logprob_entropy_from_logits_ref
from tests.kernels.interpreter import run_script_under_interpreter
from tests.kernels.memory_probe import AllocationRecorder
from tests.testing import DEVICES
from tests.testing import check_rel

# (outputs, gradients): relative Frobenius error bound, plus an elementwise floor (see tests.testing.check_rel)
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-4, 2e-2)}
TOL_LINEAR = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (5e-3, 2e-2)}


def _loss(lp, ent, c_lp, c_ent):
    """A GRPO-like scalar: per-token policy weights on logprobs minus an entropy bonus."""
    return (lp * c_lp).sum() - (ent * c_ent).mean()


def _truth64(logits, labels, temperature, c_lp, c_ent, ignore_index=-100):
    """Float64 truth written without log_softmax: explicit max-shifted softmax and sums."""
    x = logits.detach().double().requires_grad_()
    l = x / temperature
    m = l.max(-1, keepdim=True).values.detach()
    lse = (l - m).exp().sum(-1, keepdim=True).log() + m
    p = (l - lse).exp()
    valid = labels != ignore_index
    lp = (l.gather(-1, torch.where(valid, labels, 0)[:, None]) - lse)[:, 0]
    ent = lse[:, 0] - (p * l).sum(-1)
    lp, ent = torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)
    (grad,) = torch.autograd.grad(_loss(lp, ent, c_lp.double(), c_ent.double()), x)
    return lp.detach(), ent.detach(), grad


def _case(T, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, V, generator=g) * 3).to(dtype).to(device)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[5::7] = -100
    return x, labels.to(device), torch.randn(T, generator=g).to(device), torch.rand(T, generator=g).to(device)


CASES = [
    pytest.param(63, 1423, 1.0, None, id="T63-V1423-t1-chunkdefault"),
    pytest.param(63, 1423, 0.6, 10, id="T63-V1423-t0.6-chunk10"),
    pytest.param(64, 128256, 1.3, 17, id="T64-V128256-t1.3-chunk17"),
]


@pytest.mark.parametrize("T,V,temperature,chunk", CASES)
def test_reference_matches_float64(T, V, temperature, chunk):
    x, labels, c_lp, c_ent = _case(T, V, torch.float32, "cpu")
    x.requires_grad_()
    lp, ent = logprob_entropy_from_logits_ref(x, labels, temperature)
    (grad,) = torch.autograd.grad(_loss(lp, ent, c_lp, c_ent), x)
    lp64, ent64, grad64 = _truth64(x, labels, temperature, c_lp, c_ent)
    check_rel("logprobs", lp64, lp, 1e-5)
    check_rel("entropy", ent64, ent, 1e-5)
    check_rel("grad", grad64, grad, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,V,temperature,chunk", CASES)
def test_from_logits_matches_reference(T, V, temperature, chunk, dtype, device):
    x, labels, c_lp, c_ent = _case(T, V, dtype, device)
    x.requires_grad_()
    lp, ent = logprob_entropy_from_logits(x, labels, temperature, chunk)
    (grad,) = torch.autograd.grad(_loss(lp, ent, c_lp, c_ent), x)
    rlp, rent = logprob_entropy_from_logits_ref(x, labels, temperature)
    (rgrad,) = torch.autograd.grad(_loss(rlp, rent, c_lp, c_ent), x)
    tol_out, tol_grad = TOL[dtype]
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == dtype
    check_rel("logprobs", rlp, lp, tol_out)
    check_rel("entropy", rent, ent, tol_out)
    check_rel("grad", rgrad, grad, tol_grad)
    assert (lp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    if dtype == torch.float32 and V < 10_000:
        lp64, ent64, grad64 = _truth64(x, labels, temperature, c_lp, c_ent)
        check_rel("grad vs fp64", grad64, grad, 1e-4)


LINEAR_CASES = [
    pytest.param(63, 67, 1423, 1.0, None, True, id="T63-H67-V1423-t1-chunkdefault-bias"),
    pytest.param(63, 67, 1423, 0.6, 10, False, id="T63-H67-V1423-t0.6-chunk10"),
    pytest.param(80, 64, 32000, 1.3, 17, False, id="T80-H64-V32000-t1.3-chunk17"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,H,V,temperature,chunk,with_bias", LINEAR_CASES)
def test_linear_matches_reference(T, H, V, temperature, chunk, with_bias, dtype, device):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(T, H, generator=g).to(dtype).to(device).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 2 * H**-0.5).to(dtype).to(device).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).to(device).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (T,), generator=g)
    labels[3::9] = -100
    labels = labels.to(device)
    c_lp, c_ent = torch.randn(T, generator=g).to(device), torch.rand(T, generator=g).to(device)
    params = [h, w] + ([b] if with_bias else [])
    lp, ent = fused_linear_logprob_entropy(h, w, labels, temperature=temperature, chunk_size=chunk, bias=b)
    grads = torch.autograd.grad(_loss(lp, ent, c_lp, c_ent), params)
    rlp, rent = fused_linear_logprob_entropy_ref(h, w, labels, temperature=temperature, bias=b)
    rgrads = torch.autograd.grad(_loss(rlp, rent, c_lp, c_ent), params)
    tol_out, tol_grad = TOL_LINEAR[dtype]
    check_rel("logprobs", rlp, lp, tol_out)
    check_rel("entropy", rent, ent, tol_out)
    for name, r, x in zip(["grad_hidden", "grad_weight", "grad_bias"], rgrads, grads):
        assert x.dtype == r.dtype
        check_rel(name, r, x, tol_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_single_output_used_and_all_ignored(device):
    x, labels, _, _ = _case(12, 300, torch.float32, device)
    x.requires_grad_()
    (g_ent,) = torch.autograd.grad(logprob_entropy_from_logits(x, labels, chunk_size=5)[1].sum(), x)
    (r_ent,) = torch.autograd.grad(logprob_entropy_from_logits_ref(x, labels)[1].sum(), x)
    check_rel("entropy-only grad", r_ent, g_ent, 1e-4)
    ignored = torch.full_like(labels, -100)
    lp, ent = logprob_entropy_from_logits(x, ignored, chunk_size=5)
    (g,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    assert (lp == 0).all() and (ent == 0).all() and (g == 0).all()


@pytest.mark.parametrize("op", ["linear", "logits"])
def test_memory_does_not_scale_with_tokens(op, monkeypatch):
    """Fresh allocations (fwd + bwd, PyTorch path): no T x V tensor but the returned logits gradient,
    and the largest other one is the same for T = 48 and T = 192 at a fixed chunk."""
    monkeypatch.setenv("M1_KERNELS_IMPL", "torch")
    V, H, chunk = 1423, 40, 16
    largest = {}
    for T in (48, 192):
        x, labels, c_lp, c_ent = _case(T, V, torch.float32, "cpu")
        with AllocationRecorder() as rec:
            if op == "linear":
                h = torch.randn(T, H, requires_grad=True)
                w = torch.randn(V, H, requires_grad=True)
                lp, ent = fused_linear_logprob_entropy(h, w, labels, chunk_size=chunk)
                _loss(lp, ent, c_lp, c_ent).backward()
            else:
                x.requires_grad_()
                lp, ent = logprob_entropy_from_logits(x, labels, chunk_size=chunk)
                _loss(lp, ent, c_lp, c_ent).backward()
        big = rec.at_least(T * V)
        if op == "linear":
            assert big == [], big
            largest[T] = max(n for n in rec.sizes() if n not in (V * H, T * H))
        else:
            assert len(big) == 1 and big[0][1] == (T, V), big  # the returned gradient
            largest[T] = max(n for n in rec.sizes() if n < T * V)
        assert largest[T] <= chunk * V
    assert largest[48] == largest[192]


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from m1_kernels.logprob_entropy import (fused_linear_logprob_entropy, fused_linear_logprob_entropy_ref,
                                            logprob_entropy_from_logits, logprob_entropy_from_logits_ref)
    torch.manual_seed(0)
    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    worst = 0.0
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        T, V, H = 11, 1423, 33
        x = (torch.randn(T, V) * 3).to(dtype).requires_grad_()
        labels = torch.randint(0, V, (T,)); labels[::4] = -100
        c = torch.randn(T)
        outs = []
        for f in (logprob_entropy_from_logits, logprob_entropy_from_logits_ref):
            lp, ent = f(x, labels, 0.8, 4) if f is logprob_entropy_from_logits else f(x, labels, 0.8)
            outs.append((lp, ent) + torch.autograd.grad((lp * c).sum() - ent.mean(), x))
        for a, b in zip(*outs):
            worst = max(worst, err(a, b)); assert err(a, b) < tol, err(a, b)
        h = torch.randn(T, H).to(dtype).requires_grad_(); w = torch.randn(V, H).to(dtype).requires_grad_()
        outs = []
        for f in (fused_linear_logprob_entropy, fused_linear_logprob_entropy_ref):
            kw = {"chunk_size": 4} if f is fused_linear_logprob_entropy else {}
            lp, ent = f(h, w, labels, temperature=0.8, **kw)
            outs.append((lp, ent) + torch.autograd.grad((lp * c).sum() - ent.mean(), (h, w)))
        for a, b in zip(*outs):
            assert err(a, b) < tol, err(a, b)
    print(f"TRITON_INTERPRET OK worst rel err {worst:.2e}")
    """
)


def test_triton_kernels_under_interpreter():
    """Runs both Triton kernels on CPU through triton's interpreter, in a subprocess: TRITON_INTERPRET
    is read when ``@triton.jit`` decorates the kernels, i.e. when ``triton_kernels.py`` is imported."""
    run_script_under_interpreter(_INTERPRET_SCRIPT)
