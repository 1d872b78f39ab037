"""Decode step of the selective scan: reference, Triton kernel, and mamba-ssm's reference as an oracle.

Triton on CPU runs under the interpreter (see ``tests/kernels/interpreter.py``); on a CUDA machine the same
tests run on the GPU.
"""

import importlib
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from m1_kernels.selective_scan.naive import selective_scan_ref
from m1_kernels.selective_scan.naive import selective_state_update_ref
from tests.kernels.interpreter import CUDA
from tests.kernels.interpreter import TRITON_DEVICES
from tests.kernels.interpreter import rerun_triton_tests_in_subprocess
from tests.kernels.interpreter import triton_module
from tests.testing import assert_close
from tests.testing import rel_err

if not CUDA:
    print("test_state_update: no CUDA device, Triton runs under TRITON_INTERPRET=1 on CPU (small shapes)")


# (b, d_inner, N, G_C, G_B): odd small shape, non-power-of-2 state, M1-3B groups at reduced width.
SHAPES = [
    pytest.param(3, 96, 16, 6, 2, id="b3-d96-N16-GC6-GB2"),
    pytest.param(2, 60, 12, 5, 1, id="b2-d60-N12-GC5-GB1"),
    pytest.param(4, 384, 16, 24, 8, id="b4-d384-N16-GC24-GB8"),
]
M1_SHAPE = (5, 3072, 16, 192, 64)  # M1-3B: d_inner 3072, d_state 16, 192 C groups, 64 B groups


def _triton_update():
    """``selective_state_update_triton`` (interpreted on CPU, see module docstring)."""
    return triton_module("m1_kernels.selective_scan.triton_update").selective_state_update_triton


def test_triton_tests_in_interpreter_subprocess():
    """CPU only: rerun this file's Triton tests in a fresh process when they could not run in this one."""
    rerun_triton_tests_in_subprocess(__file__)


def _inputs(b, d, N, G_C, G_B, n_slots, dtype=torch.float32, state_dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    state = torch.randn(n_slots, d, N, generator=g).to(state_dtype).to(device)
    x, dt, z = rnd(b, d), rnd(b, d, scale=0.5), rnd(b, d)
    A = (-torch.rand(d, N, generator=g) * 2 - 0.1).to(device)
    B, C = rnd(b, G_B, N), rnd(b, G_C, N)
    D, dt_bias = torch.randn(d, generator=g).to(device), (torch.randn(d, generator=g) * 0.5).to(device)
    return state, x, dt, A, B, C, D, z, dt_bias


def _naive_step64(state, x, dt, A, B, C, D, z, dt_bias, softplus, slots, pad):
    """Float64 loop over rows with the formula written out; returns (y, new state)."""
    state = state.double().clone()
    b, d = x.shape
    G_C, G_B = C.shape[1], B.shape[1]
    y = torch.zeros(b, d, dtype=torch.float64)
    for i in range(b):
        s = int(slots[i])
        if s == pad:
            continue
        for ch in range(d):
            cg = ch // (d // G_C)
            bg = cg // (G_C // G_B)
            delta = float(dt[i, ch]) + (float(dt_bias[ch]) if dt_bias is not None else 0.0)
            if softplus:
                delta = F.softplus(torch.tensor(delta, dtype=torch.float64)).item()
            h = torch.exp(delta * A[ch].double()) * state[s, ch] + delta * float(x[i, ch]) * B[i, bg].double()
            state[s, ch] = h
            out = float((h * C[i, cg].double()).sum()) + (float(D[ch]) * float(x[i, ch]) if D is not None else 0.0)
            if z is not None:
                zz = float(z[i, ch])
                out *= zz / (1 + torch.exp(torch.tensor(-zz, dtype=torch.float64)).item())
            y[i, ch] = out
    return y, state


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state_fp32", "state_bf16"])
@pytest.mark.parametrize("full", [True, False], ids=["all_args", "bare"])
def test_reference_vs_float64_formula(state_dtype, full):
    b, d, N, G_C, G_B = 4, 24, 4, 6, 2
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(b, d, N, G_C, G_B, 6, state_dtype=state_dtype)
    if not full:
        D = z = dt_bias = None
    slots = torch.tensor([4, -1, 0, 2], dtype=torch.int32)
    y64, s64 = _naive_step64(state, x, dt, A, B, C, D, z, dt_bias, full, slots, -1)
    ref_state = state.clone()
    y = selective_state_update_ref(ref_state, x, dt, A, B, C, D, z, dt_bias, full, slots, -1)
    tol = 1e-5 if state_dtype == torch.float32 else 1e-2
    assert_close("y", y64, y, atol=tol, rtol=tol)
    assert_close("state", s64.to(state_dtype), ref_state, atol=tol, rtol=tol)
    assert torch.equal(ref_state[[1, 3, 5]], state[[1, 3, 5]]), "untouched slots changed"
    assert (y[1] == 0).all(), "pad row must output zeros"


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_decode_steps_equal_scan(impl):
    """T decode steps from an initial state == the scan reference with initial_state / return_final_state."""
    b, T, d, N, G_C, G_B = 2, 5, 48, 8, 6, 3
    device = TRITON_DEVICES[0] if impl == "triton" else "cpu"
    step = _triton_update() if impl == "triton" else selective_state_update_ref
    g = torch.Generator().manual_seed(1)
    x, dt, z = (torch.randn(b, T, d, generator=g).to(device) for _ in range(3))
    B, C = torch.randn(b, T, G_B, N, generator=g).to(device), torch.randn(b, T, G_C, N, generator=g).to(device)
    A = (-torch.rand(d, N, generator=g) - 0.1).to(device)
    D, dt_bias = torch.randn(d, generator=g).to(device), torch.randn(d, generator=g).to(device)
    h0 = torch.randn(b, d, N, generator=g).to(device)
    y_scan, h_scan = selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, True, initial_state=h0, return_final_state=True)
    state = h0.clone()
    ys = [step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], dt_bias, True, None, -1) for t in range(T)]
    assert_close("y", y_scan, torch.stack(ys, 1), atol=1e-4, rtol=1e-4)
    assert_close("final state", h_scan, state, atol=1e-4, rtol=1e-4)


