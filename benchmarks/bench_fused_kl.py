"""Benchmark the fused KL losses against naive PyTorch on one CUDA GPU (forward + backward).

Variants (reverse KL, bf16 inputs, mean over tokens):
  naive_fp32        fp32 log_softmax of student and teacher under autograd (naive.py reference)
  torch_chunked     the same per 1024-token chunk under autograd (a loop, the obvious torch fix)
  fused_kl_div      m1_kernels fused_kl_div on logits (Triton, gradient computed in the forward)
  naive_linear      lm_head matmul + naive_fp32, from hidden states
  fused_linear      m1_kernels fused_linear_kl_div from hidden states (logits never materialised)

Time: triton.testing.do_bench median (p20/p80) of forward+backward. Memory: peak
torch.cuda.max_memory_allocated above what was allocated before the call (inputs excluded,
returned gradients included). A GPU correctness check against the reference runs first.

    python benchmarks/bench_fused_kl.py              # T=8192 V=128256 H=3072 bf16
    python benchmarks/bench_fused_kl.py --smoke      # tiny shapes, seconds
"""

import argparse
import datetime
import os
import sys

import torch
from results_io import append_csv
from results_io import pyplot

CSV_NAME = "fused_kl.csv"


def _versions():
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return torch.__version__, tv


