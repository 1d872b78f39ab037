"""Benchmark causal attention over packed documents (m1_hybrid.varlen_attention) on a CUDA GPU.

Rows of 2048 tokens, each cut into MATH-sized documents (random lengths, mean ~330); fwd and fwd+bwd
median ms and peak extra memory per backend:

- ``torch_flash`` / ``flash_attn``: varlen flash-attention over ``cu_seqlens`` (what the student's packed
  attention layers and the ``m1_varlen`` teacher use on CUDA);
- ``sdpa_mask``: SDPA with a per-row block-diagonal causal mask (the CPU path, and what transformers' SDPA
  does for packed ``position_ids``);
- ``sdpa_flat``: SDPA over all rows' tokens as one row with a token-by-token mask (the student's packed path
  before varlen attention: ``rows`` times the work of one row).

Checks each backend against ``sdpa_mask`` (fp32) first. Appends to ``<out>/packed_attention.csv`` and draws
``<out>/packed_attention.png``.

    python benchmarks/bench_packed_attention.py [--rows 8] [--out benchmarks/results] [--no-plot]
    python benchmarks/bench_packed_attention.py --plot-csv benchmarks/results/packed_attention.csv  # redraw
"""

import argparse
import csv
import datetime
import os

import torch
import torch.nn.functional as F
from results_io import append_csv
from results_io import pyplot
from timing import versions

from m1_hybrid.varlen_attention import varlen_attention
from m1_hybrid.varlen_attention import varlen_backend

SHAPES = {"smollm2": (9, 3, 64), "m1_3b": (24, 8, 128)}  # query heads, kv heads, head_dim
ROW = 2048


def row_documents(rows: int, gen) -> list[int]:
    """Document lengths, every row of ``ROW`` tokens cut at random points (about 6 documents a row)."""
    lengths = []
    for _ in range(rows):
        cuts = sorted(set(torch.randint(1, ROW, (5,), generator=gen).tolist()))
        lengths += [b - a for a, b in zip([0, *cuts], [*cuts, ROW])]
    return lengths


def sdpa_flat(q, k, v, cu):
    """The old student path: one row of all tokens, a (T, T) mask of same document and not later."""
    T = q.shape[0]
    starts = torch.zeros(T, dtype=torch.long, device=q.device)
    starts[cu[:-1].long()] = 1
    doc = starts.cumsum(0)
    idx = torch.arange(T, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    one = lambda t: t.transpose(0, 1)[None]  # noqa: E731
    out = F.scaled_dot_product_attention(one(q), one(k), one(v), attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8, help="packed rows of 2048 tokens")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-csv", metavar="CSV", help="only draw <out>/packed_attention.png from this CSV's rows")
    args = p.parse_args(argv)
    if args.plot_csv:
        with open(args.plot_csv) as fh:
            plot(list(csv.DictReader(fh)), os.path.join(args.out, "packed_attention.png"))
        return
    if not torch.cuda.is_available():
        print("bench_packed_attention: needs a CUDA GPU (none found); nothing measured.")
        return
    from triton.testing import do_bench

    gpu, (tv, trv) = torch.cuda.get_device_name(0), versions()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    gen = torch.Generator().manual_seed(0)
    lengths = row_documents(args.rows, gen)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu, max_len, T = cu.cuda(), max(lengths), sum(lengths)
    print(f"{gpu} | torch {tv} | {args.rows} rows x {ROW} = {T} tokens, {len(lengths)} documents (max {max_len})")
    rows = []
    for shape, (h, hkv, d) in SHAPES.items():
        q, k, v = (torch.randn(T, n, d, device="cuda", dtype=torch.bfloat16) for n in (h, hkv, hkv))
        ref = varlen_attention(q.float(), k.float(), v.float(), cu, max_len, args.rows, backend="sdpa_mask")
        fast = varlen_backend(q)
        variants = {
            fast: lambda t, b=fast: varlen_attention(*t, cu, max_len, args.rows, backend=b),
            "sdpa_mask": lambda t: varlen_attention(*t, cu, max_len, args.rows, backend="sdpa_mask"),
            "sdpa_flat": lambda t: sdpa_flat(*t, cu),
        }
        for name, fn in variants.items():
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            out = fn(leaves)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            grad = torch.randn_like(out)

            def step(fn=fn, leaves=leaves, grad=grad):
                fn(leaves).backward(grad)
                for t in leaves:
                    t.grad = None

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            with torch.no_grad():
                fwd = do_bench(lambda fn=fn, qkv=(q, k, v): fn(qkv))
            both = do_bench(step)
            print(f"{shape:<8} {name:<12} fwd {fwd:8.3f} fwd+bwd {both:8.3f} ms peak {peak:9.1f} MiB err {err:.1e}")
            rows.append(
                dict(
                    timestamp=stamp, gpu=gpu, torch=tv, triton=trv, shape=shape, heads=h, kv_heads=hkv, head_dim=d,
                    rows=args.rows, tokens=T, documents=len(lengths), backend=name, fwd_ms=f"{fwd:.4f}",
                    fwd_bwd_ms=f"{both:.4f}", peak_extra_mib=f"{peak:.1f}", rel_err_vs_fp32=f"{err:.2e}",
                )
            )  # fmt: skip
            assert err < 2e-2, f"{shape} {name}: relative error {err:.2e} against the fp32 reference"
    append_csv(rows, args.out, "packed_attention.csv")
    if not args.no_plot:
        plot(rows, os.path.join(args.out, "packed_attention.png"))


def plot(rows: list[dict], path: str) -> None:
    """fwd and fwd+bwd bars per backend, one panel per shape (log scale)."""
    plt = pyplot()
    if plt is None:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in rows if r["shape"] == shape]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [float(r["fwd_ms"]) for r in sel], 0.4, label="fwd")
        ax.bar([i + 0.2 for i in x], [float(r["fwd_bwd_ms"]) for r in sel], 0.4, label="fwd+bwd")
        ax.set_xticks(list(x), [r["backend"] for r in sel])
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{shape}: {sel[0]['heads']}/{sel[0]['kv_heads']} heads x {sel[0]['head_dim']}")
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"Packed causal attention, {r0['tokens']} tokens in {r0['documents']} documents: {r0['gpu']}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
