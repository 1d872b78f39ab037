"""Benchmark the causal conv1d forward/backward on packed tokens x 3072 channels on a CUDA GPU.

Compares our Triton op, the PyTorch reference and causal-conv1d's CUDA ``causal_conv1d_fn`` (channel-major,
``seq_idx`` packing; when importable). Checks correctness on the GPU first. Appends rows to
``<out>/conv1d.csv`` and writes ``<out>/conv1d.png``.

    python benchmarks/bench_conv1d.py [--smoke] [--out benchmarks/results]
"""

import argparse
import datetime
import os
import sys

import torch
from results_io import append_csv
from results_io import pyplot

D, K = 3072, 4
QUANTILES = [0.5, 0.2, 0.8]


def doc_lengths(total, gen):
    """Random document lengths (1..2048) summing to ``total``."""
    out, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(1, 2049, (1,), generator=gen)))
        out.append(n)
        left -= n
    return out


def cuda_baseline():
    try:
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn
    except Exception as e:  # noqa: BLE001 - optional baseline (needs the compiled causal_conv1d_cuda)
        print(f"causal_conv1d CUDA baseline unavailable: {e!r}")
        return None


def make(T, dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = doc_lengths(T, gen)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    proj = torch.randn(1, T, 2 * D, dtype=dtype, device="cuda")
    x = proj[:, :, :D]  # strided slice, as out of in_proj
    w = (torch.randn(D, K, device="cuda") / 2).to(dtype)
    bias = torch.randn(D, device="cuda").to(dtype)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
    return x, w, bias, cu.cuda(), seq_idx[None].cuda()


def check(ours, ref):
    print("correctness on GPU (Triton vs reference, fp32 and bf16, packed, with states and grads):")
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        x, w, bias, cu, _ = make(1000, dtype)
        h0 = torch.randn(cu.numel() - 1, D, K - 1, device="cuda", dtype=dtype)
        res = []
        for fn in (ref, ours):
            xs, ws, bs, hs = (t.detach().clone().requires_grad_() for t in (x, w, bias, h0))
            y, fin = fn(xs, ws, bs, "silu", cu, hs, True)
            torch.manual_seed(0)
            gy = torch.randn(y.shape, device="cuda").to(y)
            (y.float() * gy.float()).sum().backward()
            res.append([y, fin, xs.grad, ws.grad, bs.grad, hs.grad])
        for name, a, b in zip(["out", "final", "dx", "dw", "db", "dh0"], *res):
            e = ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-30)).item()
            good = e < (1e-4 if dtype == torch.float32 else 1e-2)
            ok &= good
            print(f"  {str(dtype):15s} {name:6s} rel err {e:.2e} {'OK' if good else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="results folder")
    ap.add_argument("--smoke", action="store_true", help="tiny quick run (1024 tokens)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_conv1d.py needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    from m1_kernels.conv1d.naive import causal_conv1d_ref
    from m1_kernels.conv1d.triton_conv import causal_conv1d_triton

    if not check(causal_conv1d_triton, causal_conv1d_ref):
        print("WARNING: correctness check failed; timings below are of a wrong kernel")
    theirs = cuda_baseline()
    gpu = torch.cuda.get_device_name()
    print(f"Machine: {gpu} | torch {torch.__version__} | triton {triton.__version__}")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    tokens = [1024] if args.smoke else [8192, 32768]
    print(f"{'dtype':>9} {'T':>6} {'impl':>14} {'mode':>5} {'p50 ms':>9} {'p20':>8} {'p80':>8}")
    for dtype in (torch.bfloat16, torch.float32):
        for T in tokens:
            x, w, bias, cu, seq_idx = make(T, dtype)
            impls = {
                "triton": lambda x, w, b, cu=cu: causal_conv1d_triton(x, w, b, "silu", cu),
                "torch_ref": lambda x, w, b, cu=cu: causal_conv1d_ref(x, w, b, "silu", cu),
            }
            if theirs is not None:
                impls["causal_conv1d"] = lambda x, w, b, seq_idx=seq_idx: theirs(
                    x.transpose(1, 2), w, b, seq_idx=seq_idx, activation="silu"
                ).transpose(1, 2)
            if args.smoke is False and T > 8192:
                impls.pop("torch_ref")  # python loop over documents: minutes at 32K tokens
            for name, fn in impls.items():
                xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, bias))
                try:
                    y = fn(xs, ws, bs)
                    gy = torch.randn_like(y)
                    fwd = do_bench(lambda fn=fn, xs=xs, ws=ws, bs=bs: fn(xs, ws, bs), quantiles=QUANTILES)
                    full = do_bench(
                        lambda fn=fn, xs=xs, ws=ws, bs=bs, gy=gy: torch.autograd.backward(fn(xs, ws, bs), gy),
                        quantiles=QUANTILES,
                        grad_to_none=[xs, ws, bs],
                    )
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} failed: {e!r}")
                    continue
                bwd = [f - g for f, g in zip(full, fwd)]
                for mode, ms in (("fwd", fwd), ("bwd", bwd), ("full", full)):
                    print(f"{str(dtype)[6:]:>9} {T:6d} {name:>14} {mode:>5} {ms[0]:9.3f} {ms[1]:8.3f} {ms[2]:8.3f}")
                    rows.append(
                        dict(
                            timestamp=stamp,
                            gpu=gpu,
                            torch=torch.__version__,
                            triton=triton.__version__,
                            dtype=str(dtype)[6:],
                            tokens=T,
                            d=D,
                            impl=name,
                            mode=mode,
                            p50_ms=round(ms[0], 4),
                            p20_ms=round(ms[1], 4),
                            p80_ms=round(ms[2], 4),
                        )
                    )
    write(rows, args.out)


def write(rows, out):
    if not rows:
        return
    append_csv(rows, out, "conv1d.csv")
    plt = pyplot()
    if plt is None:
        return
    modes = ("fwd", "bwd", "full")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, mode in zip(axes, modes):
        sub = [r for r in rows if r["mode"] == mode]
        labels = sorted({(r["dtype"], r["tokens"]) for r in sub})
        impls = sorted({r["impl"] for r in sub})
        for j, impl in enumerate(impls):
            vals = [
                next((r["p50_ms"] for r in sub if r["impl"] == impl and (r["dtype"], r["tokens"]) == lab), 0)
                for lab in labels
            ]
            ax.bar([i + 0.8 * j / len(impls) for i in range(len(labels))], vals, width=0.8 / len(impls), label=impl)
        ax.set_xticks(range(len(labels)), [f"{d}\n{t}" for d, t in labels])
        ax.set(yscale="log", ylabel="median ms", title=mode)
        ax.legend()
    fig.suptitle(f"{rows[0]['gpu']}: causal conv1d, packed x {D} channels")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "conv1d.png"), dpi=120)
    print(f"wrote {os.path.join(out, 'conv1d.png')}")


if __name__ == "__main__":
    main()
