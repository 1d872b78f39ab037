"""Fused KL losses: fused vs naive.py reference, reference vs float64 truth, masking, stats, memory, Triton."""

import textwrap

import pytest
import torch

from m1_kernels.fused_kl import fused_kl_div
from m1_kernels.fused_kl import fused_kl_div_ref
from m1_kernels.fused_kl import fused_linear_kl_div
from m1_kernels.fused_kl import fused_linear_kl_div_ref
from tests.kernels.interpreter import run_script_under_interpreter
from tests.kernels.memory_probe import AllocationRecorder
from tests.testing import DEVICES
from tests.testing import check_rel

# (tolerance for the loss, for the gradients), as relative error with an elementwise floor (see tests.testing.check_rel)
# fp32 sums over V = 128k carry ~2e-5 relative rounding, hence 1e-4 (Liger's fp32 rtol is 5e-4).
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1.5e-2)}
TOL_LINEAR = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-3, 2e-2)}


def _kl64(student, teacher, labels, direction, temperature, ignore_index=-100):
    """Float64 truth, written independently of naive.py: explicit softmax and sums."""
    s = student.detach().double().requires_grad_()
    ls = s / temperature
    lt = teacher.detach().double() / temperature
    log_ps = ls - ls.exp().sum(-1, keepdim=True).log()
    log_pt = lt - lt.exp().sum(-1, keepdim=True).log()
    ps, pt = log_ps.exp(), log_pt.exp()
    rows = (ps * (log_ps - log_pt)).sum(-1) if direction == "reverse" else (pt * (log_pt - log_ps)).sum(-1)
    keep = torch.ones_like(rows) if labels is None else (labels != ignore_index).double()
    loss = (rows * keep).sum() / keep.sum().clamp_min(1)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def _inputs(T, V, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(T, V, generator=g) * scale).to(dtype).to(device)
    t = (torch.randn(T, V, generator=g) * scale + 0.5 * s.float().cpu()).to(dtype).to(device)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < 0.3] = -100
    return s, t, labels.to(device)


OPTS = [
    ("reverse", 1.0, None, "reverse-t1-chunkdefault"),
    ("reverse", 0.7, 10, "reverse-t0.7-chunk10"),
    ("forward", 2.0, 17, "forward-t2-chunk17"),
    ("forward", 1.0, None, "forward-t1-chunkdefault"),
]


def _cases(odd, big):
    """Every option on the odd shape; two (one per direction, chunks not dividing T) on the realistic one."""
    out = [pytest.param(*odd[:-1], *o[:3], id=f"{odd[-1]}-{o[3]}") for o in OPTS]
    return out + [pytest.param(*big[:-1], *o[:3], id=f"{big[-1]}-{o[3]}") for o in (OPTS[1], OPTS[2])]


CASES = _cases((63, 1423, "T63-V1423"), (64, 128256, "T64-V128256"))


