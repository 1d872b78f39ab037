"""Shared by the loss benchmarks (bench_fused_kl, bench_logprob_entropy): their command line, the CUDA/triton
check, timing + peak memory of one variant, the results table and its CSV/plot."""

import argparse
import datetime
import os

import torch
from results_io import append_csv
from results_io import pyplot


def versions():
    """(torch version, triton version or "none")."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return torch.__version__, tv


def loss_bench_parser(doc, smoke_help):
    """--T --V --H --dtype --out --smoke (T=8192 V=128256 H=3072 bf16; --smoke: tiny shapes)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=8192, help="tokens")
    p.add_argument("--V", type=int, default=128256, help="vocabulary")
    p.add_argument("--H", type=int, default=3072, help="hidden size (linear variants)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    return p


def cuda_and_triton(prog):
    """True when a CUDA GPU and triton are there; otherwise says what is missing and returns False."""
    if not torch.cuda.is_available():
        print(f"{prog}: needs a CUDA GPU (none found); nothing measured.")
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        print(f"{prog}: needs triton (triton.testing.do_bench).")
        return False
    return True


def start(args):
    """Apply the --smoke shapes to ``args`` and print the machine line; returns (gpu, torch, triton versions)."""
    if args.smoke:
        args.T, args.V, args.H = 512, 4096, 256
    gpu = torch.cuda.get_device_name(0)
    tv, trv = versions()
    print(f"Machine: {gpu} | torch {tv} | triton {trv} | T={args.T} V={args.V} H={args.H} {args.dtype}")
    return gpu, tv, trv


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


def report(results, base, default_base, op, args, machine, ok):
    """Print the table of ``results`` (name -> measure()) with memory and speed relative to each variant's
    baseline (``base.get(name, default_base)``; nan when that one was not measured); returns the CSV rows."""
    gpu, tv, trv = machine
    T, V, H = args.T, args.V, args.H
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{'variant':<15}{'p50 ms':>10}{'p20':>9}{'p80':>9}{'peak GiB':>10}{'mem % base':>11}{'speedup':>9}")
    for name, ((p50, p20, p80), peak) in results.items():
        ref = results.get(base.get(name, default_base))
        mem_pct = 100 * peak / ref[1] if ref else float("nan")
        speed = ref[0][0] / p50 if ref else float("nan")
        print(f"{name:<15}{p50:>10.2f}{p20:>9.2f}{p80:>9.2f}{peak:>10.2f}{mem_pct:>10.1f}%{speed:>8.2f}x")
        rows.append(
            dict(
                timestamp=stamp, gpu=gpu, torch=tv, triton=trv, op=op, variant=name, T=T, V=V, H=H,
                dtype=args.dtype, ms_p50=f"{p50:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}",
                peak_extra_gib=f"{peak:.4f}", mem_pct_of_naive=f"{mem_pct:.2f}", speedup_vs_naive=f"{speed:.3f}",
                smoke=int(args.smoke), correct=int(ok),
            )
        )  # fmt: skip
    return rows


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
