"""Selective scan: reference vs a float64 loop and vs mamba-ssm, and the Triton and CUDA kernels vs the reference.

The Triton kernels run on CUDA when there is a GPU, and on CPU under ``TRITON_INTERPRET=1``. That
variable must be set before ``triton`` itself is imported, not just before our kernel module: the
interpreter calls triton's own ``@triton.jit`` helpers (``tl.sigmoid``, ``tl.cdiv``, the ``tl.sum``
combine function), which are decorated when ``import triton`` runs, and a compiled-mode JITFunction
raises "Cannot call @triton.jit'd outside of the scope of a kernel" inside an interpreted kernel. In a
pytest session triton is usually imported long before this file, so the CPU Triton cases run in a
child pytest process started with ``TRITON_INTERPRET=1`` (``test_triton_cpu_under_interpreter``); in
the parent they are skipped with that reason, in the child they run.
"""

import importlib
import os
import subprocess
import sys
import types

import pytest
import torch

from m1_kernels.selective_scan.naive import TensorMemo
from m1_kernels.selective_scan.naive import check_cu_seqlens
from m1_kernels.selective_scan.naive import cu_seqlens_int32
from m1_kernels.selective_scan.naive import cu_seqlens_memo
from m1_kernels.selective_scan.naive import documents_longest_first
from m1_kernels.selective_scan.naive import selective_scan_ref
from tests.testing import assert_close
from tests.testing import random_cu_seqlens
from tests.testing import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------------
# inputs


def make_inputs(b, L, d, N, G_C, G_B, dtype=torch.float32, device="cpu", n_states=None, seed=0, full=True):
    """Random inputs in the M1 ranges (dt_proj output ~ -2..0 before softplus, A = -exp(A_log))."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device)

    if dtype == torch.float64:  # everything in float64, parameters included

        def r(*shape, scale=1.0, shift=0.0, _r=r):
            return _r(*shape, scale=scale, shift=shift).double()

    x = r(b, L, d).to(dtype)
    dt = r(b, L, d, scale=0.5, shift=-1.0).to(dtype)
    A = -torch.exp(r(d, N, scale=0.5))
    B = r(b, L, G_B, N).to(dtype)
    C = r(b, L, G_C, N).to(dtype)
    out = dict(x=x, dt=dt, A=A, B=B, C=C)
    if full:
        out.update(D=r(d), z=r(b, L, d).to(dtype), dt_bias=r(d, scale=0.3), initial_state=r(n_states or b, d, N))
    return out


def leaves(inputs, dtype=None):
    """Fresh leaf copies (optionally cast) that require grad."""
    out = {}
    for k, v in inputs.items():
        v = v.detach().clone()
        if dtype is not None:
            v = v.to(dtype)
        out[k] = v.requires_grad_()
    return out


def run_and_grad(fn, ins, cu_seqlens=None, dt_softplus=True, seed=1):
    """Forward with final states, a random linear loss on y and the final states, backward."""
    y, final = fn(
        ins["x"],
        ins["dt"],
        ins["A"],
        ins["B"],
        ins["C"],
        ins.get("D"),
        ins.get("z"),
        ins.get("dt_bias"),
        dt_softplus,
        cu_seqlens,
        ins.get("initial_state"),
        True,
    )
    gen = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
    wf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(y.device)
    loss = (y.double() * wy).sum() + (final.double() * wf).sum()
    loss.backward()
    grads = {f"d{k}": v.grad for k, v in ins.items()}
    return {"y": y, "final": final, **grads}


def naive_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, cu_seqlens, initial_state, return_final_state):
    """Float64 token loop written independently of the reference: the group maps are repeat_interleave."""
    b, L, d = x.shape
    x, dt, A = x.double(), dt.double(), A.double()
    # C group of channel c is c // (d / G_C); its B group, (c // (d / G_C)) // (G_C / G_B), is c // (d / G_B).
    Bd = B.double().repeat_interleave(d // B.shape[2], dim=2)  # (b, L, d, N)
    Cd = C.double().repeat_interleave(d // C.shape[2], dim=2)
    if cu_seqlens is None:
        segments = [(r, 0, L) for r in range(b)]
    else:
        cu = cu_seqlens.tolist()
        segments = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    rows = [[] for _ in range(b)]  # per row, the list of y_t (appending keeps autograd cheap)
    finals = []
    for i, (row, start, end) in enumerate(segments):
        h = torch.zeros(d, A.shape[1], dtype=torch.float64, device=x.device)
        if initial_state is not None:
            h = initial_state[i].double()
        for t in range(start, end):
            v = dt[row, t] + (dt_bias.double() if dt_bias is not None else 0.0)
            delta = torch.log1p(torch.exp(v)) if dt_softplus else v
            h = torch.exp(delta[:, None] * A) * h + (delta * x[row, t])[:, None] * Bd[row, t]
            yt = (h * Cd[row, t]).sum(-1)
            if D is not None:
                yt = yt + D.double() * x[row, t]
            if z is not None:
                zt = z[row, t].double()
                yt = yt * zt / (1 + torch.exp(-zt))
            rows[row].append(yt)
        finals.append(h)
    y = torch.stack([torch.stack(r) for r in rows])
    return y, torch.stack(finals)


# (b, L, d, N, G_C, G_B, doc lengths or None)
REALISTIC = dict(d=3072, N=16, G_C=192, G_B=64)
ODD = dict(d=96, N=16, G_C=6, G_B=2)
REF_CASES = [
    pytest.param(2, 6, REALISTIC, None, id="M1-3B-padded-b2-T6"),
    pytest.param(1, 12, REALISTIC, [1, 7, 4], id="M1-3B-packed-T12"),
    pytest.param(3, 63, ODD, None, id="odd-padded-b3-T63-d96-GC6-GB2"),
    pytest.param(1, 63, ODD, [1, 30, 1, 7, 24], id="odd-packed-T63-docs5"),
]


# ----------------------------------------------------------------------------------------------------------------
# the reference


@pytest.mark.parametrize("b, L, shape, lengths", REF_CASES)
def test_reference_matches_float64_loop(b, L, shape, lengths):
    cu = random_cu_seqlens(lengths) if lengths else None
    n_states = len(lengths) if lengths else b
    inputs = make_inputs(b, L, shape["d"], shape["N"], shape["G_C"], shape["G_B"], torch.float64, n_states=n_states)
    ref = run_and_grad(selective_scan_ref, leaves(inputs), cu)
    naive = run_and_grad(naive_scan, leaves(inputs), cu)
    for name in ref:
        assert_close(name, naive[name], ref[name], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("lengths", [[1, 20, 42], [5, 1, 1, 56]], ids=["docs3", "docs4-len1"])
def test_reference_packed_equals_documents_one_by_one(lengths):
    L = sum(lengths)
    cu = random_cu_seqlens(lengths)
    inputs = make_inputs(1, L, 96, 16, 6, 2, n_states=len(lengths))
    y, final = selective_scan_ref(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
        inputs["dt_bias"], True, cu, inputs["initial_state"], True,
    )  # fmt: skip
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = {k: (v[:, s:e] if v.ndim >= 3 and k != "initial_state" and k != "A" else v) for k, v in inputs.items()}
        yi, fi = selective_scan_ref(
            one["x"], one["dt"], one["A"], one["B"], one["C"], one["D"], one["z"], one["dt_bias"], True, None,
            inputs["initial_state"][i : i + 1], True,
        )  # fmt: skip
        assert_close(f"y doc {i}", yi, y[:, s:e], atol=1e-6, rtol=1e-6)
        assert_close(f"final doc {i}", fi, final[i : i + 1], atol=1e-6, rtol=1e-6)


def _import_mamba_selective_scan_ref(monkeypatch):
    """mamba-ssm's torch reference, with empty stand-ins for compiled modules this build lacks."""
    for _ in range(5):
        try:
            return importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_ref
        except ModuleNotFoundError as err:
            if err.name is None or err.name.startswith("mamba_ssm") or err.name in sys.modules:
                pytest.skip(f"mamba_ssm not importable: {err}")
            # e.g. selective_scan_cuda: only used by selective_scan_fn, not by selective_scan_ref.
            monkeypatch.setitem(sys.modules, err.name, types.ModuleType(err.name))
        except ImportError as err:
            pytest.skip(f"mamba_ssm not importable: {err}")
    pytest.skip("mamba_ssm needs too many compiled modules")