@pytest.mark.parametrize("T,V,direction,temperature,chunk", CASES)
def test_reference_matches_float64(T, V, direction, temperature, chunk):
    s, t, labels = _inputs(T, V, torch.float32, "cpu")
    s.requires_grad_()
    loss = fused_kl_div_ref(s, t, labels, direction=direction, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, s)
    loss64, grad64 = _kl64(s, t, labels, direction, temperature)
    check_rel("loss", loss64, loss, 1e-4)
    check_rel("grad", grad64, grad, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,V,direction,temperature,chunk", CASES)
def test_fused_kl_div_matches_reference(T, V, direction, temperature, chunk, dtype, device):
    s, t, labels = _inputs(T, V, dtype, device)
    s.requires_grad_()
    kw = dict(direction=direction, temperature=temperature)
    loss, stats = fused_kl_div(s, t, labels, chunk_size=chunk, return_stats=True, **kw)
    (grad,) = torch.autograd.grad(loss, s)
    ref_loss, ref_stats = fused_kl_div_ref(s, t, labels, return_stats=True, **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, s)
    tol_loss, tol_grad = TOL[dtype]
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    check_rel("loss", ref_loss, loss, tol_loss)
    check_rel("grad", ref_grad, grad, tol_grad)
    assert int(stats.num_tokens) == int(ref_stats.num_tokens)
    assert stats.top1_agreement.item() == pytest.approx(ref_stats.top1_agreement.item(), abs=1e-6)
    assert stats.kl.item() == pytest.approx(loss.item())
    if dtype == torch.float32 and V < 10_000:  # the fused path against the float64 truth directly
        loss64, grad64 = _kl64(s, t, labels, direction, temperature)
        check_rel("loss vs fp64", loss64, loss, 1e-5)
        check_rel("grad vs fp64", grad64, grad, 5e-5)


LINEAR_CASES = _cases((63, 67, 1423, "T63-H67-V1423"), (80, 64, 32000, "T80-H64-V32000"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "T,H,V,direction,temperature,chunk,with_bias",
    # lm_head bias is covered on the odd shapes only (V <= 10k) to keep the suite fast.
    [
        pytest.param(*case.values, bias, id=f"{case.id}-{'bias' if bias else 'nobias'}")
        for case in LINEAR_CASES
        for bias in (False, True)
        if not (bias and case.values[2] > 10_000)
    ],
)
def test_fused_linear_kl_div_matches_reference(T, H, V, direction, temperature, chunk, with_bias, dtype, device):
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(T, H, generator=g)).to(dtype).to(device).requires_grad_()
    w = (torch.randn(V, H, generator=g) * H**-0.5 * 2).to(dtype).to(device).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).to(device).requires_grad_() if with_bias else None
    t = (torch.randn(T, V, generator=g) * 2).to(dtype).to(device)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::4] = -100
    labels = labels.to(device)
    kw = dict(direction=direction, temperature=temperature, lm_head_bias=b)
    params = [h, w] + ([b] if with_bias else [])
    loss = fused_linear_kl_div(h, w, t, labels, chunk_size=chunk, **kw)
    grads = torch.autograd.grad(loss, params)
    ref_loss = fused_linear_kl_div_ref(h, w, t, labels, **kw)
    ref_grads = torch.autograd.grad(ref_loss, params)
    tol_loss, tol_grad = TOL_LINEAR[dtype]
    check_rel("loss", ref_loss, loss, tol_loss)
    for name, r, x in zip(["grad_hidden", "grad_weight", "grad_bias"], ref_grads, grads):
        assert x.dtype == r.dtype
        check_rel(name, r, x, tol_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_fully_masked_batch_is_zero(direction, device):
    s, t, _ = _inputs(20, 300, torch.float32, device)
    s.requires_grad_()
    labels = torch.full((20,), -100, device=device)
    loss, stats = fused_kl_div(s, t, labels, direction=direction, chunk_size=7, return_stats=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert s.grad.abs().max().item() == 0.0
    assert int(stats.num_tokens) == 0 and stats.top1_agreement.item() == 0.0 and stats.kl.item() == 0.0
    ref = fused_kl_div_ref(s, t, labels, direction=direction)
    assert ref.item() == 0.0

    h = torch.randn(20, 16, device=device, requires_grad=True)
    w = torch.randn(300, 16, device=device, requires_grad=True)
    loss = fused_linear_kl_div(h, w, t, labels, direction=direction, chunk_size=7)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0 and w.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_no_labels_stats_and_leading_dims(device):
    s, t, _ = _inputs(24, 500, torch.float32, device)
    t[:5] = s[:5] * 2  # these rows agree on the argmax
    s = s.view(4, 6, 500).requires_grad_()
    t = t.view(4, 6, 500)
    loss, stats = fused_kl_div(s, t, None, chunk_size=5, return_stats=True)
    loss.backward()
    ref_loss, ref_stats = fused_kl_div_ref(s.view(24, 500), t.view(24, 500), None, return_stats=True)
    check_rel("loss", ref_loss, loss, 1e-5)
    agree = (s.argmax(-1) == t.argmax(-1)).float().mean().item()
    assert agree >= 5 / 24
    assert stats.top1_agreement.item() == pytest.approx(agree) == pytest.approx(ref_stats.top1_agreement.item())
    assert int(stats.num_tokens) == 24 and s.grad.shape == (4, 6, 500)


@pytest.mark.parametrize("device", DEVICES)
def test_upstream_gradient_scale_and_single_backward(device):
    s, t, labels = _inputs(30, 400, torch.float32, device)
    s.requires_grad_()
    (grad1,) = torch.autograd.grad(3.5 * fused_kl_div(s, t, labels), s)
    (grad_ref,) = torch.autograd.grad(3.5 * fused_kl_div_ref(s, t, labels), s)
    check_rel("scaled grad", grad_ref, grad1, 1e-5)
    loss = fused_kl_div(s, t, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_teacher_gets_no_gradient_and_bad_args():
    s, t, labels = _inputs(8, 50, torch.float32, "cpu")
    s.requires_grad_()
    t.requires_grad_()
    fused_kl_div(s, t, labels).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError):
        fused_kl_div(s, t, direction="sideways")
    with pytest.raises(ValueError):
        fused_kl_div(s, t, temperature=0.0)


def _record(fn):
    with AllocationRecorder() as rec:
        fn()
    return rec


@pytest.mark.parametrize("op", ["linear", "logits"])
def test_memory_does_not_scale_with_tokens(op, monkeypatch):
    """Fresh allocations (fwd + bwd, PyTorch path) never reach T x V except the returned logits gradient,
    and the largest one is the same for T = 64 and T = 192 at a fixed chunk."""
    monkeypatch.setenv("M1_KERNELS_IMPL", "torch")
    V, H, chunk = 1423, 40, 16  # H < T keeps (V, H) below the (T, V) threshold
    largest = {}
    for T in (48, 192):
        s, t, labels = _inputs(T, V, torch.float32, "cpu")
        if op == "linear":
            h = torch.randn(T, H, requires_grad=True)
            w = torch.randn(V, H, requires_grad=True)
            rec = _record(lambda: fused_linear_kl_div(h, w, t, labels, chunk_size=chunk).backward())  # noqa: B023
            assert rec.at_least(T * V) == [], rec.at_least(T * V)
            # grad_hidden (T, H) and grad_weight (V, H) are outputs of their inputs' size, allowed
            largest[T] = max(x for x in rec.sizes() if x not in (V * H, T * H))
        else:
            s.requires_grad_()
            rec = _record(lambda: fused_kl_div(s, t, labels, chunk_size=chunk).backward())  # noqa: B023
            big = rec.at_least(T * V)
            assert len(big) == 1 and big[0][1] == (T, V), big  # the student gradient, written once
            largest[T] = max(x for x in rec.sizes() if x < T * V)
        assert largest[T] <= chunk * V
    assert largest[48] == largest[192]


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from m1_kernels.fused_kl import fused_kl_div, fused_kl_div_ref, fused_linear_kl_div, fused_linear_kl_div_ref
    from m1_kernels.fused_kl.triton_kernels import _kl_fwd_bwd_kernel
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(_kl_fwd_bwd_kernel, InterpretedFunction) or "Interpreted" in type(_kl_fwd_bwd_kernel).__name__ \\
        or getattr(_kl_fwd_bwd_kernel, "fn", None) is not None
    torch.manual_seed(0)
    worst = 0.0
    for direction in ("reverse", "forward"):
        for dtype in (torch.float32, torch.bfloat16):
            T, V = 11, 1423  # V spans a partial last block (BLOCK_V = 2048)
            s = (torch.randn(T, V) * 3).to(dtype).requires_grad_()
            t = (torch.randn(T, V) * 3).to(dtype)
            t[2] = s[2].detach() * 2
            labels = torch.randint(0, V, (T,)); labels[::3] = -100
            for lab in (labels, None, torch.full((T,), -100)):
                loss, st = fused_kl_div(s, t, lab, direction=direction, temperature=1.3, chunk_size=4,
                                        return_stats=True)
                g, = torch.autograd.grad(loss, s)
                rl, rst = fused_kl_div_ref(s, t, lab, direction=direction, temperature=1.3, return_stats=True)
                rg, = torch.autograd.grad(rl, s)
                tol = 1e-5 if dtype == torch.float32 else 1.5e-2
                le = (loss - rl).abs().item() / max(rl.abs().item(), 1e-12)
                ge = ((g.double() - rg.double()).norm() / rg.double().norm().clamp_min(1e-30)).item()
                assert torch.isfinite(g).all() and le < 1e-5 and (ge < tol or rg.abs().max() == 0), (le, ge)
                assert abs(st.top1_agreement.item() - rst.top1_agreement.item()) < 1e-6
                worst = max(worst, ge)
            h = torch.randn(9, 33).to(dtype).requires_grad_(); w = torch.randn(V, 33).to(dtype).requires_grad_()
            loss = fused_linear_kl_div(h, w, t[:9], labels[:9], direction=direction, chunk_size=4)
            gh, gw = torch.autograd.grad(loss, (h, w))
            rl = fused_linear_kl_div_ref(h, w, t[:9], labels[:9], direction=direction)
            rh, rw = torch.autograd.grad(rl, (h, w))
            for a, b in ((gh, rh), (gw, rw)):
                e = ((a.double() - b.double()).norm() / b.double().norm()).item()
                assert e < (2e-5 if dtype == torch.float32 else 2e-2), e
    print(f"TRITON_INTERPRET OK worst grad rel err {worst:.2e}")
    """
)


def test_triton_kernel_under_interpreter():
    """Runs the Triton kernel on CPU through triton's interpreter.

    ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates the kernel (at import of
    ``triton_kernels.py``), so it cannot be switched on inside this already-running process once
    that module may have been imported: the check runs in a fresh subprocess with the env set.
    """
    run_script_under_interpreter(_INTERPRET_SCRIPT)
