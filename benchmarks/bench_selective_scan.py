"""Benchmark the M1 selective scan: our Triton op vs the PyTorch reference vs mamba-ssm's CUDA kernel vs HBM floor.

M1-3B shapes (d_inner 3072, d_state 16, G_C 192, G_B 64), packed documents of ``--doc-len`` tokens,
bf16 inputs (``--inputs``: separate tensors, or strided views of one fused projection output). For each provider:
forward and forward+backward median time (``triton.testing.do_bench``, quantiles 0.5/0.2/0.8) and
peak extra memory. mamba-ssm's ``selective_scan_fn`` has no varlen: it runs the padded equivalent
(rows of ``--doc-len``) with B and C repeated to G_C groups in its ``(b, G, N, L)`` layout.

Our op is timed in one or more variants (``--variants``): a label, optionally with settings of the kernel module's
constants, ``LABEL[:NAME=INT[,NAME=INT...]]``. The label is the row's ``provider``; labels starting with ``cuda`` run
the CUDA kernels (``cuda_scan``, e.g. ``cuda_i16:ITEMS=16``), the others the Triton ones (``triton_scan``, e.g.
``seq_fwd:SEQUENTIAL_FWD_MIN_PROGRAMS=0`` forces the sequential forward kernel). By default: ``triton`` and ``cuda``.

Before timing, each variant is checked against the reference on the GPU and the result printed.
Rows are appended to ``<out>/selective_scan.csv`` and a PNG plot is written next to it.

Usage::

    python benchmarks/bench_selective_scan.py                 # 8192 and 32768 tokens
    python benchmarks/bench_selective_scan.py --smoke         # tiny shapes, a few seconds
    python benchmarks/bench_selective_scan.py --variants triton seq_fwd:SEQUENTIAL_FWD_MIN_PROGRAMS=0 \\
        tile32:FWD_TILE_T=32                                                 # a sweep
"""

import argparse
import contextlib
import csv
import datetime
import os
import statistics
import sys
import time

import torch
from results_io import append_csv
from results_io import pyplot

D_INNER, D_STATE, G_C, G_B = 3072, 16, 192, 64
HBM_BYTES_PER_S = 3.0e12  # H100 SXM HBM3, achievable order of magnitude
DEFAULT_VARIANTS = ["triton", "cuda"]


def parse_args(argv=None):
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="packed tokens per run")
    p.add_argument("--doc-len", type=int, default=2048, help="document length (rows of the padded equivalent)")
    p.add_argument(
        "--mixed-docs",
        action="store_true",
        help="cut every --doc-len row into ~6 documents of random length, as packed training batches are (no "
        "mamba-ssm rows: its padded equivalent needs equal lengths)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--ref-max-tokens", type=int, default=8192, help="largest size for the PyTorch reference")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (d_inner 96), quick")
    p.add_argument(
        "--shape",
        metavar="D,N,G_C,G_B",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=(D_INNER, D_STATE, G_C, G_B),
        help="d_inner, d_state, C groups, B groups (default: M1-3B, %(default)s); "
        "e.g. 576,16,36,12 or 576,64,9,3 for the SmolLM2-135M hybrid",
    )
    p.add_argument(
        "--inputs",
        choices=["leaves", "views"],
        default="leaves",
        help="leaves: separate contiguous x, dt, z, B, C (what mamba-ssm's baseline gets, and in the model x and dt\n"
        "are separate tensors); views: slices of one fused tensor, whose backward also pays autograd's\n"
        "accumulation of five slice gradients into it (~1.3 ms at 8k tokens on the H100)",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--plot-doc-order",
        metavar="CSV",
        help="only draw <out>/selective_scan_mixed_docs.png from this CSV's --mixed-docs rows (see plot_doc_order)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help="variants: LABEL[:NAME=INT,...] setting constants of cuda_scan (labels cuda*) or triton_scan\n"
        "(default: %(default)s)",
    )
    args = p.parse_args(argv)
    try:
        args.variants = [parse_variant(v) for v in args.variants]
    except ValueError as err:
        p.error(str(err))
    return args


