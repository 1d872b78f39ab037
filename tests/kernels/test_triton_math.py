"""m1_kernels.triton_math: the PTX approximations are what a CUDA build compiles, the exact ops what the
interpreter runs, and ``M1_KERNELS_FAST_MATH=0`` switches the approximations off.

The CUDA side needs no GPU: Triton compiles a kernel for sm_90 on this machine (its bundled LLVM and ptxas), and
the test reads the PTX. Each compile runs in a fresh process because ``FAST_MATH`` is fixed at import and
``TRITON_INTERPRET`` must not be set there.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from m1_kernels.triton_math import FAST_MATH, exp, sigmoid, softplus

@triton.jit
def k(x_ptr, y_ptr):
    offs = tl.arange(0, 128)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, exp(x) + sigmoid(x) + softplus(x))

src = ASTSource(fn=k, signature={"x_ptr": "*fp32", "y_ptr": "*fp32"}, constexprs={})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print("FAST_MATH", bool(FAST_MATH))
for op in ("ex2.approx.ftz.f32", "lg2.approx.ftz.f32", "rcp.approx.ftz.f32"):
    print(op, ptx.count(op))
"""


def _compile(tmp_path, extra_env):
    script = tmp_path / "compile_sm90.py"  # @triton.jit needs its source in a file
    script.write_text(COMPILE)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "M1_KERNELS_FAST_MATH")}
    env.update(extra_env, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "kernels"), ROOT]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower():
        pytest.skip(f"this Triton build cannot compile for sm_90 here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.rsplit(" ", 1) for line in proc.stdout.strip().splitlines())


def test_cuda_build_uses_the_ptx_approximations(tmp_path):
    out = _compile(tmp_path, {})
    assert out["FAST_MATH"] == "True"
    for op in ("ex2.approx.ftz.f32", "lg2.approx.ftz.f32", "rcp.approx.ftz.f32"):
        assert int(out[op]) >= 1, out


def test_fast_math_off_by_environment(tmp_path):
    out = _compile(tmp_path, {"M1_KERNELS_FAST_MATH": "0"})
    assert out["FAST_MATH"] == "False"
    assert int(out["lg2.approx.ftz.f32"]) == 0 and int(out["rcp.approx.ftz.f32"]) == 0, out


def test_interpreter_runs_the_exact_ops():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "kernels"), ROOT]))
    code = "from m1_kernels.triton_math import FAST_MATH; print(bool(FAST_MATH))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
