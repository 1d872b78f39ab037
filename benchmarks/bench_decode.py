"""Benchmark the decode step (selective_state_update) at M1-3B shapes on a CUDA GPU.

Compares our Triton op, the PyTorch reference, mamba-ssm's Triton ``selective_state_update`` on the
repeated layout (state viewed (b, 192, 16, 16), B repeated to 192 groups; when importable) and the HBM floor
(bytes moved / measured copy bandwidth). Checks correctness on the GPU first. Appends rows to
``<out>/decode.csv`` and writes ``<out>/decode.png``.

    python benchmarks/bench_decode.py [--smoke] [--out benchmarks/results]
"""

import argparse
import datetime
import importlib
import importlib.util
import os
import sys
import types

import torch
from results_io import append_csv
from results_io import pyplot

D_INNER, N, G_C, G_B = 3072, 16, 192, 64  # M1-3B
QUANTILES = [0.5, 0.2, 0.8]


def copy_bandwidth(nbytes=1 << 30):
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of do_bench."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * nbytes / (ms * 1e-3)


def floor_bytes(b, state_dtype, x_dtype):
    s = torch.tensor([], dtype=state_dtype).element_size()
    e = torch.tensor([], dtype=x_dtype).element_size()
    return 2 * b * D_INNER * N * s + b * D_INNER * 4 * e + b * (G_B + G_C) * N * e


def mamba_ssm_update():
    """mamba-ssm's Triton selective_state_update, imported without running mamba_ssm/__init__ (CUDA exts)."""
    try:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None:
            return None
        if "mamba_ssm" not in sys.modules:
            pkg = types.ModuleType("mamba_ssm")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["mamba_ssm"] = pkg
        return importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update
    except Exception as e:  # noqa: BLE001 - optional baseline
        print(f"mamba-ssm baseline unavailable: {e!r}")
        return None


def make(b, state_dtype, x_dtype, n_slots=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    n_slots = n_slots or b

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g).to(x_dtype)

    state = torch.randn(n_slots, D_INNER, N, device="cuda", generator=g).to(state_dtype)
    A = -torch.rand(D_INNER, N, device="cuda", generator=g) - 0.1
    return dict(
        state=state,
        x=r(b, D_INNER),
        dt=r(b, D_INNER) * 0.5,
        A=A,
        B=r(b, G_B, N),
        C=r(b, G_C, N),
        D=torch.randn(D_INNER, device="cuda", generator=g),
        z=r(b, D_INNER),
        dt_bias=torch.randn(D_INNER, device="cuda", generator=g) * 0.5,
        idx=torch.randperm(n_slots, device="cuda", generator=g)[:b].to(torch.int32),
    )


def check(ours, ref):
    print("correctness on GPU (Triton vs reference):")
    ok = True
    for sd in (torch.float32, torch.bfloat16):
        for b in (1, 7, 64):
            t = make(b, sd, torch.bfloat16, n_slots=b + 5)
            if b > 1:  # one CUDA-graph padding row (a batch of one keeps its only row live)
                t["idx"][b // 2] = -1
            s_ref, s_tri = t["state"].clone(), t["state"].clone()
            args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, t["idx"], -1)
            y_ref = ref(s_ref, *args)
            y_tri = ours(s_tri, *args)
            ey = ((y_ref.float() - y_tri.float()).norm() / y_ref.float().norm().clamp_min(1e-12)).item()
            es = ((s_ref.float() - s_tri.float()).norm() / s_ref.float().norm().clamp_min(1e-12)).item()
            good = ey < 1e-2 and es < 1e-2
            ok &= good
            print(f"  state {str(sd):15s} b={b:3d}: rel err y {ey:.2e} state {es:.2e} {'OK' if good else 'FAIL'}")
    return ok


