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

import sys

import torch
from timing import cuda_and_triton
from timing import loss_bench_parser
from timing import measure
from timing import report
from timing import start
from timing import write_csv_and_plot

CSV_NAME = "fused_kl.csv"


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
    p = loss_bench_parser(__doc__, "tiny shapes, short timing (a quick end-to-end check)")
    p.add_argument("--skip", default="", help="comma-separated variants to skip")
    args = p.parse_args(argv)
    if not cuda_and_triton("bench_fused_kl"):
        return 2
    from m1_kernels.fused_kl import fused_kl_div
    from m1_kernels.fused_kl import fused_kl_div_ref
    from m1_kernels.fused_kl import fused_linear_kl_div

    machine = start(args)
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
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
    rows = report(results, base, "naive_linear", "reverse_kl", args, machine, ok)
    write_csv_and_plot(rows, args.out, CSV_NAME, "Reverse KL fwd+bwd")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
