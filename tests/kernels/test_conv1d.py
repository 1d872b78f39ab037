"""Causal conv1d: reference vs a float64 loop, vs causal-conv1d's own reference, and Triton vs reference.

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

from m1_kernels.conv1d.naive import causal_conv1d_ref
from m1_kernels.conv1d.naive import causal_conv1d_update_ref
from tests.kernels.interpreter import CUDA
from tests.kernels.interpreter import TRITON_DEVICES
from tests.kernels.interpreter import rerun_triton_tests_in_subprocess
from tests.kernels.interpreter import triton_module
from tests.testing import assert_close
from tests.testing import random_cu_seqlens
from tests.testing import rel_err

if not CUDA:
    print("test_conv1d: no CUDA device, Triton runs under TRITON_INTERPRET=1 on CPU (small shapes)")


def _triton():
    """The Triton conv module (interpreted on CPU, see module docstring)."""
    return triton_module("m1_kernels.conv1d.triton_conv")


def test_triton_tests_in_interpreter_subprocess():
    """CPU only: rerun this file's Triton tests in a fresh process when they could not run in this one."""
    rerun_triton_tests_in_subprocess(__file__)


def _naive64(x, weight, bias, activation, cu_seqlens, initial_state, return_final_state=True):
    """Float64 loop: every output position and tap written out. Differentiable (for the grads)."""
    b, L, d = x.shape
    K = weight.shape[1]
    x, w = x.double(), weight.double()
    segs = (
        [(r, 0, L) for r in range(b)]
        if cu_seqlens is None
        else [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    )
    outs, finals = [], []
    for i, (r, s, e) in enumerate(segs):
        h0 = initial_state[i].double() if initial_state is not None else torch.zeros(d, K - 1, dtype=torch.float64)

        def inp(p, r=r, s=s, h0=h0):
            return x[r, p] if p >= s else h0[:, p - s + K - 1]

        rows = []
        for t in range(s, e):
            acc = bias.double() if bias is not None else torch.zeros(d, dtype=torch.float64)
            for k in range(K):
                acc = acc + w[:, k] * inp(t - (K - 1) + k)
            rows.append(F.silu(acc) if activation == "silu" else acc)
        outs.append(torch.stack(rows) if rows else torch.zeros(0, d, dtype=torch.float64))
        finals.append(torch.stack([inp(e - (K - 1) + j) for j in range(K - 1)], -1) if K > 1 else h0)
    y = torch.stack(outs) if cu_seqlens is None else torch.cat(outs).unsqueeze(0)
    return y, torch.stack(finals)


def _make(b, L, d, K, n_states, dtype=torch.float32, device="cpu", seed=0, strided=True):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a slice of a wider projection output, like x inside in_proj's output
        x = torch.randn(b, L, d + 7, generator=g)[:, :, 3 : 3 + d]
    else:
        x = torch.randn(b, L, d, generator=g)
    x = x.to(dtype).to(device)
    w = (torch.randn(d, K, generator=g) / K**0.5).to(device)
    bias = torch.randn(d, generator=g).to(device)
    h0 = torch.randn(n_states, d, K - 1, generator=g).to(dtype).to(device)
    return x, w, bias, h0


def _grads(fn, x, w, bias, h0, cu, activation, seed=1):
    """Output, final state and grads of (x, w, bias, h0) under random cotangents on both outputs."""
    x, w, bias = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    h0 = h0.detach().clone().requires_grad_() if h0 is not None else None
    y, fin = fn(x, w, bias, activation, cu, h0, True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y)
    gf = torch.randn(fin.shape, generator=g).to(fin)
    ins = [x, w, bias] + ([h0] if h0 is not None else [])
    grads = torch.autograd.grad((y.float() * gy.float()).sum() + (fin.float() * gf.float()).sum(), ins)
    names = ["dx", "dweight", "dbias", "dinit"]
    return {"out": y, "final": fin, **dict(zip(names, grads))}


def _compare(ref, got, atol, rtol):
    for k in ref:
        assert_close(k, ref[k], got[k], atol=atol, rtol=rtol)


LENGTHS = [1, 5, 1, 17, 2, 9]  # packed documents: lengths 1 and shorter than K-1 included


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize(
    "b,L,d,K,packed",
    [
        pytest.param(2, 63, 96, 4, False, id="padded-b2-T63-d96-K4"),
        pytest.param(1, 64, 3072, 4, False, id="M1-T64-d3072-K4"),
        pytest.param(1, sum(LENGTHS), 96, 4, True, id="packed-d96-K4"),
        pytest.param(1, sum(LENGTHS), 20, 3, True, id="packed-d20-K3"),
        pytest.param(2, 7, 20, 2, False, id="padded-d20-K2"),
    ],
)
def test_reference_vs_float64_loop(b, L, d, K, packed, activation):
    cu = random_cu_seqlens(LENGTHS) if packed else None
    n = len(LENGTHS) if packed else b
    x, w, bias, h0 = _make(b, L, d, K, n, dtype=torch.float64)
    w, bias = w.double(), bias.double()
    ref = _grads(causal_conv1d_ref, x, w, bias, h0, cu, activation)
    loop = _grads(_naive64, x, w, bias, h0, cu, activation)
    _compare(loop, ref, atol=1e-10, rtol=1e-10)


def test_reference_packed_equals_documents_one_by_one():
    d, K = 24, 4
    lengths = [1, 3, 8, 1, 2, 30]
    cu = random_cu_seqlens(lengths)
    x, w, bias, h0 = _make(1, sum(lengths), d, K, len(lengths), dtype=torch.float64)
    y, fin = causal_conv1d_ref(x, w, bias, "silu", cu, h0, True)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        yi, fi = causal_conv1d_ref(x[:, s:e], w, bias, "silu", None, h0[i : i + 1], True)
        assert_close(f"doc {i} out", yi, y[:, s:e], atol=1e-12)
        assert_close(f"doc {i} final", fi, fin[i : i + 1], atol=1e-12)


def _causal_conv1d_pkg():
    """causal-conv1d's own references, importable without its compiled ``causal_conv1d_cuda``."""
    if importlib.util.find_spec("causal_conv1d") is None:
        pytest.skip("causal_conv1d is not installed")
    if "causal_conv1d_cuda" not in sys.modules and importlib.util.find_spec("causal_conv1d_cuda") is None:
        # An empty stand-in module: cpp_functions imports it at module level but the *_ref functions never use it.
        sys.modules.setdefault("causal_conv1d_cuda", types.ModuleType("causal_conv1d_cuda"))
    return importlib.import_module("causal_conv1d.causal_conv1d_interface")


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("K", [2, 3, 4])
def test_reference_vs_causal_conv1d_package(K, activation):
    """Oracle we did not write: causal_conv1d_ref (channel-major x) with states, seq_idx packing and the update."""
    cc = _causal_conv1d_pkg()
    b, L, d = 3, 11, 40
    x, w, bias, h0 = _make(b, L, d, K, b, dtype=torch.float64)
    w, bias = w.double(), bias.double()  # their reference computes in the weight's dtype
    y, fin = causal_conv1d_ref(x, w, bias, activation, None, h0, True)
    y_cc, fin_cc = cc.causal_conv1d_ref(
        x.transpose(1, 2), w, bias, initial_states=h0, return_final_states=True, activation=activation
    )
    assert_close("out", y_cc.transpose(1, 2), y, atol=1e-12)
    assert_close("final", fin_cc, fin, atol=1e-12)
    # Packed: causal-conv1d marks documents with seq_idx (no states on that path).
    lengths = [4, 1, 9, 2]
    cu = random_cu_seqlens(lengths)
    xp, *_ = _make(1, sum(lengths), d, K, 1, dtype=torch.float64, seed=2)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None]
    y_cc = cc.causal_conv1d_ref(xp.transpose(1, 2), w, bias, activation=activation, seq_idx=seq_idx)
    assert_close("packed out", y_cc.transpose(1, 2), causal_conv1d_ref(xp, w, bias, activation, cu), atol=1e-12)
    # Decode update (no slot indirection in theirs: slot i == row i).
    state = torch.randn(b, d, K - 1, dtype=torch.float64)
    ours, theirs = state.clone(), state.clone()
    xt = torch.randn(b, d, dtype=torch.float64)
    o = causal_conv1d_update_ref(xt, ours, w, bias, activation)
    o_cc = cc.causal_conv1d_update_ref(xt, theirs, w, bias, activation)
    assert_close("update out", o_cc, o, atol=1e-12)
    assert_close("update state", theirs, ours, atol=1e-12)