@pytest.mark.parametrize("b, L, shape", [(2, 33, ODD), (1, 20, REALISTIC)], ids=["odd", "M1-3B"])
def test_reference_matches_mamba_ssm(monkeypatch, b, L, shape):
    mamba_ref = _import_mamba_selective_scan_ref(monkeypatch)
    d, N, G_C, G_B = shape["d"], shape["N"], shape["G_C"], shape["G_B"]
    inputs = make_inputs(b, L, d, N, G_C, G_B)
    del inputs["initial_state"]  # mamba's reference always starts from zeros
    ours = run_and_grad(selective_scan_ref, leaves(inputs))
    ins = leaves(inputs)
    # mamba-ssm layout: u/delta/z (b, d, L); B/C (b, G, N, L) with channel c in group c // (d / G). M1 feeds B
    # repeated to the G_C groups (the GQA repeat), which is what the M1 layout means.
    B_full = ins["B"].repeat_interleave(G_C // G_B, dim=2).permute(0, 2, 3, 1)
    C_full = ins["C"].permute(0, 2, 3, 1)
    y, last = mamba_ref(
        ins["x"].transpose(1, 2), ins["dt"].transpose(1, 2), ins["A"], B_full, C_full, ins["D"],
        ins["z"].transpose(1, 2), ins["dt_bias"], delta_softplus=True, return_last_state=True,
    )  # fmt: skip
    y = y.transpose(1, 2)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    wf = torch.randn(last.shape, generator=gen, dtype=torch.float64)
    ((y.double() * wy).sum() + (last.double() * wf).sum()).backward()
    theirs = {"y": y, "final": last, **{f"d{k}": v.grad for k, v in ins.items()}}
    for name, want in theirs.items():
        err = rel_err(want, ours[name])
        assert err < 2e-5, f"{name}: rel err {err:.2e} vs mamba_ssm.selective_scan_ref"


# ----------------------------------------------------------------------------------------------------------------
# the Triton kernel


def _triton_devices():
    return [
        pytest.param(
            "cpu",
            marks=pytest.mark.skipif(
                not INTERPRET,
                reason="CPU Triton needs TRITON_INTERPRET=1 before triton is imported: runs in the child process "
                "of test_triton_cpu_under_interpreter",
            ),
        ),
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")]
        ),
    ]