def measure(fn, reps_ms=None):
    """(p50, p20, p80) ms of fn() via triton.testing.do_bench, and its peak extra memory in GiB."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    del out
    kw = {} if reps_ms is None else {"rep": reps_ms}
    p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], **kw)
    return (p50, p20, p80), peak


def _torch_chunked(s, t, chunk=1024):
    from m1_kernels.fused_kl import fused_kl_div_ref

    T = s.shape[0]
    loss = s.new_zeros((), dtype=torch.float32)
    for i in range(0, T, chunk):
        loss = loss + fused_kl_div_ref(s[i : i + chunk], t[i : i + chunk]) * (min(chunk, T - i) / T)
    return loss


def correctness(device, dtype):
    from m1_kernels.fused_kl import fused_kl_div
    from m1_kernels.fused_kl import fused_kl_div_ref
    from m1_kernels.fused_kl import fused_linear_kl_div
    from m1_kernels.fused_kl import fused_linear_kl_div_ref

    g = torch.Generator(device=device).manual_seed(0)
    T, V, H = 300, 32000, 256
    s = (torch.randn(T, V, device=device, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(T, V, device=device, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (T,), device=device, generator=g)
    labels[::5] = -100
    h = torch.randn(T, H, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device, generator=g) * H**-0.5).to(dtype).requires_grad_()
    ok = True

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    for direction in ("reverse", "forward"):
        loss = fused_kl_div(s, t, labels, direction=direction, temperature=1.5)
        (gs,) = torch.autograd.grad(loss, s)
        ref = fused_kl_div_ref(s, t, labels, direction=direction, temperature=1.5)
        (rs,) = torch.autograd.grad(ref, s)
        e = (rel(loss, ref), rel(gs, rs))
        ok &= e[0] < 1e-4 and e[1] < 2e-2
        print(f"  check fused_kl_div {direction}: loss rel err {e[0]:.2e}, grad rel err {e[1]:.2e}")
        loss = fused_linear_kl_div(h, w, t, labels, direction=direction, temperature=1.5)
        gl = torch.autograd.grad(loss, (h, w))
        ref = fused_linear_kl_div_ref(h, w, t, labels, direction=direction, temperature=1.5)
        rl = torch.autograd.grad(ref, (h, w))
        e = (rel(loss, ref), rel(gl[0], rl[0]), rel(gl[1], rl[1]))
        ok &= e[0] < 5e-3 and e[1] < 2e-2 and e[2] < 2e-2
        print(
            f"  check fused_linear_kl_div {direction}: loss {e[0]:.2e}, grad_hidden {e[1]:.2e}, grad_weight {e[2]:.2e}"
        )
    print(f"correctness vs reference on {device}: {'OK' if ok else 'FAILED'}")
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=8192, help="tokens")
    p.add_argument("--V", type=int, default=128256, help="vocabulary")
    p.add_argument("--H", type=int, default=3072, help="hidden size (linear variants)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, short timing (a quick end-to-end check)")
    p.add_argument("--skip", default="", help="comma-separated variants to skip")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused_kl: needs a CUDA GPU (none found); nothing measured.")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_fused_kl: needs triton (triton.testing.do_bench).")
        return 2
    from m1_kernels.fused_kl import fused_kl_div
    from m1_kernels.fused_kl import fused_kl_div_ref
    from m1_kernels.fused_kl import fused_linear_kl_div

    if args.smoke:
        args.T, args.V, args.H = 512, 4096, 256
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    gpu = torch.cuda.get_device_name(0)
    tv, trv = _versions()
    print(f"Machine: {gpu} | torch {tv} | triton {trv} | T={args.T} V={args.V} H={args.H} {args.dtype}")
    ok = correctness(dev, dtype)

    T, V, H = args.T, args.V, args.H
    g = torch.Generator(device=dev).manual_seed(0)
    s = (torch.randn(T, V, device=dev, generator=g) * 2).to(dtype).requires_grad_()
    t = (torch.randn(T, V, device=dev, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (T,), device=dev, generator=g)
    skip = set(filter(None, args.skip.split(",")))
    variants = {
        "naive_fp32": lambda: torch.autograd.grad(fused_kl_div_ref(s, t, labels), s),
        "torch_chunked": lambda: torch.autograd.grad(_torch_chunked(s, t), s),
        "fused_kl_div": lambda: torch.autograd.grad(fused_kl_div(s, t, labels), s),
    }
    results = {}
    for name, fn in variants.items():
        if name not in skip:
            results[name] = measure(fn, 100 if args.smoke else None)
    variants.clear()
    s = None  # free the student logits before the linear variants  # noqa: F841
    torch.cuda.empty_cache()
    h = torch.randn(T, H, device=dev, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * H**-0.5).to(dtype).requires_grad_()

    def naive_linear():
        return torch.autograd.grad(fused_kl_div_ref(h @ w.t(), t, labels), (h, w))

    lin = {
        "naive_linear": naive_linear,
        "fused_linear": lambda: torch.autograd.grad(fused_linear_kl_div(h, w, t, labels), (h, w)),
    }
    for name, fn in lin.items():
        if name not in skip:
            results[name] = measure(fn, 100 if args.smoke else None)

    base = {"naive_fp32": "naive_fp32", "torch_chunked": "naive_fp32", "fused_kl_div": "naive_fp32"}
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{'variant':<15}{'p50 ms':>10}{'p20':>9}{'p80':>9}{'peak GiB':>10}{'mem % base':>11}{'speedup':>9}")
    for name, ((p50, p20, p80), peak) in results.items():
        ref = results.get(base.get(name, "naive_linear"))
        mem_pct = 100 * peak / ref[1] if ref else float("nan")
        speed = ref[0][0] / p50 if ref else float("nan")
        print(f"{name:<15}{p50:>10.2f}{p20:>9.2f}{p80:>9.2f}{peak:>10.2f}{mem_pct:>10.1f}%{speed:>8.2f}x")
        rows.append(
            dict(
                timestamp=stamp, gpu=gpu, torch=tv, triton=trv, op="reverse_kl", variant=name, T=T, V=V, H=H,
                dtype=args.dtype, ms_p50=f"{p50:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}",
                peak_extra_gib=f"{peak:.4f}", mem_pct_of_naive=f"{mem_pct:.2f}", speedup_vs_naive=f"{speed:.3f}",
                smoke=int(args.smoke), correct=int(ok),
            )
        )  # fmt: skip
    write_csv_and_plot(rows, args.out, CSV_NAME, "Reverse KL fwd+bwd")
    return 0 if ok else 1


def write_csv_and_plot(rows, out_dir, csv_name, title):
    append_csv(rows, out_dir, csv_name)
    plt = pyplot()
    if plt is None:
        return
    names = [r["variant"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(names, [float(r["ms_p50"]) for r in rows], color="tab:blue")
    a1.set_ylabel("fwd+bwd ms (p50)")
    a2.bar(names, [float(r["peak_extra_gib"]) for r in rows], color="tab:orange")
    a2.set_ylabel("peak extra GiB")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30)
    r0 = rows[0]
    fig.suptitle(f"{title}: {r0['gpu']}, T={r0['T']} V={r0['V']} H={r0['H']} {r0['dtype']}")
    fig.tight_layout()
    png = os.path.join(out_dir, csv_name.replace(".csv", ".png"))
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