def bench_one(fn, use_graph):
    from triton.testing import do_bench

    if use_graph:
        try:
            fn()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        except Exception as e:  # noqa: BLE001
            print(f"  (CUDA graph capture failed, timing eagerly: {e!r})")
    return do_bench(fn, quantiles=QUANTILES)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="results folder")
    ap.add_argument("--smoke", action="store_true", help="tiny quick run (batches 1, 8)")
    ap.add_argument("--no-graph", action="store_true", help="time eagerly instead of replaying CUDA graphs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    import triton

    from m1_kernels.selective_scan.naive import selective_state_update_ref
    from m1_kernels.selective_scan.triton_update import selective_state_update_triton

    if not check(selective_state_update_triton, selective_state_update_ref):
        print("WARNING: correctness check failed; timings below are of a wrong kernel")
    bw = copy_bandwidth(1 << 28 if args.smoke else 1 << 30)
    gpu = torch.cuda.get_device_name()
    print(f"Machine: {gpu} | torch {torch.__version__} | triton {triton.__version__} | copy bw {bw / 1e9:.0f} GB/s")
    theirs = mamba_ssm_update()
    batches = [1, 8] if args.smoke else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    rows = []
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"{'state':>9} {'b':>4} {'impl':>10} {'p50 us':>9} {'p20':>8} {'p80':>8} {'x floor':>8}")
    for sd in (torch.float32, torch.bfloat16):
        for b in batches:
            t = make(b, sd, torch.bfloat16)
            floor_us = floor_bytes(b, sd, torch.bfloat16) / bw * 1e6
            a = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, t["idx"], -1)
            impls = {
                "triton": lambda t=t, a=a: selective_state_update_triton(t["state"], *a),
                "torch_ref": lambda t=t, a=a: selective_state_update_ref(t["state"], *a),
            }
            if theirs is not None:
                h, P = G_C, D_INNER // G_C
                st4 = t["state"][:b].view(b, h, P, N)
                Brep = t["B"].repeat_interleave(G_C // G_B, dim=1)
                m_args = (t["x"].view(b, h, P), t["dt"].view(b, h, P), t["A"].view(h, P, N), Brep, t["C"])
                m_kw = dict(D=t["D"].view(h, P), z=t["z"].view(b, h, P), dt_bias=t["dt_bias"].view(h, P))
                impls["mamba_ssm"] = lambda st4=st4, m_args=m_args, m_kw=m_kw: theirs(
                    st4, *m_args, dt_softplus=True, **m_kw
                )
            for name, fn in impls.items():
                try:
                    ms = bench_one(fn, use_graph=not args.no_graph and name != "torch_ref")
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} failed: {e!r}")
                    continue
                p50, p20, p80 = (m * 1e3 for m in ms)
                ratio = p50 / floor_us
                print(f"{str(sd)[6:]:>9} {b:4d} {name:>10} {p50:9.2f} {p20:8.2f} {p80:8.2f} {ratio:8.2f}")
                rows.append(
                    dict(
                        timestamp=stamp,
                        gpu=gpu,
                        torch=torch.__version__,
                        triton=triton.__version__,
                        state_dtype=str(sd)[6:],
                        batch=b,
                        impl=name,
                        p50_us=round(p50, 3),
                        p20_us=round(p20, 3),
                        p80_us=round(p80, 3),
                        floor_us=round(floor_us, 3),
                        x_floor=round(ratio, 3),
                        copy_bw_gbs=round(bw / 1e9, 1),
                    )
                )
    write(rows, args.out, "decode")


def write(rows, out, name):
    if not rows:
        return
    append_csv(rows, out, f"{name}.csv")
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, sd in zip(axes, ("float32", "bfloat16")):
        sub = [r for r in rows if r["state_dtype"] == sd]
        for impl in sorted({r["impl"] for r in sub}):
            pts = [(r["batch"], r["p50_us"]) for r in sub if r["impl"] == impl]
            ax.plot(*zip(*pts), marker="o", label=impl)
        floor = sorted({(r["batch"], r["floor_us"]) for r in sub})
        if floor:
            ax.plot(*zip(*floor), "k--", label="HBM floor")
        ax.set(xscale="log", yscale="log", xlabel="batch", title=f"decode step, state {sd}")
        ax.legend()
    axes[0].set_ylabel("median us")
    fig.suptitle(f"{rows[0]['gpu']}: M1-3B selective_state_update")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=120)
    print(f"wrote {os.path.join(out, name + '.png')}")


if __name__ == "__main__":
    main()