# Relative Frobenius error allowed against the fp32 reference on the same inputs. fp32: accumulation order
# only. bf16: outputs/gradients of x, dt, z are rounded to bf16 (2^-8 relative), B/C grads are fp32 sums.
REL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def triton_scan(monkeypatch, device):
    mod = importlib.import_module("m1_kernels.selective_scan.triton_scan")
    if device == "cpu":
        # Small chunks on CPU so that a 63-token test crosses several checkpoints (and stays fast).
        monkeypatch.setattr(mod, "CHUNK", 16)
    return mod


def _compare(ref, got, dtype):
    errs = {name: rel_err(ref[name], got[name]) for name in ref if ref[name] is not None}
    print({k: f"{v:.1e}" for k, v in errs.items()})
    for name, err in errs.items():
        assert got[name].dtype == ref[name].dtype, f"{name}: dtype {got[name].dtype} != {ref[name].dtype}"
        assert err < REL_TOL[dtype], f"{name}: rel err {err:.2e} > {REL_TOL[dtype]}"


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize(
    "dtype, b, L, d, N, G_C, G_B, lengths",
    [
        pytest.param(torch.float32, 2, 40, 32, 16, 2, 1, None, id="fp32-padded-b2-T40-d32-GC2-GB1"),
        pytest.param(torch.float32, 1, 63, 48, 16, 3, 1, [1, 17, 0, 33, 1, 11], id="fp32-packed-T63-d48-GC3-docs6"),
        pytest.param(torch.bfloat16, 1, 40, 32, 16, 2, 1, [1, 17, 22], id="bf16-packed-T40-d32-docs3"),
        # 8 channels per C group: a program covers two C groups (per-channel B/C gather, in-program group sums).
        pytest.param(torch.float32, 1, 30, 32, 16, 4, 2, [13, 17], id="fp32-packed-T30-d32-GC4-GB2-cpc8"),
        # Documents over many 16-token chunks, one of exactly 4 chunks, next to empty and 1-token ones.
        pytest.param(torch.float32, 1, 200, 32, 16, 2, 1, [1, 70, 0, 64, 1, 64], id="fp32-packed-T200-docs6"),
    ],
)
def test_triton_matches_reference(triton_scan, device, dtype, b, L, d, N, G_C, G_B, lengths):
    cu = random_cu_seqlens(lengths, device) if lengths else None
    inputs = make_inputs(b, L, d, N, G_C, G_B, dtype, device, n_states=len(lengths) if lengths else b)
    ref = run_and_grad(selective_scan_ref, leaves(inputs), cu)
    got = run_and_grad(triton_scan.selective_scan_triton, leaves(inputs), cu)
    _compare(ref, got, dtype)


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("fwd", ["chunked", "sequential", "one-channel-per-thread"])
@pytest.mark.parametrize("N", [16, 12])
def test_triton_forward_paths(triton_scan, monkeypatch, device, fwd, N):
    """Every forward kernel (time-parallel chunks / (channels, states) tile token by token / one channel per thread
    token by token, picked by program count and state size), packed, bf16; N 12 leaves part of the state tile
    masked (and the 48 channels part of a 32-channel block)."""
    monkeypatch.setattr(triton_scan, "SEQUENTIAL_FWD_MIN_PROGRAMS", 1 << 30 if fwd == "chunked" else 0)
    monkeypatch.setattr(triton_scan, "CPT_MAX_STATE", 16 if fwd == "one-channel-per-thread" else 0)
    monkeypatch.setattr(triton_scan, "CPT_MIN_PROGRAMS", 0)
    lengths = [1, 17, 22]
    cu = random_cu_seqlens(lengths, device)
    d = 32 if N == 16 else 48
    inputs = make_inputs(1, 40, d, N, d // 16, 1, torch.bfloat16, device, n_states=len(lengths))
    ref = run_and_grad(selective_scan_ref, leaves(inputs), cu)
    got = run_and_grad(triton_scan.selective_scan_triton, leaves(inputs), cu)
    _compare(ref, got, torch.bfloat16)


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize(
    "b, L, lengths",
    [
        pytest.param(1, 224, [1, 150, 0, 70, 3], id="packed-T224"),
        pytest.param(2, 100, None, id="padded-b2-T100"),
    ],
)
def test_triton_backward_over_real_chunks(triton_scan, monkeypatch, device, b, L, lengths):
    """The backward at the real CHUNK = 64 (checkpoint every 64 tokens), over documents / rows of several chunks; on
    CUDA with its register cap (a cap that spills must not change a result)."""
    monkeypatch.setattr(triton_scan, "CHUNK", 64)
    monkeypatch.setattr(triton_scan, "BWD_CAP_MIN_PROGRAMS", 0)
    cu = random_cu_seqlens(lengths, device) if lengths else None
    inputs = make_inputs(b, L, 32, 16, 2, 1, torch.float32, device, n_states=len(lengths) if lengths else b)
    ref = run_and_grad(selective_scan_ref, leaves(inputs), cu)
    got = run_and_grad(triton_scan.selective_scan_triton, leaves(inputs), cu)
    _compare(ref, got, torch.float32)


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize(
    "dtype, b, L, d, G_C, G_B, lengths, full",
    [
        # Documents cut into 2-4 pieces, the last one short, next to empty and 1-token documents.
        pytest.param(torch.float32, 1, 120, 32, 2, 1, [1, 50, 0, 33, 1, 35], True, id="fp32-packed-T120-docs6"),
        pytest.param(torch.bfloat16, 1, 72, 32, 2, 1, [40, 32], True, id="bf16-packed-T72"),
        # Padded rows run as one packed row; a program spans two C groups (cpc 8).
        pytest.param(torch.float32, 3, 40, 32, 4, 2, None, True, id="fp32-padded-b3-T40-cpc8"),
        # No D / z / dt_bias / initial state.
        pytest.param(torch.float32, 1, 64, 32, 2, 1, [17, 47], False, id="fp32-packed-T64-no-optionals"),
    ],
)
def test_triton_split_documents(triton_scan, monkeypatch, device, dtype, b, L, d, G_C, G_B, lengths, full):
    """Documents cut into pieces run side by side (time_split): states and adjoints carried across the cuts give the
    reference's outputs, final states and every gradient, initial states included."""
    monkeypatch.setattr(triton_scan, "CHUNK", 16)  # pieces of 16 tokens: the checkpoint interval must fit in one
    monkeypatch.setattr(triton_scan, "SPLIT_BELOW_PROGRAMS", 1 << 20)
    monkeypatch.setattr(triton_scan, "SPLIT_TARGET_PROGRAMS", 1 << 20)
    monkeypatch.setattr(triton_scan, "SPLIT_MIN_TOKENS", 16)
    n_docs = len(lengths) if lengths else b
    assert triton_scan.split_length(b * L, n_docs, 2, 16) == 16  # the pieces really are shorter than the documents
    cu = random_cu_seqlens(lengths, device) if lengths else None
    inputs = make_inputs(b, L, d, 16, G_C, G_B, dtype, device, n_states=n_docs, full=full)
    ref = run_and_grad(selective_scan_ref, leaves(inputs), cu)
    got = run_and_grad(triton_scan.selective_scan_triton, leaves(inputs), cu)
    _compare(ref, got, dtype)


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize(
    "b, lengths", [pytest.param(1, [0, 0], id="packed-2-empty-docs"), pytest.param(2, None, id="padded-b2")]
)
def test_triton_no_tokens(triton_scan, device, b, lengths):
    """An input with no tokens launches no forward kernel: final states are the initial ones, and the gradient of
    the initial states is that of the final ones."""
    cu = random_cu_seqlens(lengths, device) if lengths else None
    inputs = make_inputs(b, 0, 32, 16, 2, 1, device=device, n_states=len(lengths) if lengths else b)
    ref = run_and_grad(selective_scan_ref, leaves(inputs), cu)
    got = run_and_grad(triton_scan.selective_scan_triton, leaves(inputs), cu)
    assert_close("final", inputs["initial_state"], got["final"], atol=0, rtol=0)
    assert_close("dinitial_state", ref["dinitial_state"], got["dinitial_state"], atol=1e-6, rtol=1e-6)
    assert got["y"].shape == (b, 0, 32) and not got["dA"].abs().any()


def test_piece_offsets_cover_documents_in_order():
    """Piece k of document i sits at index cu[i] // split + i + k; other indices are empty pieces."""
    from m1_kernels.selective_scan.time_split import piece_offsets

    cu = torch.tensor([0, 1, 17, 17, 50, 51, 63])
    offs = piece_offsets(cu, 63, 16).tolist()
    assert offs == [0, 1, 17, 17, 17, 33, 49, 50, 51, 63]
    pieces = [(a, b) for a, b in zip(offs[:-1], offs[1:]) if b > a]
    docs = [(a, b) for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]) if b > a]
    # Real pieces tile each document, none longer than the split, none crossing a document boundary.
    assert [p for p in pieces if p[1] - p[0] > 16] == []
    assert sorted({a for a, _ in pieces} | {b for _, b in pieces}) == sorted(
        {t for a, b in docs for t in range(a, b + 1, 16)} | {b for _, b in docs}
    )


