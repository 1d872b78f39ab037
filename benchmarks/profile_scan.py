"""Per-kernel GPU time of one selective-scan forward + backward (torch.profiler), for each ``--variants`` entry.

Shows where a variant's time goes (the scan kernels against the layout copies around them), which the wall-clock
benchmark (``bench_selective_scan.py``) cannot. Same inputs as that benchmark: M1-3B shapes, packed documents.

    python benchmarks/profile_scan.py --tokens 8192 --variants triton cuda cuda_chunked:SERIAL_MIN_THREADS_PER_SM=999999

Variants as in that benchmark: ``LABEL[:CONSTANT=INT,...]``, labels starting with ``cuda`` run the CUDA kernels.
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selective_scan import D_INNER  # noqa: E402
from bench_selective_scan import D_STATE  # noqa: E402
from bench_selective_scan import G_B  # noqa: E402
from bench_selective_scan import G_C  # noqa: E402
from bench_selective_scan import make_inputs  # noqa: E402
from bench_selective_scan import parse_variant  # noqa: E402
from bench_selective_scan import scan_operands  # noqa: E402
from bench_selective_scan import variant_fn  # noqa: E402
from bench_selective_scan import variant_settings  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--doc-len", type=int, default=2048)
    p.add_argument("--shape", type=lambda v: tuple(int(x) for x in v.split(",")), default=(D_INNER, D_STATE, G_C, G_B))
    p.add_argument("--variants", nargs="+", default=["triton"])
    p.add_argument("--inputs", choices=["leaves", "views"], default="leaves", help="as in bench_selective_scan.py")
    p.add_argument("--rows", type=int, default=12, help="kernels listed per variant")
    p.add_argument(
        "--host",
        action="store_true",
        help="also the host (Python) time of the forward and backward calls, and their costliest functions: time "
        "the GPU waits for whenever it exceeds the queued work",
    )
    p.add_argument(
        "--sync-debug",
        action="store_true",
        help="with --host: warn, with a stack, at every host-device sync inside the timed calls "
        "(torch.cuda.set_sync_debug_mode)",
    )
    args = p.parse_args(argv)
    d, N, gc, gb = args.shape
    fused, ins, cu = make_inputs(args.tokens, args.doc_len, d, N, gc, gb, torch.bfloat16, "cuda")
    fused.requires_grad_(True)
    operands, grads = scan_operands(fused, ins, args.shape, args.inputs)
    dy = torch.randn(1, args.tokens, d, device="cuda", dtype=torch.bfloat16)

    def step(scan):
        t = operands()
        y = scan(t["x"], t["dt"], ins["A"], t["B"], t["C"], ins["D"], t["z"], ins["dt_bias"], True, cu)
        y.backward(dy)
        for g in grads:
            g.grad = None

    for spec in args.variants:
        label, values = parse_variant(spec)
        scan = variant_fn(label)
        with variant_settings(label, values):
            for _ in range(3):
                step(scan)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step(scan)
                torch.cuda.synchronize()
        print(f"== {label} {values} ({args.tokens} tokens, per step = total / 5)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
        if args.host:
            with variant_settings(label, values):
                host_time(scan, operands, ins, cu, dy, grads, args.rows, sync_debug=args.sync_debug)


def host_time(scan, operands, ins, cu, dy, grads, rows, steps=20, sync_debug=False):
    """Print the mean host time of the forward and of the backward call (launches are asynchronous: this is the
    Python and launch overhead, plus any host sync inside), then, over as many more steps, cProfile's costliest
    functions (the profiler slows Python down, so it is off while timing). ``sync_debug``: torch warns at each
    host-device sync inside the calls (the first step's, so that each warns once)."""
    totals = [0.0, 0.0]
    profile = cProfile.Profile()
    for i in range(2 * steps):
        torch.cuda.synchronize()
        t = operands()
        if i >= steps:
            profile.enable()
        torch.cuda.set_sync_debug_mode("warn" if sync_debug and i == 0 else "default")
        t0 = time.perf_counter()
        y = scan(t["x"], t["dt"], ins["A"], t["B"], t["C"], ins["D"], t["z"], ins["dt_bias"], True, cu)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        torch.cuda.set_sync_debug_mode("default")
        profile.disable()
        if i < steps:
            totals[0] += t1 - t0
            totals[1] += t2 - t1
        for g in grads:
            g.grad = None
    print(f"host time per call: forward {1e6 * totals[0] / steps:.0f} us, backward {1e6 * totals[1] / steps:.0f} us")
    pstats.Stats(profile).sort_stats("tottime").print_stats(rows)


if __name__ == "__main__":
    main()