def parse_variant(spec):
    """``LABEL[:NAME=INT[,NAME=INT...]]`` -> ``(label, {NAME: int})``."""
    label, _, settings = spec.partition(":")
    values = {}
    for item in filter(None, settings.split(",")):
        name, _, value = item.partition("=")
        values[name] = int(value)  # ValueError on a malformed setting
    if not label:
        raise ValueError(f"variant {spec!r} has no label")
    return label, values


def variant_module(label):
    """The kernel module a variant runs: ``cuda_scan`` for labels starting with ``cuda``, else ``triton_scan``."""
    import importlib

    name = "cuda_scan" if label.startswith("cuda") else "triton_scan"
    return importlib.import_module(f"m1_kernels.selective_scan.{name}")


def variant_fn(label):
    """The scan function a variant times."""
    module = variant_module(label)
    return module.selective_scan_cuda if label.startswith("cuda") else module.selective_scan_triton


@contextlib.contextmanager
def variant_settings(label, values):
    """Set the variant's module constants for the duration of the block (the op reads them at each call)."""
    scan = variant_module(label)
    unknown = [name for name in values if not name.isupper() or not hasattr(scan, name)]
    if unknown:
        raise SystemExit(f"--variants: {unknown} are not module constants of {scan.__name__}")
    saved = {name: getattr(scan, name) for name in values}
    for name, value in values.items():
        setattr(scan, name, type(saved[name])(value))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(scan, name, value)


def split_fused(fused, d, N, gc, gb):
    """x, dt, B, C, z as token-major views of one fused projection output (columns z, x, B, C, dt)."""
    return dict(
        x=fused[..., d : 2 * d],
        dt=fused[..., 2 * d + (gb + gc) * N :],
        B=fused[..., 2 * d : 2 * d + gb * N].unflatten(-1, (gb, N)),
        C=fused[..., 2 * d + gb * N : 2 * d + (gb + gc) * N].unflatten(-1, (gc, N)),
        z=fused[..., :d],
    )


def scan_operands(fused, ins, shape, inputs):
    """``(operands, grads)``: a callable giving the x, dt, B, C, z of one call, and the tensors whose gradients
    the benchmark resets. ``inputs="leaves"``: separate contiguous tensors; ``"views"``: fresh slices of ``fused``
    per call (autograd then adds each slice's gradient into the fused gradient)."""
    if inputs == "leaves":
        leaves = {k: ins[k].detach().contiguous().requires_grad_() for k in ("x", "dt", "B", "C", "z")}
        return (lambda: leaves), list(leaves.values())
    return (lambda: split_fused(fused, *shape)), [fused]


def make_inputs(T, doc_len, d, N, gc, gb, dtype, device, mixed=False):
    """Packed inputs as token-major slices of one fused projection (z, x, B, C, dt); ``mixed``: documents of
    random lengths (:func:`doc_lengths`)."""
    width = 2 * d + gb * N + gc * N + d
    fused = torch.randn(1, T, width, device=device, dtype=dtype)
    views = split_fused(fused, d, N, gc, gb)
    x, dt, B, C, z = (views[k] for k in ("x", "dt", "B", "C", "z"))
    with torch.no_grad():
        dt.mul_(0.5).sub_(1.0)
    A = -torch.exp(0.5 * torch.randn(d, N, device=device))
    D = torch.randn(d, device=device)
    dt_bias = 0.3 * torch.randn(d, device=device)
    lengths = doc_lengths(T, doc_len, mixed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return fused, dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias), cu.to(device)


