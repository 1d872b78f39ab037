"""Per-kernel GPU time of one selective-scan forward + backward (torch.profiler), for each ``--variants`` entry.

Shows where a variant's time goes (the scan kernels against the layout copies around them), which the wall-clock
benchmark (``bench_selective_scan.py``) cannot. Same inputs as that benchmark: M1-3B shapes, packed documents.

    python benchmarks/profile_scan.py --tokens 8192 --variants triton cm:CHANNEL_MAJOR=1
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selective_scan import D_INNER  # noqa: E402
from bench_selective_scan import D_STATE  # noqa: E402
from bench_selective_scan import G_B  # noqa: E402
from bench_selective_scan import G_C  # noqa: E402
from bench_selective_scan import make_inputs  # noqa: E402
from bench_selective_scan import parse_variant  # noqa: E402
from bench_selective_scan import scan_operands  # noqa: E402
from bench_selective_scan import variant_settings  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--doc-len", type=int, default=2048)
    p.add_argument("--shape", type=lambda v: tuple(int(x) for x in v.split(",")), default=(D_INNER, D_STATE, G_C, G_B))
    p.add_argument("--variants", nargs="+", default=["triton"])
    p.add_argument("--inputs", choices=["leaves", "views"], default="leaves", help="as in bench_selective_scan.py")
    p.add_argument("--rows", type=int, default=12, help="kernels listed per variant")
    args = p.parse_args(argv)
    from m1_kernels.selective_scan.triton_scan import selective_scan_triton

    d, N, gc, gb = args.shape
    fused, ins, cu = make_inputs(args.tokens, args.doc_len, d, N, gc, gb, torch.bfloat16, "cuda")
    fused.requires_grad_(True)
    operands, grads = scan_operands(fused, ins, args.shape, args.inputs)
    dy = torch.randn(1, args.tokens, d, device="cuda", dtype=torch.bfloat16)

    def step():
        t = operands()
        y = selective_scan_triton(t["x"], t["dt"], ins["A"], t["B"], t["C"], ins["D"], t["z"], ins["dt_bias"], True, cu)
        y.backward(dy)
        for g in grads:
            g.grad = None

    for spec in args.variants:
        label, values = parse_variant(spec)
        with variant_settings(values):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
        print(f"== {label} {values} ({args.tokens} tokens, per step = total / 5)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
