"""Build mamba-ssm's and causal-conv1d's CUDA kernels on the GPU machine, for the benchmark baselines.

The GPU machine has nvcc but no network, and neither package ships wheels on PyPI; their own
``setup.py`` tries to download a prebuilt wheel from GitHub and then compiles for ~10 GPU targets.
We compile only what the benchmarks call, for the one target present (sm_90 on an H100), with the
packages' own nvcc flags, through ``torch.utils.cpp_extension.load`` (ninja, all cores).

Usage (the two sdists travel in an ignored folder; ``scripts/fetch_cuda_baseline_sdists.sh`` fetches them)::

    python benchmarks/build_cuda_baselines.py --sdists .gpu_baselines --build $HOME/cuda_baselines
    export PYTHONPATH=$(python benchmarks/build_cuda_baselines.py --build $HOME/cuda_baselines --print-path):$PYTHONPATH

After that ``from mamba_ssm.ops.selective_scan_interface import selective_scan_fn`` and
``from causal_conv1d import causal_conv1d_fn`` work, which ``bench_selective_scan.py``, ``bench_decode.py``
and ``bench_conv1d.py`` pick up as baselines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
from pathlib import Path

PACKAGES = {
    # extension name: (sdist prefix, sources relative to the sdist root, include dir)
    "selective_scan_cuda": (
        "mamba_ssm",
        ["csrc/selective_scan/selective_scan.cpp"]
        + [f"csrc/selective_scan/selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")]
        + [
            f"csrc/selective_scan/selective_scan_bwd_{t}_{k}.cu"
            for t in ("fp32", "fp16", "bf16")
            for k in ("real", "complex")
        ],
        "csrc/selective_scan",
    ),
    "causal_conv1d_cuda": (
        "causal_conv1d",
        [
            "csrc/causal_conv1d.cpp",
            "csrc/causal_conv1d_fwd.cu",
            "csrc/causal_conv1d_bwd.cu",
            "csrc/causal_conv1d_update.cu",
        ],
        "csrc",
    ),
}

# The packages' own nvcc flags (setup.py), minus their list of GPU targets.
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-lineinfo",
]


def source_root(build: Path, prefix: str) -> Path:
    """The extracted sdist folder of ``prefix`` under ``build``."""
    found = sorted(p for p in build.glob(f"{prefix}-*") if p.is_dir())
    if not found:
        raise FileNotFoundError(f"no extracted {prefix} sdist under {build}: run with --sdists DIR first")
    return found[-1]


def extract(sdists: Path, build: Path) -> None:
    """Unpack every ``*.tar.gz`` of ``sdists`` into ``build`` (once)."""
    tars = sorted(sdists.glob("*.tar.gz"))
    if not tars:
        raise FileNotFoundError(f"no sdists in {sdists}: run scripts/fetch_cuda_baseline_sdists.sh")
    for tar in tars:
        if not (build / tar.name.removesuffix(".tar.gz")).exists():
            with tarfile.open(tar) as f:
                f.extractall(build, filter="data")


def compile_all(build: Path, arch: str) -> None:
    """JIT-compile both extensions; the ``.so`` files land in ``build/ext_<name>``."""
    import torch.utils.cpp_extension as ext

    for name, (prefix, sources, include) in PACKAGES.items():
        root = source_root(build, prefix)
        out = build / f"ext_{name}"
        out.mkdir(exist_ok=True)
        t0 = time.time()
        ext.load(
            name=name,
            sources=[str(root / s) for s in sources],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=NVCC_FLAGS + ["-gencode", f"arch=compute_{arch},code=sm_{arch}"],
            extra_include_paths=[str(root / include)],
            build_directory=str(out),
            verbose=False,
        )
        print(f"[build_cuda_baselines] {name}: built in {time.time() - t0:.0f} s -> {out}", flush=True)


def python_path(build: Path) -> str:
    """PYTHONPATH entries that make ``mamba_ssm``, ``causal_conv1d`` and their extensions importable."""
    entries = [build / f"ext_{name}" for name in PACKAGES]
    entries += [source_root(build, prefix) for prefix, _, _ in PACKAGES.values()]
    return os.pathsep.join(str(e) for e in entries)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sdists", type=Path, help="folder holding mamba_ssm-*.tar.gz and causal_conv1d-*.tar.gz")
    p.add_argument("--build", type=Path, default=Path.home() / "cuda_baselines", help="build folder")
    p.add_argument("--arch", default=None, help="compute capability without the dot (default: the GPU's)")
    p.add_argument("--print-path", action="store_true", help="only print the PYTHONPATH entries and exit")
    args = p.parse_args(argv)
    if args.print_path:
        print(python_path(args.build))
        return 0
    import torch

    if args.sdists is None:
        p.error("--sdists DIR is required to build")
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to build", file=sys.stderr)
        return 1
    args.build.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    arch = args.arch or "".join(map(str, torch.cuda.get_device_capability()))
    extract(args.sdists, args.build)
    compile_all(args.build, arch)
    print(python_path(args.build))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