def test_documents_are_handed_out_longest_first(monkeypatch):
    """The programs' document order: by decreasing length, ties in batch order; batch order when turned off."""
    scan = importlib.import_module("m1_kernels.selective_scan.triton_scan")
    cu = torch.tensor([0, 3, 4, 9, 9, 12], dtype=torch.int32)  # lengths 3, 1, 5, 0, 3
    assert scan._longest_first(cu).tolist() == [2, 0, 4, 1, 3]
    assert scan._longest_first(cu).dtype == torch.int32 and scan._longest_first(None) is None
    monkeypatch.setattr(scan, "LONGEST_FIRST", 0)
    assert scan._longest_first(cu).tolist() == [0, 1, 2, 3, 4]


def _strided_views_case(scan, device, N=12, L=40):
    """Token-major slices of one fused projection output (as in the model), no D/z/bias and no softplus (dt used
    as is), no initial state, padded; N=12 leaves part of the Triton state tile masked."""
    b, d, G_C, G_B = 2, 32, 2, 1
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(b, L, 2 * d + (G_B + G_C) * N, generator=gen).to(device)
    fused[..., d : 2 * d] = fused[..., d : 2 * d].abs() * 0.2  # dt > 0 without softplus
    parts = dict(
        x=fused[..., :d],
        dt=fused[..., d : 2 * d],
        B=fused[..., 2 * d : 2 * d + G_B * N].unflatten(-1, (G_B, N)),
        C=fused[..., 2 * d + G_B * N :].unflatten(-1, (G_C, N)),
        A=-torch.rand(d, N, generator=gen).add(0.1).to(device),
    )
    assert not parts["x"].is_contiguous()
    fused_leaf = fused.clone().requires_grad_()

    def grads(fn):
        ins = {k: v.detach().clone().requires_grad_() for k, v in parts.items()}
        if fn is not selective_scan_ref:  # the kernel gets the strided views themselves
            f = fused_leaf
            f.grad = None
            ins.update(
                x=f[..., :d],
                dt=f[..., d : 2 * d],
                B=f[..., 2 * d : 2 * d + G_B * N].unflatten(-1, (G_B, N)),
                C=f[..., 2 * d + G_B * N :].unflatten(-1, (G_C, N)),
            )
        y, final = fn(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], None, None, None, False, None, None, True)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(device)
        ((y * w).sum() + final.sum()).backward()
        if fn is selective_scan_ref:
            g = torch.cat([ins["x"].grad, ins["dt"].grad, ins["B"].grad.flatten(-2), ins["C"].grad.flatten(-2)], -1)
        else:
            g = fused_leaf.grad
        return {"y": y, "final": final, "dfused": g, "dA": ins["A"].grad}

    _compare(grads(selective_scan_ref), grads(scan), torch.float32)


