"""Benchmark fused token log-prob + entropy (GRPO) against naive PyTorch on one CUDA GPU.

Variants (bf16 inputs, loss = -mean(logprobs) - 0.01 * mean(entropy), forward + backward):
  naive_linear      lm_head matmul, fp32 log_softmax + entropy under autograd (naive.py)
  fused_linear      m1_kernels fused_linear_logprob_entropy (chunked, recomputing backward)
  naive_logits      from given logits: fp32 log_softmax + entropy under autograd
  fused_logits      m1_kernels logprob_entropy_from_logits

Time: triton.testing.do_bench median (p20/p80); memory: peak torch.cuda.max_memory_allocated
above the allocation before the call. A GPU correctness check runs first.

    python benchmarks/bench_logprob_entropy.py            # T=8192 H=3072 V=128256 bf16
    python benchmarks/bench_logprob_entropy.py --smoke
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import cuda_and_triton  # noqa: E402
from timing import loss_bench_parser  # noqa: E402
from timing import measure  # noqa: E402
from timing import report  # noqa: E402
from timing import start  # noqa: E402
from timing import write_csv_and_plot  # noqa: E402

CSV_NAME = "logprob_entropy.csv"


def _loss(lp, ent):
    return -lp.mean() - 0.01 * ent.mean()


def correctness(dev, dtype):
    from m1_kernels.logprob_entropy import fused_linear_logprob_entropy
    from m1_kernels.logprob_entropy import fused_linear_logprob_entropy_ref
    from m1_kernels.logprob_entropy import logprob_entropy_from_logits
    from m1_kernels.logprob_entropy import logprob_entropy_from_logits_ref

    g = torch.Generator(device=dev).manual_seed(0)
    T, V, H = 300, 32000, 256
    h = torch.randn(T, H, device=dev, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * 2 * H**-0.5).to(dtype).requires_grad_()
    x = (torch.randn(T, V, device=dev, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device=dev, generator=g)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    ok = True
    for name, f, r, inputs in (
        ("linear", lambda: fused_linear_logprob_entropy(h, w, labels, temperature=0.8),
         lambda: fused_linear_logprob_entropy_ref(h, w, labels, temperature=0.8), (h, w)),
        ("logits", lambda: logprob_entropy_from_logits(x, labels, 0.8),
         lambda: logprob_entropy_from_logits_ref(x, labels, 0.8), (x,)),
    ):  # fmt: skip
        lp, ent = f()
        gs = torch.autograd.grad(_loss(lp, ent), inputs)
        rlp, rent = r()
        rg = torch.autograd.grad(_loss(rlp, rent), inputs)
        errs = [rel(lp, rlp), rel(ent, rent)] + [rel(a, b) for a, b in zip(gs, rg)]
        ok &= errs[0] < 5e-3 and errs[1] < 5e-3 and max(errs[2:]) < 2e-2
        print(f"  check {name}: rel errs logprobs/entropy/grads " + " ".join(f"{e:.2e}" for e in errs))
    print(f"correctness vs reference on {dev}: {'OK' if ok else 'FAILED'}")
    return ok


def main(argv=None):
    args = loss_bench_parser(__doc__, "tiny shapes, short timing").parse_args(argv)
    if not cuda_and_triton("bench_logprob_entropy"):
        return 2
    from m1_kernels.logprob_entropy import fused_linear_logprob_entropy
    from m1_kernels.logprob_entropy import fused_linear_logprob_entropy_ref
    from m1_kernels.logprob_entropy import logprob_entropy_from_logits
    from m1_kernels.logprob_entropy import logprob_entropy_from_logits_ref

    machine = start(args)
    dtype, dev = getattr(torch, args.dtype), "cuda"
    ok = correctness(dev, dtype)
    T, V, H = args.T, args.V, args.H
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(T, H, device=dev, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * 2 * H**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device=dev, generator=g)
    rep = 100 if args.smoke else None
    res = {}
    res["naive_linear"] = measure(
        lambda: torch.autograd.grad(_loss(*fused_linear_logprob_entropy_ref(h, w, labels)), (h, w)), rep
    )
    res["fused_linear"] = measure(
        lambda: torch.autograd.grad(_loss(*fused_linear_logprob_entropy(h, w, labels)), (h, w)), rep
    )
    with torch.no_grad():
        x = (h @ w.t()).requires_grad_()
    res["naive_logits"] = measure(
        lambda: torch.autograd.grad(_loss(*logprob_entropy_from_logits_ref(x, labels)), x), rep
    )
    res["fused_logits"] = measure(lambda: torch.autograd.grad(_loss(*logprob_entropy_from_logits(x, labels)), x), rep)

    base = {"naive_linear": "naive_linear", "fused_linear": "naive_linear"}
    rows = report(res, base, "naive_logits", "logprob_entropy", args, machine, ok)
    write_csv_and_plot(rows, args.out, CSV_NAME, "Log-prob + entropy fwd+bwd")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
