"""Running Triton kernels on CPU under ``TRITON_INTERPRET=1`` (import this first in a test module).

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a function, and that includes Triton's own
``@jit`` helpers in ``triton.language.standard`` (``tl.zeros``, ``tl.sigmoid``, ...), decorated when
``triton`` is first imported. So the variable must be set before the first ``import triton`` of the
process, not merely before our kernel modules: importing this module does that when there is no CUDA
device. If something imported triton earlier in the same pytest process, the Triton tests skip
in-process and :func:`rerun_triton_tests_in_subprocess` reruns them in a fresh interpreter-mode
process. On a CUDA machine nothing is set: the kernels compile and the same tests run on the GPU.
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

TRITON_DEVICES = ["cuda"] if CUDA else ["cpu"]


def triton_runs_here() -> str | None:
    """None when Triton kernels can run in this process, else the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if CUDA:
        return None
    import triton.language.standard as tls

    if type(tls.zeros).__name__ != "InterpretedFunction":
        return "triton was imported before TRITON_INTERPRET=1 was set: rerun in a subprocess"
    return None


def triton_module(name: str):
    """Import a Triton kernel module, or skip the test with the reason it cannot run here."""
    reason = triton_runs_here()
    if reason:
        pytest.skip(reason)
    return importlib.import_module(name)


def rerun_triton_tests_in_subprocess(test_file: str) -> None:
    """CPU only: rerun ``test_file``'s Triton tests in a fresh interpreter-mode pytest process when
    they could not run in this one (skip when they already ran here)."""
    if CUDA or importlib.util.find_spec("triton") is None or triton_runs_here() is None:
        pytest.skip("Triton tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "triton and not subprocess"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def run_script_under_interpreter(script: str) -> None:
    """Run ``script`` in a fresh Python process with ``TRITON_INTERPRET=1`` and ``M1_KERNELS_IMPL=triton``
    (skip without triton); it must exit 0 and print ``TRITON_INTERPRET OK``."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", M1_KERNELS_IMPL="triton")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRITON_INTERPRET OK" in proc.stdout