def _mamba_ssm_ref():
    """mamba-ssm's own ``selective_state_update_ref`` without its CUDA extensions.

    ``mamba_ssm/__init__.py`` imports the compiled ``selective_scan_cuda``; a bare package module with
    the real ``__path__`` lets the submodule import without running it. sys.modules is restored after.
    """
    pytest.importorskip("einops")
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("mamba_ssm is not installed")
    saved = {k: v for k, v in sys.modules.items() if k == "mamba_ssm" or k.startswith("mamba_ssm.")}
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = pkg
    try:
        mod = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        return mod.selective_state_update_ref
    except ImportError as e:
        pytest.skip(f"mamba_ssm.ops.triton.selective_state_update does not import: {e}")
    finally:
        for k in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.parametrize("shape", [(3, 96, 16, 6, 2), M1_SHAPE], ids=["d96-GC6-GB2", "M1-3B"])
def test_reference_vs_mamba_ssm(shape):
    """M1's decode layout: state viewed (b, h, P, N) with h = G_C heads of P = d_inner / G_C channels.

    In M1-3B P = N = 16 and h = 192 (``Mamba.step``). Each head reads one C group; B is the repeated
    (b, G_C, N) tensor (mamba-ssm's reference requires as many B as C groups).
    """
    ref_fn = _mamba_ssm_ref()
    b, d, N, G_C, G_B = shape
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(b, d, N, G_C, G_B, b, seed=3)
    h, P = G_C, d // G_C
    ours_state, theirs_state = state.clone(), state.clone()
    y = selective_state_update_ref(ours_state, x, dt, A, B, C, D, z, dt_bias, True)
    y_m = ref_fn(
        theirs_state.view(b, h, P, N),
        x.view(b, h, P),
        dt.view(b, h, P),
        A.view(h, P, N),
        B.repeat_interleave(G_C // G_B, dim=1),
        C,
        D=D.view(h, P),
        z=z.view(b, h, P),
        dt_bias=dt_bias.view(h, P),
        dt_softplus=True,
    ).reshape(b, d)
    assert_close("y", y_m, y, atol=1e-5, rtol=1e-5)
    assert_close("state", theirs_state, ours_state, atol=1e-5, rtol=1e-5)


def _tol(dtype):
    return (2e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["state_fp32", "state_bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
@pytest.mark.parametrize("b,d,N,G_C,G_B", SHAPES)
def test_triton_vs_reference(b, d, N, G_C, G_B, dtype, state_dtype, device):
    fn = _triton_update()
    n_slots = b + 3
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(b, d, N, G_C, G_B, n_slots, dtype, state_dtype, device)
    slots = torch.randperm(n_slots, generator=torch.Generator().manual_seed(5))[:b].to(torch.int32)
    slots[b // 2] = -1  # a CUDA-graph padding row
    slots = slots.to(device)
    ref_state, tri_state = state.clone(), state.clone()
    y_ref = selective_state_update_ref(ref_state, x, dt, A, B, C, D, z, dt_bias, True, slots, -1)
    y_tri = fn(tri_state, x, dt, A, B, C, D, z, dt_bias, True, slots, -1)
    atol, rtol = _tol(dtype)
    assert y_tri.dtype == x.dtype and tri_state.dtype == state_dtype
    assert_close("y", y_ref, y_tri, atol=atol, rtol=rtol)
    s_atol, s_rtol = _tol(state_dtype)
    assert_close("state", ref_state, tri_state, atol=s_atol, rtol=s_rtol)
    assert (y_tri[b // 2] == 0).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_strided_and_optional_args(device):
    """Strided cache (every other slot of a bigger buffer, N sliced), strided x, no D/z/dt_bias, no indices."""
    fn = _triton_update()
    b, d, N, G_C, G_B = 3, 32, 8, 4, 2
    _, x, dt, A, B, C, *_ = _inputs(b, d, 2 * N, G_C, G_B, 1, device=device, seed=7)
    A, B, C = A[:, :N], B[..., :N], C[..., :N]
    big = torch.randn(2 * b, d, 2 * N, generator=torch.Generator().manual_seed(8)).to(device)
    xs = torch.randn(b, 2 * d, generator=torch.Generator().manual_seed(9)).to(device)[:, ::2]
    for softplus in (True, False):
        ref_state, tri_buf = big[::2, :, :N].clone(), big.clone()
        tri_state = tri_buf[::2, :, :N]
        dtp = dt.abs() if not softplus else dt
        y_ref = selective_state_update_ref(ref_state, xs, dtp, A, B, C, dt_softplus=softplus)
        y_tri = fn(tri_state, xs, dtp, A, B, C, None, None, None, softplus, None, -1)
        assert_close("y", y_ref, y_tri, atol=2e-5, rtol=1e-4)
        assert_close("state", ref_state, tri_state, atol=2e-5, rtol=1e-4)
        assert torch.equal(tri_buf[1::2], big[1::2]) and torch.equal(tri_buf[::2, :, N:], big[::2, :, N:])


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_triton_cuda_graph_capture():
    """The decode step captures in a CUDA graph and replays with new slot indices (no host syncs)."""
    fn = _triton_update()
    b, d, N, G_C, G_B = M1_SHAPE
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(b, d, N, G_C, G_B, 2 * b, state_dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(b, dtype=torch.int32, device="cuda")
    fn(state.clone(), x, dt, A, B, C, D, z, dt_bias, True, slots, -1)  # compile outside the capture
    graph_state = state.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn(graph_state, x, dt, A, B, C, D, z, dt_bias, True, slots, -1)
    slots.copy_(torch.tensor([7, -1, 2, 9, 0], dtype=torch.int32))
    graph_state.copy_(state)
    g.replay()
    ref_state = state.clone()
    y_ref = selective_state_update_ref(ref_state, x, dt, A, B, C, D, z, dt_bias, True, slots, -1)
    assert_close("y", y_ref, y, atol=1e-4, rtol=1e-4)
    assert rel_err(ref_state, graph_state) < 1e-2