@pytest.mark.parametrize("device", _triton_devices())
def test_triton_strided_views_without_optionals(triton_scan, device):
    _strided_views_case(triton_scan.selective_scan_triton, device)


def _packed_equals_padded_case(f, device, L):
    """Two equal-length documents packed in one row == the same two as padded rows (with initial states)."""
    inputs = make_inputs(2, L, 32, 16, 2, 1, device=device)
    packed = {
        k: (v.reshape(1, 2 * L, *v.shape[2:]) if v.ndim >= 3 and k not in ("initial_state",) else v)
        for k, v in inputs.items()
    }
    cu = random_cu_seqlens([L, L], device)
    out_pad = run_and_grad(f, leaves(inputs))
    out_pack = run_and_grad(f, leaves(packed), cu)
    assert_close("y", out_pad["y"].reshape(1, 2 * L, -1), out_pack["y"], atol=1e-6, rtol=1e-5)
    assert_close("final", out_pad["final"], out_pack["final"], atol=1e-6, rtol=1e-5)
    assert_close("dA", out_pad["dA"], out_pack["dA"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", _triton_devices())
def test_triton_packed_equals_padded(triton_scan, device):
    _packed_equals_padded_case(triton_scan.selective_scan_triton, device, 20)


@pytest.mark.skipif(INTERPRET, reason="already inside the TRITON_INTERPRET=1 child")
@pytest.mark.skipif(
    HAS_CUDA,
    reason="a CUDA machine runs the Triton kernels natively (the -cuda cases); the interpreter run stands in for them "
    "on CPU CI (on the GPU image, triton 3.6's interpreter stops these kernels with a TypeError of its own)",
)
def test_triton_cpu_under_interpreter():
    """Run this file's CPU Triton cases in a child pytest with TRITON_INTERPRET=1 (see module docstring)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "triton and cpu and not under_interpreter",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, f"interpreted Triton tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# the CUDA kernels (csrc/selective_scan.cu): 256-token chunks, one warp per channel, 16 channels per block; the
# forward also in its one-thread-per-channel form ("serial"), which every CUDA test runs as well


@pytest.fixture(
    params=[
        "serial-fwd,lane-serial-bwd",
        "lane-serial-fwd,lane-serial-bwd",
        "chunked-fwd,lane-serial-bwd",
        "chunked-fwd,chunked-bwd",
    ]
)
def cuda_scan(request, monkeypatch):
    if not HAS_CUDA:
        pytest.skip("no CUDA GPU on this machine (the CUDA scan's source is compiled and checked on CPU below)")
    mod = importlib.import_module("m1_kernels.selective_scan.cuda_scan")
    if mod.find_nvcc() is None:
        pytest.skip("no nvcc: the CUDA scan is built on first use")
    fwd, bwd = request.param.split(",")
    monkeypatch.setattr(mod, "SERIAL_MIN_THREADS_PER_SM", 0 if fwd == "serial-fwd" else 10**9)
    monkeypatch.setattr(mod, "LANE_SERIAL_FWD", int(fwd == "lane-serial-fwd"))
    monkeypatch.setattr(mod, "LANE_SERIAL_BWD", int(bwd == "lane-serial-bwd"))
    monkeypatch.setattr(mod, "LS_MIN_BLOCKS_PER_SM", 0)  # the tests' small batches take the lane-serial kernels too
    launched, real = [], mod.ScanLibrary.launch
    monkeypatch.setattr(mod.ScanLibrary, "launch", lambda lib, k, *a: launched.append(k) or real(lib, k, *a))
    yield mod
    # the asked-for kernels ran (the lane-serial ones cover 16 states; at 32 the chunked ones run)
    want_fwd = {"serial-fwd": {"fwd_serial"}, "lane-serial-fwd": {"fwd_ls", "fwd"}, "chunked-fwd": {"fwd"}}[fwd]
    assert {k for k in launched if k.startswith("fwd")} <= want_fwd, launched
    assert bwd == "lane-serial-bwd" or "bwd_ls" not in launched, launched


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, b, L, d, N, G_C, G_B, lengths",
    [
        # 16 channels per C group: 16-warp blocks, dC written directly; two chunks per row.
        pytest.param(torch.float32, 2, 300, 32, 16, 2, 1, None, id="fp32-padded-b2-T300-cpc16"),
        # Documents of 0, 1, 256 + 1 tokens and several chunks, 3 C groups over 1 B group.
        pytest.param(torch.float32, 1, 700, 48, 16, 3, 1, [1, 300, 0, 257, 1, 141], id="fp32-packed-T700-docs6"),
        # 2 B groups; a document of exactly one chunk.
        pytest.param(torch.bfloat16, 1, 600, 64, 16, 4, 2, [256, 1, 343], id="bf16-packed-T600-GB2"),
        # 32 channels per C group: two blocks per group, dC through fp32 atomics; 32 states.
        pytest.param(torch.bfloat16, 1, 513, 64, 32, 2, 1, None, id="bf16-padded-T513-cpc32-N32"),
        pytest.param(torch.float16, 1, 400, 32, 16, 2, 1, [399, 1], id="fp16-packed-T400"),
        # M1-3B layout: 192 C groups, 64 B groups.
        pytest.param(torch.bfloat16, 1, 1100, 3072, 16, 192, 64, [513, 70, 517], id="bf16-M1-3B-T1100"),
    ],
)
def test_cuda_matches_reference(cuda_scan, dtype, b, L, d, N, G_C, G_B, lengths):
    cu = random_cu_seqlens(lengths, "cuda") if lengths else None
    inputs = make_inputs(b, L, d, N, G_C, G_B, dtype, "cuda", n_states=len(lengths) if lengths else b)
    ref = run_and_grad(selective_scan_ref, leaves(inputs), cu)
    got = run_and_grad(cuda_scan.selective_scan_cuda, leaves(inputs), cu)
    _compare(ref, got, dtype)


@pytest.mark.gpu
def test_cuda_strided_views_without_optionals(cuda_scan):
    _strided_views_case(cuda_scan.selective_scan_cuda, "cuda", N=16, L=300)


@pytest.mark.gpu
def test_cuda_packed_equals_padded(cuda_scan):
    _packed_equals_padded_case(cuda_scan.selective_scan_cuda, "cuda", 300)


@pytest.mark.gpu
def test_cuda_is_the_default_scan_on_gpu(cuda_scan, monkeypatch):
    """m1_kernels.selective_scan takes the CUDA kernels when they build; M1_KERNELS_SCAN=triton keeps Triton."""
    import m1_kernels

    inputs = leaves(make_inputs(1, 40, 32, 16, 2, 1, torch.float32, "cuda"))
    calls = []
    real = cuda_scan.CudaScanFunction.apply
    monkeypatch.setattr(cuda_scan.CudaScanFunction, "apply", lambda *a: calls.append(1) or real(*a))
    m1_kernels.selective_scan(**{k: inputs[k] for k in ("x", "dt", "A", "B", "C")})
    assert calls == [1]
    monkeypatch.setenv("M1_KERNELS_SCAN", "triton")
    m1_kernels.selective_scan(**{k: inputs[k] for k in ("x", "dt", "A", "B", "C")})
    assert calls == [1]


@pytest.mark.gpu
def test_cuda_two_builds_in_one_process(cuda_scan, monkeypatch):
    """Benchmarks and tests load several builds of the source (other compile-time knobs) into one process: each must
    set up and launch its own kernels (a launch-time cache once lived in a symbol the loader shares between them)."""
    inputs = make_inputs(1, 300, 32, 16, 2, 1, torch.bfloat16, "cuda", n_states=2)
    cu = random_cu_seqlens([100, 200], "cuda")
    ref = run_and_grad(selective_scan_ref, leaves(inputs), cu)
    for unroll in (cuda_scan.FWD_UNROLL, 2):
        monkeypatch.setattr(cuda_scan, "FWD_UNROLL", unroll)
        _compare(ref, run_and_grad(cuda_scan.selective_scan_cuda, leaves(inputs), cu), torch.bfloat16)
    assert cuda_scan._library.cache_info().currsize >= 2


def test_cuda_unsupported_layouts_say_why(monkeypatch):
    """Inputs the CUDA kernels do not take are named with the reason (the dispatcher then runs Triton)."""
    scan = importlib.import_module("m1_kernels.selective_scan.cuda_scan")
    x = torch.zeros(1, 4, 32)
    assert "CUDA" in scan.unsupported_reason(x, x, torch.zeros(32, 16), x, torch.zeros(1, 4, 2, 16), None)
    if HAS_CUDA:
        xc = x.cuda()
        reason = scan.unsupported_reason(xc, xc.half(), torch.zeros(32, 16), xc, xc, None)
        assert "share one of" in reason
        reason = scan.unsupported_reason(xc, xc, torch.zeros(32, 12), xc, xc, None)
        assert "d_state 12" in reason
        if scan.find_nvcc() is not None:
            reason = scan.unsupported_reason(xc, xc, torch.zeros(32, 16), xc, torch.zeros(1, 4, 4, 16).cuda(), None)
            assert "multiple of 16" in reason  # 8 channels per C group
    monkeypatch.setenv("M1_KERNELS_SCAN", "fast")
    with pytest.raises(ValueError, match="M1_KERNELS_SCAN must be"):
        importlib.import_module("m1_kernels.dispatch").use_cuda_scan(x, x, None, None, None, None)


@pytest.mark.gpu
def test_cuda_scan_under_torch_compile(cuda_scan):
    """The model runs under torch.compile (distillation's --compile): the CUDA scan, called through ctypes, must give
    the eager results there too (dynamo runs it as an opaque call). Not bit for bit: dB and the parameter gradients
    are summed over blocks with float atomics, whose order varies from run to run (as in mamba-ssm)."""
    import m1_kernels

    inputs = make_inputs(1, 300, 32, 16, 2, 1, torch.bfloat16, "cuda", n_states=2)
    cu = random_cu_seqlens([100, 200], "cuda")

    def scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, cu_seqlens, initial_state, return_final_state):
        y, h = m1_kernels.selective_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, cu_seqlens, initial_state, True)
        return y * 2, h

    eager = run_and_grad(scan, leaves(inputs), cu)
    compiled = run_and_grad(torch.compile(scan), leaves(inputs), cu)
    for name, want in eager.items():
        err = rel_err(want, compiled[name])
        assert err < 1e-3, f"{name}: rel err {err:.1e} between eager and compiled"


def test_cuda_source_builds_and_matches_the_parameter_block(monkeypatch, tmp_path):
    """No GPU needed: nvcc (scripts/setup_env.sh installs it from PyPI) compiles csrc/selective_scan.cu for sm_90,
    and the library's parameter block has the size of cuda_scan.ScanParams (else the loader refuses it); a second
    build is the cached file; a failing compiler is reported with its output."""
    scan = importlib.import_module("m1_kernels.selective_scan.cuda_scan")
    if scan.find_nvcc() is None:
        pytest.skip("no nvcc on this machine: scripts/setup_env.sh installs nvidia-cuda-nvcc from PyPI")
    monkeypatch.setenv("M1_KERNELS_CACHE", str(tmp_path))
    path = scan.build_library("90")
    lib = scan.ScanLibrary(path)
    assert (lib.tokens_per_chunk, lib.channels_per_block) == (32 * scan.ITEMS, 16)
    h100_smem = 232448
    assert lib.smem_bytes(torch.bfloat16, 16, backward=True) <= h100_smem  # M1-3B's dtype and state size fit
    assert lib.smem_bytes(torch.float32, 32, backward=True) > h100_smem  # (this one falls back to Triton)
    assert scan.build_library("90") == path and len(list(tmp_path.iterdir())) == 1
    assert scan.build_library("80").exists()  # A100: the oldest target; sm_90-only instructions stay behind a guard
    with pytest.raises(RuntimeError, match="nvcc failed"):
        scan.build_library("90", {"M1_SCAN_ITEMS": 3})  # items must fill 16-byte vectors: a static_assert


@pytest.mark.parametrize("knob", ["LS_Y_TOKENS", "LS_S_TOKENS"])
def test_lane_serial_group_sizes_reach_the_compiler(monkeypatch, tmp_path, knob):
    """The token-group sizes of the lane-serial reduce-scatters are module knobs passed to nvcc: a size that is not
    a whole number of halving steps is refused by the source's static_assert (no GPU needed)."""
    scan = importlib.import_module("m1_kernels.selective_scan.cuda_scan")
    if scan.find_nvcc() is None:
        pytest.skip("no nvcc on this machine: scripts/setup_env.sh installs nvidia-cuda-nvcc from PyPI")
    monkeypatch.setenv("M1_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(scan, knob, 3)
    with pytest.raises(RuntimeError, match="whole halving steps"):
        scan.build_library("90")


def test_cu_seqlens_is_read_once_per_tensor(monkeypatch):
    """Reading cu_seqlens' ends is a host sync on a GPU: a tensor already checked (same object, data and version)
    is not read again, but another packed length, or an in-place change, is checked again. Inference-mode tensors
    (no version counter) are read once while they live."""
    reads, real = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real(t))
    cu = torch.tensor([0, 3, 5])
    check_cu_seqlens(cu, 1, 5)
    check_cu_seqlens(cu, 1, 5)
    assert len(reads) == 1
    with pytest.raises(ValueError, match="end at the packed length 6"):
        check_cu_seqlens(cu, 1, 6)
    cu[-1] = 4
    with pytest.raises(ValueError, match=r"got \[0, 3, 4\]"):
        check_cu_seqlens(cu, 1, 5)
    before = len(reads)
    with torch.inference_mode():  # vLLM's tensors: no version counter, so read once while they live
        inference_cu = torch.tensor([0, 3, 5])
        check_cu_seqlens(inference_cu, 1, 5)
        check_cu_seqlens(inference_cu, 1, 5)
    assert len(reads) == before + 1


def test_memo_remembers_nothing_during_cuda_graph_capture(monkeypatch):
    """Kernels recorded into a CUDA graph run only at replay: a fact derived during capture is not kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    memo, derived, t = TensorMemo(), [], torch.tensor([0, 3, 5])
    assert memo.get(t, "last", lambda v: derived.append(1) or int(v[-1])) == 5
    assert memo.get(t, "last", lambda v: derived.append(1) or int(v[-1])) == 5
    assert len(derived) == 2 and not memo._entries


def test_cu_seqlens_int32_converts_once_per_tensor():
    """The kernels take int32 offsets: an int64 cu_seqlens is converted once (so the order derived from the copy is
    sorted once too), and converted again after an in-place change."""
    cu = torch.tensor([0, 2, 5])
    once = cu_seqlens_int32(cu, torch.device("cpu"))
    assert once.dtype == torch.int32 and once.tolist() == [0, 2, 5]
    assert cu_seqlens_int32(cu, torch.device("cpu")) is once
    cu[1] = 3
    assert cu_seqlens_int32(cu, torch.device("cpu")).tolist() == [0, 3, 5]


def test_documents_longest_first_sorts_once_per_tensor(monkeypatch):
    """The order of packed documents by length is a sort on the device: derived once per cu_seqlens tensor, and
    again after an in-place change or for another tensor; a dead tensor's entry leaves the memo."""
    sorts, real = [], torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: sorts.append(1) or real(*a, **k))
    cu = torch.tensor([0, 1, 5, 7], dtype=torch.int32)
    assert documents_longest_first(cu).tolist() == [1, 2, 0]
    assert documents_longest_first(cu).tolist() == [1, 2, 0] and len(sorts) == 1
    cu[1] = 4
    assert documents_longest_first(cu).tolist() == [0, 2, 1] and len(sorts) == 2
    assert documents_longest_first(cu.clone()).tolist() == [0, 2, 1] and len(sorts) == 3
    entries = len(cu_seqlens_memo._entries)
    del cu
    assert len(cu_seqlens_memo._entries) == entries - 1


def test_cuda_forward_kernel_is_serial_for_many_documents(monkeypatch):
    """The one-thread-per-channel forward needs SERIAL_MIN_THREADS_PER_SM (sequence, channel) pairs per SM; fewer
    take the lane-serial forward (at 16 states) or the chunked one (no GPU needed: the SM count is the H100's)."""
    scan = importlib.import_module("m1_kernels.selective_scan.cuda_scan")
    monkeypatch.setattr(scan, "_sm_count", lambda index: 132)
    need = scan.SERIAL_MIN_THREADS_PER_SM * 132
    docs = -(-need // 3072)  # M1-3B's d_inner: the fewest documents that take the serial forward
    assert scan.forward_kernel(docs, 3072, "cuda:0", 16) == "fwd_serial"
    assert scan.forward_kernel(docs - 1, 3072, "cuda:0", 16) == "fwd_ls"
    assert scan.forward_kernel(4, 3072, "cuda:0", 16) == "fwd_ls"  # 8k tokens in 2048-token documents
    assert scan.forward_kernel(4, 3072, "cuda:0", 32) == "fwd"  # the lane-serial kernels take 16 states
    assert scan.forward_kernel(8, 576, "cuda:0", 16) == "fwd"  # SmolLM2 hybrid, 16k tokens: too few lane-serial blocks
    assert scan.forward_kernel(1, need, "cuda", 16) == "fwd_serial"
    monkeypatch.setattr(scan, "LANE_SERIAL_FWD", 0)
    assert scan.forward_kernel(4, 3072, "cuda:0", 16) == "fwd"


def test_cuda_backward_kernel_is_lane_serial_with_enough_blocks(monkeypatch):
    """The lane-serial backward runs at 16 states from LS_MIN_BLOCKS_PER_SM of its (sequence, 16 channels) blocks
    per SM; fewer, 32 states, or LANE_SERIAL_BWD = 0 take the chunked backward (the SM count is the H100's)."""
    scan = importlib.import_module("m1_kernels.selective_scan.cuda_scan")
    monkeypatch.setattr(scan, "_sm_count", lambda index: 132)
    blocks = scan.LS_MIN_BLOCKS_PER_SM * 132
    assert scan.backward_kernel(blocks, 16, "cuda:0", 16) == "bwd_ls"
    assert scan.backward_kernel(blocks - 1, 16, "cuda:0", 16) == "bwd"
    assert scan.backward_kernel(4, 3072, "cuda:0", 16) == "bwd_ls"  # M1-3B, 8k tokens in 2048-token documents
    assert scan.backward_kernel(8, 576, "cuda:0", 16) == "bwd"  # SmolLM2 hybrid, 16k tokens
    assert scan.backward_kernel(4, 3072, "cuda:0", 32) == "bwd"
    monkeypatch.setattr(scan, "LANE_SERIAL_BWD", 0)
    assert scan.backward_kernel(4, 3072, "cuda:0", 16) == "bwd"


def test_cuda_layout_reason_is_asked_once_and_a_failed_build_is_a_reason(monkeypatch):
    """Every scan call asks whether the CUDA kernels take its layout (the dispatcher, then the op): the answer is
    computed once per layout, and a failed build becomes the fallback's reason instead of running nvcc again."""
    scan = importlib.import_module("m1_kernels.selective_scan.cuda_scan")
    builds = []

    def failing_build(arch, defines):
        builds.append(arch)
        raise RuntimeError("nvcc failed to build selective_scan.cu: (test)")

    monkeypatch.setattr(scan, "_library", failing_build)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    scan._layout_reason.cache_clear()
    try:
        key = (0, torch.bfloat16, 16, 16, tuple(scan._defines().items()))
        first, second = scan._layout_reason(*key), scan._layout_reason(*key)
        assert first == second == "nvcc failed to build selective_scan.cu: (test)"
        assert builds == ["90"]
    finally:
        scan._layout_reason.cache_clear()