def doc_lengths(T, doc_len, mixed=False, seed=0):
    """Rows of ``doc_len`` tokens (and a shorter last one); ``mixed``: each row cut at 5 random points."""
    rows = [doc_len] * (T // doc_len) + ([T % doc_len] if T % doc_len else [])
    if not mixed:
        return rows
    gen, lengths = torch.Generator().manual_seed(seed), []
    for n in rows:
        cuts = sorted(set(torch.randint(1, n, (5,), generator=gen).tolist())) if n > 1 else []
        lengths += [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    return lengths


def hbm_bytes(T, d, N, gc, gb, elt):
    """Bytes that must cross HBM: fwd reads x, dt, z, B, C, writes y; bwd reads those + dy, writes 5 grads."""
    act = T * d * elt
    bc = T * (gb + gc) * N * elt
    fwd = 4 * act + bc
    bwd = 4 * act + bc + 3 * act + bc
    return fwd, fwd + bwd


def correctness_check(device, dtype, d=D_INNER, N=D_STATE, gc=G_C, gb=G_B, label="triton"):
    """A variant vs the reference on the GPU (packed, initial states, all gradients); prints relative errors."""
    from m1_kernels.selective_scan.naive import selective_scan_ref

    torch.manual_seed(0)
    lengths = [1, 200, 0, 311, 700]
    T = sum(lengths)
    _, ins, _ = make_inputs(T, T, d, N, gc, gb, dtype, device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    h0 = torch.randn(len(lengths), d, N, device=device)
    results = []
    for fn in (selective_scan_ref, variant_fn(label)):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in {**ins, "initial_state": h0}.items()}
        y, hf = fn(**{k: leaves[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")},
                   dt_softplus=True, cu_seqlens=cu, initial_state=leaves["initial_state"],
                   return_final_state=True)  # fmt: skip
        g = torch.Generator(device=device).manual_seed(1)
        wy = torch.randn(y.shape, device=device, generator=g)
        ((y.float() * wy).sum() + hf.sum()).backward()
        results.append({"y": y, "final": hf, **{f"d{k}": v.grad for k, v in leaves.items()}})
    worst = 0.0
    msg = []
    for name in results[0]:
        r, t = results[0][name].double(), results[1][name].double()
        err = ((r - t).norm() / r.norm().clamp_min(1e-30)).item()
        worst = max(worst, err if torch.isfinite(t).all() else float("inf"))
        msg.append(f"{name} {err:.1e}")
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    status = "OK" if worst < tol else "FAILED"
    print(f"correctness ({label} vs reference, {dtype}, packed {lengths}): {status}; rel err " + ", ".join(msg))
    return status == "OK"


def bench(fn, grad_to_none=None, reps=None):
    """(p50, p20, p80) ms and peak extra MB of ``fn``."""
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    if reps is not None:  # slow providers: a few timed calls instead of do_bench's calibration
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        q = sorted(times)
        return (statistics.median(q), q[0], q[-1]), peak
    ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return tuple(ms), peak


def warm_up_gpu(seconds=2.0):
    """Keep the GPU busy for a moment before timing: the first provider timed after an idle spell otherwise pays the
    clock ramp (stop 20: the first of two identical runs measured 2.54 vs 2.37 ms)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def import_mamba_selective_scan_fn():
    """mamba-ssm's CUDA ``selective_scan_fn`` or None (with the reason printed)."""
    try:
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or a broken build
        print(f"mamba-ssm CUDA selective_scan_fn not available ({type(err).__name__}: {err}); skipped")
        return None
    return selective_scan_fn


def bench_size(T, args, shape, dtype, device, doc_len, mamba_fn, record):
    """All providers at one packed size."""
    from m1_kernels.selective_scan.naive import selective_scan_ref

    d, N, gc, gb = shape
    fused, ins, cu = make_inputs(T, doc_len, d, N, gc, gb, dtype, device, args.mixed_docs)
    params = [ins[k] for k in ("A", "D", "dt_bias")]
    fused.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)

    operands, grads = scan_operands(fused, ins, shape, args.inputs)
    grads += params

    def call(fn, cu=cu):
        t = operands()
        return fn(t["x"], t["dt"], ins["A"], t["B"], t["C"], ins["D"], t["z"], ins["dt_bias"], True, cu)

    dy = torch.randn(1, T, d, device=device, dtype=dtype)
    fwd_floor, full_floor = hbm_bytes(T, d, N, gc, gb, dtype.itemsize)
    record("hbm_floor", "fwd", T, (fwd_floor / HBM_BYTES_PER_S * 1e3,) * 3, None, f"{fwd_floor / 1e9:.2f} GB")
    record("hbm_floor", "fwd+bwd", T, (full_floor / HBM_BYTES_PER_S * 1e3,) * 3, None, f"{full_floor / 1e9:.2f} GB")

    for label, values in args.variants:
        scan = variant_fn(label)
        with variant_settings(label, values):
            with torch.no_grad():
                ms, peak = bench(lambda scan=scan: call(scan))
            docs = [f"docs=mixed {cu.numel() - 1}"] if args.mixed_docs else []
            note = ",".join([f"{k}={v}" for k, v in values.items()] + [f"inputs={args.inputs}"] + docs)
            record(label, "fwd", T, ms, peak, note)
            ms, peak = bench(lambda scan=scan: call(scan).backward(dy), grad_to_none=grads)
            record(label, "fwd+bwd", T, ms, peak, note)

    if T <= args.ref_max_tokens:
        try:
            with torch.no_grad():
                ms, peak = bench(lambda: call(selective_scan_ref), reps=3)
            record("torch_ref", "fwd", T, ms, peak, "python token loop")
        except torch.cuda.OutOfMemoryError:
            print(f"torch_ref fwd T={T}: out of memory, skipped")
        torch.cuda.empty_cache()
    else:
        print(f"torch_ref T={T}: skipped (> --ref-max-tokens {args.ref_max_tokens}; a python loop per token)")

    if mamba_fn is not None and T % doc_len == 0 and not args.mixed_docs:
        # Padded equivalent: rows of doc_len, mamba layout (b, d, L) and (b, G_C, N, L), B repeated to G_C.
        rows_ = T // doc_len
        u = ins["x"].detach().reshape(rows_, doc_len, d).transpose(1, 2).contiguous().requires_grad_()
        delta = ins["dt"].detach().reshape(rows_, doc_len, d).transpose(1, 2).contiguous().requires_grad_()
        zz = ins["z"].detach().reshape(rows_, doc_len, d).transpose(1, 2).contiguous().requires_grad_()
        Bm = ins["B"].detach().reshape(rows_, doc_len, gb, N).repeat_interleave(gc // gb, dim=2)
        Bm = Bm.permute(0, 2, 3, 1).contiguous().requires_grad_()
        Cm = ins["C"].detach().reshape(rows_, doc_len, gc, N).permute(0, 2, 3, 1).contiguous().requires_grad_()
        A, Dv, bias = (p.detach().clone().requires_grad_() for p in params)
        dym = dy.reshape(rows_, doc_len, d).transpose(1, 2).contiguous()

        def mamba_call():
            return mamba_fn(u, delta, A, Bm, Cm, Dv, zz, bias, delta_softplus=True)

        # The same from the token-major tensors our op takes (M1's layout): mamba-ssm's caller then also pays the
        # copies to its layout, the B repeat, and their backward (the repeat's gradient is a sum over copies).
        tok = {k: ins[k].detach().reshape(rows_, doc_len, *ins[k].shape[2:]).contiguous().requires_grad_()
               for k in ("x", "dt", "z", "B", "C")}  # fmt: skip
        dy_tok = dy.reshape(rows_, doc_len, d)

        def mamba_from_tokens():
            def to_mamba(t):
                return t.transpose(1, 2).contiguous()

            Bt = tok["B"].repeat_interleave(gc // gb, dim=2).permute(0, 2, 3, 1).contiguous()
            Ct = tok["C"].permute(0, 2, 3, 1).contiguous()
            y = mamba_fn(to_mamba(tok["x"]), to_mamba(tok["dt"]), A, Bt, Ct, Dv, to_mamba(tok["z"]), bias,
                         delta_softplus=True)  # fmt: skip
            return y.transpose(1, 2)

        note = f"padded {rows_}x{doc_len}, B/C repeated to {gc}"
        try:
            with torch.no_grad():
                ms, peak = bench(mamba_call)
            record("mamba_cuda", "fwd", T, ms, peak, note)
            ms, peak = bench(lambda: mamba_call().backward(dym), grad_to_none=[u, delta, zz, Bm, Cm, A, Dv, bias])
            record("mamba_cuda", "fwd+bwd", T, ms, peak, note)
            note += "; from token-major inputs: layout copies and the B repeat included"
            with torch.no_grad():
                ms, peak = bench(mamba_from_tokens)
            record("mamba_cuda_e2e", "fwd", T, ms, peak, note)
            ms, peak = bench(lambda: mamba_from_tokens().backward(dy_tok), grad_to_none=[*tok.values(), A, Dv, bias])
            record("mamba_cuda_e2e", "fwd+bwd", T, ms, peak, note)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # a baseline failing must not lose our rows
            print(f"mamba_cuda T={T}: failed ({type(err).__name__}: {err}); skipped")


def main(argv=None):
    """Run the benchmark; returns a process exit code."""
    args = parse_args(argv)
    if args.plot_doc_order:
        plot_doc_order(args.plot_doc_order, os.path.join(args.out, "selective_scan_mixed_docs.png"))
        return 0
    if not torch.cuda.is_available():
        print("bench_selective_scan needs a CUDA GPU (none found); nothing to do.")
        return 1
    try:
        import triton
    except ImportError:
        print("triton is not installed; nothing to do.")
        return 1
    device = "cuda"
    dtype = getattr(torch, args.dtype)
    d, N, gc, gb = (96, 16, 6, 2) if args.smoke else args.shape
    tokens = [256, 512] if args.smoke else args.tokens
    doc_len = 128 if args.smoke else args.doc_len
    gpu = torch.cuda.get_device_name()
    print(f"Machine: {gpu} | torch {torch.__version__} | triton {triton.__version__} | dtype {args.dtype}")
    ok = True
    runnable = []
    for label, values in args.variants:
        with variant_settings(label, values):
            try:
                ok &= correctness_check(device, dtype, d, N, gc, gb, label)
            except ValueError as err:  # a variant that does not take these shapes (e.g. too much shared memory)
                print(f"{label}: skipped ({err})")
                continue
        runnable.append((label, values))
    args.variants = runnable
    mamba_fn = import_mamba_selective_scan_fn()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []

    def record(provider, mode, T, ms, peak, note=""):
        row = dict(timestamp=stamp, gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                   provider=provider, mode=mode, tokens=T, doc_len=doc_len, d_inner=d, d_state=N, G_C=gc, G_B=gb,
                   dtype=args.dtype, ms_p50=f"{ms[0]:.4f}", ms_p20=f"{ms[1]:.4f}", ms_p80=f"{ms[2]:.4f}",
                   peak_mem_mb=f"{peak:.1f}" if peak is not None else "", note=note)  # fmt: skip
        rows.append(row)
        print(f"{provider:>12} {mode:>8} T={T:>6}: {ms[0]:9.3f} ms (p20 {ms[1]:.3f}, p80 {ms[2]:.3f})"
              f"{'' if peak is None else f', peak +{peak:.0f} MB'} {note}")  # fmt: skip

    warm_up_gpu()
    for T in tokens:
        bench_size(T, args, (d, N, gc, gb), dtype, device, doc_len, mamba_fn, record)
        torch.cuda.empty_cache()

    append_csv(rows, args.out, "selective_scan.csv")
    if not args.no_plot:
        plot(rows, os.path.join(args.out, f"selective_scan_{time.strftime('%Y%m%d-%H%M%S')}.png"), gpu)
    return 0 if ok else 2


def plot_doc_order(csv_path, png_path):
    """fwd+bwd over documents of mixed lengths (``--mixed-docs`` rows): longest first (``triton``) against batch
    order (a ``LONGEST_FIRST=0`` variant labelled ``batch_order``), one panel per shape."""
    plt = pyplot()
    with open(csv_path) as fh:
        rows = [r for r in csv.DictReader(fh) if "docs=mixed" in r["note"] and r["mode"] == "fwd+bwd"]
    if plt is None or not rows:
        return
    shapes = sorted({r["d_inner"] for r in rows}, key=int, reverse=True)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, d in zip(axes[0], shapes):
        sel = [r for r in rows if r["d_inner"] == d]
        for provider, label in (("triton", "longest first"), ("batch_order", "batch order")):
            pts = sorted((int(r["tokens"]), float(r["ms_p50"])) for r in sel if r["provider"] == provider)
            ax.plot([t for t, _ in pts], [ms for _, ms in pts], marker="o", label=label)
        r0 = sel[0]
        ax.set_title(f"d_inner {d}, d_state {r0['d_state']}, {r0['G_C']} C / {r0['G_B']} B groups", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("packed tokens (rows of 2048 cut into ~6 documents)")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Selective scan over documents of mixed lengths: {rows[0]['gpu']}, {rows[0]['dtype']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def plot(rows, path, gpu):
    """Median ms per provider vs tokens, one panel per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for provider in sorted({r["provider"] for r in rows}):
            pts = [(r["tokens"], float(r["ms_p50"])) for r in rows if r["provider"] == provider and r["mode"] == mode]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("packed tokens")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"selective scan {mode}")
        ax.legend()
    fig.suptitle(gpu)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