def _tol(dtype):
    return (2e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_document_index_is_searched_once_per_tensor(monkeypatch, device):
    """Each token's document is a search on the device (four launches): done once per cu_seqlens tensor, even an
    int64 one (converted to int32 once), and again after an in-place change, with the outputs following it."""
    tc = _triton()
    searches, real = [], torch.searchsorted
    monkeypatch.setattr(torch, "searchsorted", lambda *a, **k: searches.append(1) or real(*a, **k))
    cu = torch.tensor([0, 5, 6, 13], device=device)  # int64: converted to int32 once
    x, w, bias, _ = _make(1, 13, 8, 4, 3, dtype=torch.float32, device=device)
    first = tc.causal_conv1d_triton(x, w, bias, "silu", cu)
    again = tc.causal_conv1d_triton(x, w, bias, "silu", cu)
    assert len(searches) == 1 and torch.equal(first, again)
    cu[1] = 2  # documents [0, 2), [2, 6), [6, 13)
    moved = tc.causal_conv1d_triton(x, w, bias, "silu", cu)
    assert len(searches) == 2
    assert_close("out", causal_conv1d_ref(x, w, bias, "silu", cu.to(torch.int32)), moved, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize(
    "b,L,d,K,packed,init",
    [
        pytest.param(2, 63, 96, 4, False, True, id="padded-b2-T63-d96-K4-init"),
        pytest.param(1, sum(LENGTHS), 96, 4, True, True, id="packed-d96-K4-init"),
        pytest.param(1, sum(LENGTHS), 40, 3, True, False, id="packed-d40-K3"),
        pytest.param(3, 5, 20, 2, False, False, id="padded-b3-T5-d20-K2"),
        pytest.param(1, sum(LENGTHS), 20, 1, True, False, id="packed-d20-K1"),
        pytest.param(1, 2, 20, 4, False, True, id="T2-shorter-than-state"),
    ],
)
def test_triton_vs_reference(b, L, d, K, packed, init, activation, dtype, device):
    tc = _triton()
    cu = random_cu_seqlens(LENGTHS, device) if packed else None
    n = len(LENGTHS) if packed else b
    x, w, bias, h0 = _make(b, L, d, K, n, dtype=dtype, device=device)
    h0 = h0 if init else None
    ref = _grads(causal_conv1d_ref, x, w, bias, h0, cu, activation)
    tri = _grads(tc.causal_conv1d_triton, x, w, bias, h0, cu, activation)
    assert tri["out"].dtype == dtype and tri["final"].dtype == dtype
    atol, rtol = _tol(dtype)
    for k in ("out", "final"):
        assert_close(k, ref[k], tri[k], atol=atol, rtol=rtol)
    for k in ("dx", "dweight", "dbias", "dinit"):
        if k in ref:
            if dtype == torch.float32:
                assert_close(k, ref[k], tri[k], atol=1e-4, rtol=1e-4)
            else:  # bf16 rounding of x/dx; fp32 accumulation on both sides
                assert rel_err(ref[k], tri[k]) < 1e-2, f"{k}: rel err {rel_err(ref[k], tri[k]):.2e}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_packed_equals_documents_and_padded(device):
    """Packed == each document alone (Triton), and packed == a padded batch of equal-length documents."""
    tc = _triton()
    d, K = 40, 4
    lengths = [1, 6, 2, 13]
    cu = random_cu_seqlens(lengths, device)
    x, w, bias, h0 = _make(1, sum(lengths), d, K, len(lengths), device=device)
    y, fin = tc.causal_conv1d_triton(x, w, bias, "silu", cu, h0, True)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        yi, fi = tc.causal_conv1d_triton(x[:, s:e], w, bias, "silu", None, h0[i : i + 1], True)
        assert_close(f"doc {i} out", yi, y[:, s:e], atol=1e-6)
        assert_close(f"doc {i} final", fi, fin[i : i + 1], atol=1e-6)
    xb, *_ = _make(3, 7, d, K, 3, device=device, seed=4)
    yb, fb = tc.causal_conv1d_triton(xb, w, bias, "silu", None, h0[:3], True)
    yp, fp = tc.causal_conv1d_triton(
        xb.reshape(1, 21, d), w, bias, "silu", random_cu_seqlens([7, 7, 7], device), h0[:3], True
    )
    assert_close("padded vs packed out", yb.reshape(1, 21, d), yp, atol=1e-6)
    assert_close("padded vs packed final", fb, fp, atol=1e-6)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_then_update_equals_full_conv(impl, dtype):
    """Prefill (final states into a slot cache) then decode steps == the full conv at those positions."""
    device = TRITON_DEVICES[0] if impl == "triton" else "cpu"
    if impl == "triton":
        tc = _triton()
        conv, update = tc.causal_conv1d_triton, tc.causal_conv1d_update_triton
    else:
        conv, update = causal_conv1d_ref, causal_conv1d_update_ref
    b, L, steps, d, K = 3, 9, 3, 48, 4
    x, w, bias, _ = _make(b, L + steps, d, K, b, dtype=dtype, device=device, strided=False)
    full = conv(x, w, bias, "silu")
    _, fin = conv(x[:, :L], w, bias, "silu", None, None, True)
    cache = torch.zeros(b + 2, d, K - 1, dtype=dtype, device=device)
    slots = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    cache[slots.long()] = fin
    atol, rtol = _tol(dtype)
    for t in range(steps):
        o = update(x[:, L + t], cache, w, bias, "silu", slots, -1)
        assert_close(f"step {t}", full[:, L + t], o, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_triton_update_vs_reference(K, dtype, device):
    tc = _triton()
    b, d, n_slots = 4, 72, 7
    g = torch.Generator().manual_seed(6)
    x = torch.randn(b, 2 * d, generator=g)[:, ::2].to(dtype).to(device)  # strided rows
    w, bias = torch.randn(d, K, generator=g).to(device), torch.randn(d, generator=g).to(device)
    state = torch.randn(n_slots, d, K - 1, generator=g).to(dtype).to(device)
    slots = torch.tensor([5, -1, 0, 3], dtype=torch.int32, device=device)
    for act in ("silu", None):
        s_ref, s_tri = state.clone(), state.clone()
        o_ref = causal_conv1d_update_ref(x, s_ref, w, bias, act, slots, -1)
        o_tri = tc.causal_conv1d_update_triton(x, s_tri, w, bias, act, slots, -1)
        atol, rtol = _tol(dtype)
        assert_close("out", o_ref, o_tri, atol=atol, rtol=rtol)
        assert torch.equal(s_ref, s_tri), "the state shift is a pure copy"
        assert (o_tri[1] == 0).all()
    s_ref, s_tri = state.clone(), state.clone()  # no indices: row i is slot i
    o_ref = causal_conv1d_update_ref(x, s_ref, w, None, None)
    o_tri = tc.causal_conv1d_update_triton(x, s_tri, w, None, None)
    assert_close("out (no indices)", o_ref, o_tri, atol=atol, rtol=rtol)
    assert torch.equal(s_ref, s_tri)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_triton_update_cuda_graph_capture():
    tc = _triton()
    b, d, K = 8, 3072, 4
    x = torch.randn(b, d, device="cuda", dtype=torch.bfloat16)
    w, bias = torch.randn(d, K, device="cuda"), torch.randn(d, device="cuda")
    cache = torch.randn(2 * b, d, K - 1, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(b, dtype=torch.int32, device="cuda")
    tc.causal_conv1d_update_triton(x, cache.clone(), w, bias, "silu", slots, -1)
    graph_cache = cache.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tc.causal_conv1d_update_triton(x, graph_cache, w, bias, "silu", slots, -1)
    slots.copy_(torch.tensor([3, -1, 9, 0, 15, 2, -1, 7], dtype=torch.int32))
    graph_cache.copy_(cache)
    g.replay()
    ref_cache = cache.clone()
    ref = causal_conv1d_update_ref(x, ref_cache, w, bias, "silu", slots, -1)
    assert_close("out", ref, out, atol=2e-2, rtol=2e-2)
    assert torch.equal(ref_cache, graph_cache)
