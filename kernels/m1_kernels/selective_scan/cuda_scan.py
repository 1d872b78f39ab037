# SPDX-License-Identifier: Apache-2.0
"""CUDA selective scan: the kernels of ``csrc/selective_scan.cu``, built on first use.

The Triton kernels (:mod:`m1_kernels.selective_scan.triton_scan`) walk time token by token, one program per
(sequence, channel block); with the M1-3B shapes they stay latency-bound and missed mamba-ssm's CUDA scan
(README.md, "CUDA kernels"). The chunked kernels here spread each chunk of 256 tokens over a warp's lanes and scan
along time with warp shuffles, like mamba-ssm, while keeping M1's token-major layout, its GQA groups and packed
documents. When a batch has many documents, the forward instead runs one thread per (document, channel) with no
scan at all (:func:`forward_kernel`).

Build: ``nvcc`` (:func:`find_nvcc`) compiles the one source file for the GPU's architecture into a shared library
under ``$M1_KERNELS_CACHE`` (default ``~/.cache/m1_kernels``), keyed by a hash of the source, the flags and the nvcc
version; the library is written under a temporary name and renamed, so concurrent processes (``torchrun`` ranks)
never load a half-written file. It is called through ``ctypes`` with
torch's current stream: no torch C++ headers, so the same build serves any torch version.

Example::

    >>> from m1_kernels.selective_scan.cuda_scan import selective_scan_cuda  # doctest: +SKIP
    >>> y, h = selective_scan_cuda(  # doctest: +SKIP
    ...     x, dt, A, B, C, D, z, dt_bias, cu_seqlens=cu, return_final_state=True)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from m1_kernels.selective_scan.naive import check_cu_seqlens
from m1_kernels.selective_scan.naive import check_groups
from m1_kernels.selective_scan.naive import cu_seqlens_int32
from m1_kernels.selective_scan.naive import documents_longest_first

SOURCE = Path(__file__).with_name("csrc") / "selective_scan.cu"
# Compile-time knobs (benchmarks/bench_selective_scan.py varies them; README.md, "CUDA kernels", has the sweeps):
ITEMS = 8  # tokens per lane; a chunk is 32 of them
BWD_MIN_BLOCKS = 0  # blocks per SM the backward's register allocation must allow (0: ptxas chooses)
BWD_UNROLL = 2  # states per backward loop body (interleaved by the compiler)
BWD_PREFETCH = 0  # 1: the backward loads the next chunk's tiles while computing one (the forward always does)
FWD_UNROLL = 4  # states the forward runs side by side
FWD_WIDTH = 16  # channels per forward block (8: two blocks per SM)
# The one-thread-per-channel forward ("serial", see the .cu file) runs when the batch has at least this many
# (sequence, channel) threads per SM, else the chunked forward does: the serial kernel has no time parallelism, so
# it needs many documents to fill the GPU (README.md, "Serial forward", has the measurements). 0 always takes it; a
# huge value never does (benchmarks, tests).
SERIAL_MIN_THREADS_PER_SM = 256
# 1: at 16 states the backward is the lane-serial kernel (no time parallelism inside a chunk; see the .cu file and
# README.md, "Lane-serial kernels"); 0: the chunked backward, which also covers 32 states.
LANE_SERIAL_BWD = 1
# 1: at 16 states the forward that runs where the serial one has too few threads is the lane-serial kernel (its walk
# alone), 0: the chunked kernel.
LANE_SERIAL_FWD = 1
LS_MIN_BLOCKS = 6  # two-warp blocks per SM the lane-serial backward's registers must allow (7: 128 registers, spills)
# Tokens whose cross-lane sums the lane-serial kernels take together (one reduce-scatter): y (4, 8 or 16), and the
# backward's sums over states and channels (2, 4 or 8). H100, M1-3B, fwd+bwd at 8k / 32k tokens: 4 and 2 1.224 /
# 4.678 ms, 8 and 2 1.208 / 4.652, 4 and 4 1.202 / 4.590, 4 and 8 1.244 / 4.764 (spills), 8 and 4 1.183 / 4.552.
LS_Y_TOKENS = 8
LS_S_TOKENS = 4
# The lane-serial kernels run from this many of their (sequence, 16 channels) blocks per SM: with fewer, their few
# warps cannot hide latency and the chunked kernels (16 warps per block) win. H100: M1-3B at 8k tokens (5.8 blocks
# per SM) fwd+bwd 1.19 vs 1.64 ms; the SmolLM2 hybrid at 16k tokens (2.2 per SM) 0.86 vs 0.81 ms.
LS_MIN_BLOCKS_PER_SM = 4
# State sizes the kernels are instantiated for (a block holds one C group's 16 channels; see the .cu file).
STATE_SIZES = (16, 32)
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-Xcompiler", "-fPIC", "-shared"]


class ScanParams(ctypes.Structure):
    """Mirror of ``ScanParams`` in csrc/selective_scan.cu (same fields, same order)."""

    _fields_ = (
        [
            (name, ctypes.c_void_p)
            for name in (
                "x dt z B C A D dt_bias h0 cu order out final_state ckpt dout dfinal dx ddt dz dC_direct dB_acc dC_acc "
                "dA dD dbias dh0"
            ).split()
        ]
        + [(name, ctypes.c_int64) for name in "x_b x_l dt_b dt_l z_b z_l B_b B_l B_g C_b C_l C_g do_b do_l".split()]
        + [(name, ctypes.c_int) for name in "L d_inner N G_B G_C cpc cpb n_chunks_row has_z softplus save_ckpt".split()]
    )


def find_nvcc() -> str | None:
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc``, then ``PATH``, then the toolkit torch found, then the PyPI wheel
    ``nvidia-cuda-nvcc`` (None if none)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # torch without its C++ extension tooling
        return None
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    try:
        import nvidia  # namespace package of NVIDIA's PyPI wheels
    except ImportError:
        return None
    wheels = [Path(root) / sub / "bin" / "nvcc" for root in nvidia.__path__ for sub in ("cu13", "cu12", "cuda_nvcc")]
    return next((str(p) for p in wheels if p.exists()), None)


def build_library(arch: str, defines: dict | None = None, nvcc: str | None = None) -> Path:
    """Compile csrc/selective_scan.cu for ``arch`` (e.g. ``"90"``) once; return the cached library's path.

    ``defines``: the source's compile-time knobs as ``{"M1_SCAN_ITEMS": 8, ...}`` (default: this module's).

    Raises:
        RuntimeError: no nvcc, or the compiler failed (its output is in the message).
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError(
            "the CUDA selective scan needs nvcc to build once: install the CUDA toolkit (or set CUDA_HOME), "
            "or keep the Triton scan with M1_KERNELS_SCAN=triton"
        )
    defines = _defines() if defines is None else defines
    flags = NVCC_FLAGS + [f"-gencode=arch=compute_{arch},code=sm_{arch}"] + [f"-D{k}={v}" for k, v in defines.items()]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, version]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("M1_KERNELS_CACHE", Path.home() / ".cache" / "m1_kernels"))
    lib = cache / f"selective_scan_sm{arch}_{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    proc = subprocess.run([nvcc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"nvcc failed to build {SOURCE.name}:\n{proc.stderr[-4000:]}")
    os.replace(tmp, lib)  # atomic: another process sees the whole file or none
    return lib


def _defines() -> dict:
    return {"M1_SCAN_ITEMS": ITEMS, "M1_SCAN_BWD_MIN_BLOCKS": BWD_MIN_BLOCKS, "M1_SCAN_BWD_PREFETCH": BWD_PREFETCH,
            "M1_SCAN_BWD_UNROLL": BWD_UNROLL, "M1_SCAN_LS_MIN_BLOCKS": LS_MIN_BLOCKS,
            "M1_SCAN_LS_Y_TOKENS": LS_Y_TOKENS, "M1_SCAN_LS_S_TOKENS": LS_S_TOKENS,
            "M1_SCAN_FWD_UNROLL": FWD_UNROLL, "M1_SCAN_FWD_WIDTH": FWD_WIDTH}  # fmt: skip


class ScanLibrary:
    """The built kernels, called through ctypes: launch, and the layout facts the wrapper needs."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        for name in ("m1_scan_fwd", "m1_scan_fwd_serial", "m1_scan_fwd_ls", "m1_scan_bwd", "m1_scan_bwd_ls"):
            getattr(self.lib, name).argtypes = [ctypes.POINTER(ScanParams), ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        self.lib.m1_scan_smem_bytes.argtypes = [ctypes.c_int] * 3
        self.lib.m1_scan_error_string.restype = ctypes.c_char_p
        if self.lib.m1_scan_params_bytes() != ctypes.sizeof(ScanParams):
            raise RuntimeError(f"{path} and cuda_scan.ScanParams disagree on the parameter block: rebuild (delete it)")
        self.tokens_per_chunk = self.lib.m1_scan_tokens_per_chunk()
        self.channels_per_block = self.lib.m1_scan_channels_per_block()

    def smem_bytes(self, dtype: torch.dtype, N: int, backward: bool) -> int:
        """Dynamic shared memory one block of the forward or backward kernel needs."""
        return self.lib.m1_scan_smem_bytes(_DTYPES[dtype], N, int(backward))

    def launch(self, kernel: str, params: ScanParams, dtype: torch.dtype, n_seqs: int, device: torch.device):
        """Run kernel ``"fwd"`` (chunked), ``"fwd_serial"``, ``"fwd_ls"`` (lane-serial), ``"bwd"`` (chunked) or
        ``"bwd_ls"`` on torch's current stream (asynchronous, like any CUDA op)."""
        fn = getattr(self.lib, f"m1_scan_{kernel}")
        args = (ctypes.byref(params), _DTYPES[dtype], n_seqs, ctypes.c_void_p(_current_stream(device.index)))
        # The library's runtime launches into the thread's current CUDA context: make it the tensors' device (a
        # rank that never called torch.cuda.set_device would otherwise launch on device 0 with another's stream).
        if torch.cuda.current_device() == device.index:
            err = fn(*args)
        else:
            with torch.cuda.device(device):
                err = fn(*args)
        if err:
            msg = self.lib.m1_scan_error_string(err).decode()
            raise RuntimeError(f"CUDA selective scan kernel {kernel!r} failed to launch: {msg}")


def _current_stream(device_index: int) -> int:
    """The raw handle of torch's current stream on the device. torch's private accessor (the one the code
    torch.compile generates calls) skips building a Stream object per launch; the public path is the fallback."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device_index) if raw else torch.cuda.current_stream(device_index).cuda_stream


@functools.cache
def _library(arch: str, defines: tuple) -> ScanLibrary:
    return ScanLibrary(build_library(arch, dict(defines)))


@functools.cache
def _arch(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}{minor}"


def library(device: torch.device) -> ScanLibrary:
    """The built library for ``device``'s architecture and the current knobs (built on the first call)."""
    return _library(_arch(torch.device(device).index or 0), tuple(_defines().items()))


def unsupported_reason(x, dt, A, B, C, z) -> str | None:
    """Why these inputs cannot take the CUDA scan (None when they can): device, dtypes, group layout, state size,
    shared memory, or a failed build. Builds the library on the first call that gets that far."""
    if not x.is_cuda:
        return "inputs are not on a CUDA device"
    if x.dtype not in _DTYPES or any(t is not None and t.dtype != x.dtype for t in (dt, z, B, C)):
        got = [None if t is None else t.dtype for t in (x, dt, z, B, C)]
        return f"x, dt, z, B, C must share one of {list(_DTYPES)} (got {got})"
    d, N = A.shape
    if N not in STATE_SIZES:
        return f"d_state {N} is not one the kernels are built for {STATE_SIZES}"
    return _layout_reason(x.device.index, x.dtype, N, d // C.shape[2], tuple(_defines().items()))


@functools.cache
def _layout_reason(device_index: int, dtype: torch.dtype, N: int, cpc: int, defines: tuple) -> str | None:
    """The part of :func:`unsupported_reason` that needs the library and the device, once per layout: every scan
    call asks (the dispatcher, then the op), and a failed build must not run nvcc again on each of them."""
    try:
        lib = _library(_arch(device_index), defines)
    except RuntimeError as exc:  # no nvcc, or the build failed
        return str(exc)
    if cpc % lib.channels_per_block:
        return f"channels per C group ({cpc}) is not a multiple of {lib.channels_per_block}"
    smem = lib.smem_bytes(dtype, N, backward=True)
    limit = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    if smem > limit:
        return f"d_state {N} in {dtype} needs {smem} bytes of shared memory per block, the GPU allows {limit}"
    return None


def forward_kernel(n_seqs: int, d_inner: int, device, N: int) -> str:
    """``"fwd_serial"`` when the batch has enough (sequence, channel) pairs to fill the GPU with one thread each
    (``SERIAL_MIN_THREADS_PER_SM`` per SM), else ``"fwd_ls"`` (lane-serial: ``LANE_SERIAL_FWD``, 16 states, enough
    blocks, see :func:`lane_serial_fits`) or ``"fwd"`` (chunked).

    The count is of sequences, not of tokens per sequence: document lengths live on the device (no host sync).

    Example (M1-3B's 3072 channels, 16 documents, on an H100)::

        >>> forward_kernel(16, 3072, "cuda", 16)  # doctest: +SKIP
        'fwd_serial'
    """
    sms = _sm_count(torch.device(device).index or 0)
    if n_seqs * d_inner >= SERIAL_MIN_THREADS_PER_SM * sms:
        return "fwd_serial"
    return "fwd_ls" if LANE_SERIAL_FWD and lane_serial_fits(n_seqs, d_inner, device, N) else "fwd"


def lane_serial_fits(n_seqs: int, d_inner: int, device, N: int) -> bool:
    """Whether the lane-serial kernels take this batch: 16 states and at least ``LS_MIN_BLOCKS_PER_SM`` of their
    blocks (one per sequence and 16 channels) per SM. Counts sequences, not tokens (no host sync).

    Example (M1-3B's 3072 channels, 8k tokens in 4 documents, on an H100)::

        >>> lane_serial_fits(4, 3072, "cuda", 16)  # doctest: +SKIP
        True
    """
    sms = _sm_count(torch.device(device).index or 0)
    return N == 16 and n_seqs * (d_inner // 16) >= LS_MIN_BLOCKS_PER_SM * sms


def backward_kernel(n_seqs: int, d_inner: int, device, N: int) -> str:
    """``"bwd_ls"`` (lane-serial) when ``LANE_SERIAL_BWD`` is set and :func:`lane_serial_fits`, else ``"bwd"``
    (chunked).

    Example (on an H100: M1-3B at 8k tokens in 4 documents; the SmolLM2 hybrid at 16k in 8)::

        >>> backward_kernel(4, 3072, "cuda", 16), backward_kernel(8, 576, "cuda", 16)  # doctest: +SKIP
        ('bwd_ls', 'bwd')
    """
    return "bwd_ls" if LANE_SERIAL_BWD and lane_serial_fits(n_seqs, d_inner, device, N) else "bwd"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _aligned(t):
    """The kernels read token rows in 16-byte vectors: unit stride along the last dimension, 16-byte aligned
    start, and every other stride a multiple of 16 bytes. Tensors that are not (odd slices) are copied."""
    if t is None:
        return None
    per = 16 // t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % per == 0 for s in t.stride()[:-1])
    return t if ok else t.contiguous()


def _f32(t):
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _ptr(t) -> int | None:
    return None if t is None else t.data_ptr()


class CudaScanFunction(torch.autograd.Function):
    """Autograd wrapper of the CUDA forward (saving the state every 256 tokens) and backward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, return_final_state):
        x, dt, z, B, C = (_aligned(t) for t in (x, dt, z, B, C))
        b, L, d = x.shape
        N = A.shape[1]
        lib = library(x.device)
        tok = lib.tokens_per_chunk
        cu = None if cu_seqlens is None else cu_seqlens_int32(cu_seqlens, x.device)
        n_seqs = b if cu is None else cu.numel() - 1
        order = None if cu is None else documents_longest_first(cu)
        n_chunks_row = 0 if cu is not None else -(-L // tok)
        n_slots = L // tok + n_seqs + 1 if cu is not None else b * n_chunks_row
        save = any(ctx.needs_input_grad)
        A32, D32, bias32, h0 = _f32(A), _f32(D), _f32(dt_bias), _f32(initial_state)
        out = torch.empty((b, L, d), device=x.device, dtype=x.dtype)
        final = torch.empty((n_seqs, d, N), device=x.device, dtype=torch.float32)
        ckpt = torch.empty((max(n_slots, 1) if save else 1, d, N), device=x.device, dtype=torch.float32)
        p = ScanParams(
            x=_ptr(x), dt=_ptr(dt), z=_ptr(z), B=_ptr(B), C=_ptr(C), A=_ptr(A32), D=_ptr(D32), dt_bias=_ptr(bias32),
            h0=_ptr(h0), cu=_ptr(cu), order=_ptr(order), out=_ptr(out), final_state=_ptr(final), ckpt=_ptr(ckpt),
            x_b=x.stride(0), x_l=x.stride(1), dt_b=dt.stride(0), dt_l=dt.stride(1),
            z_b=z.stride(0) if z is not None else 0, z_l=z.stride(1) if z is not None else 0,
            B_b=B.stride(0), B_l=B.stride(1), B_g=B.stride(2), C_b=C.stride(0), C_l=C.stride(1), C_g=C.stride(2),
            L=L, d_inner=d, N=N, G_B=B.shape[2], G_C=C.shape[2], cpc=d // C.shape[2], cpb=C.shape[2] // B.shape[2],
            n_chunks_row=n_chunks_row, has_z=z is not None, softplus=bool(dt_softplus), save_ckpt=save,
        )  # fmt: skip
        lib.launch(forward_kernel(n_seqs, d, x.device, N), p, x.dtype, n_seqs, x.device)
        ctx.save_for_backward(x, dt, A32, B, C, D32, z, bias32, cu, order, ckpt)
        ctx.params, ctx.n_seqs = p, n_seqs
        ctx.dtypes = (A.dtype, None if D is None else D.dtype, None if dt_bias is None else dt_bias.dtype)
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.return_final_state = return_final_state
        return (out, final) if return_final_state else out

    @staticmethod
    def backward(ctx, dout, *rest):
        x, dt, A32, B, C, D32, z, bias32, cu, order, ckpt = ctx.saved_tensors
        dfinal = _f32(rest[0]) if ctx.return_final_state and rest and rest[0] is not None else None
        dout = _aligned(dout.to(x.dtype))
        b, L, d = x.shape
        N, G_B, G_C = A32.shape[1], B.shape[2], C.shape[2]
        dev, lib = x.device, library(x.device)
        dx = torch.empty((b, L, d), device=dev, dtype=x.dtype)
        ddt = torch.empty_like(dx)
        dz = torch.empty_like(dx) if z is not None else None
        dB = torch.zeros((b, L, G_B, N), device=dev, dtype=torch.float32)  # the kernels add into these four
        # dA, dD and d dt_bias share one buffer: one fill instead of three (the host's launches show at small sizes).
        small = torch.zeros(d * N + 2 * d, device=dev, dtype=torch.float32)
        dA = small[: d * N].view(d, N)
        dD = small[d * N : d * N + d] if D32 is not None else None
        dbias = small[d * N + d :] if bias32 is not None else None
        direct = d // G_C == lib.channels_per_block  # one block per C group: its channel sum is the whole dC
        dC = torch.empty((b, L, G_C, N), device=dev, dtype=C.dtype if direct else torch.float32)
        if not direct:
            dC.zero_()
        dh0 = torch.empty((ctx.n_seqs, d, N), device=dev, dtype=torch.float32)
        p = ctx.params  # the forward's sizes and strides; the pointers are set again from the saved tensors
        p.x, p.dt, p.z, p.B, p.C, p.A, p.D, p.dt_bias = (_ptr(t) for t in (x, dt, z, B, C, A32, D32, bias32))
        p.cu, p.order, p.ckpt = _ptr(cu), _ptr(order), _ptr(ckpt)
        p.dout, p.dfinal, p.do_b, p.do_l = _ptr(dout), _ptr(dfinal), dout.stride(0), dout.stride(1)
        p.dx, p.ddt, p.dz, p.dB_acc = _ptr(dx), _ptr(ddt), _ptr(dz), _ptr(dB)
        p.dC_direct, p.dC_acc = (_ptr(dC), None) if direct else (None, _ptr(dC))
        p.dA, p.dD, p.dbias, p.dh0 = _ptr(dA), _ptr(dD), _ptr(dbias), _ptr(dh0)
        lib.launch(backward_kernel(ctx.n_seqs, d, dev, N), p, x.dtype, ctx.n_seqs, dev)
        A_dtype, D_dtype, bias_dtype = ctx.dtypes
        return (
            dx,
            ddt,
            dA.to(A_dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD.to(D_dtype) if dD is not None else None,
            dz,
            dbias.to(bias_dtype) if dbias is not None else None,
            dh0.to(ctx.initial_dtype) if ctx.initial_dtype is not None else None,
            None,
            None,
            None,
        )


# Dynamo cannot trace a ctypes launch (nor the raw pointers it passes): under torch.compile the scan is a graph
# break and runs eagerly, with its autograd.Function as usual.
@torch.compiler.disable
def selective_scan_cuda(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = True,
    cu_seqlens=None,
    initial_state=None,
    return_final_state: bool = False,
):
    """CUDA selective scan; arguments, shapes and returns as :func:`m1_kernels.selective_scan`.

    Inputs may be token-major views with any token stride (slices of a fused projection); x, dt, z, B and C
    share one dtype (fp32, fp16 or bf16) and accumulate in fp32. Differentiable in every tensor input.

    Raises:
        ValueError: inputs this kernel does not take (:func:`unsupported_reason` says why).

    Example::

        >>> y = selective_scan_cuda(x, dt, A, B, C, D, z, dt_bias, cu_seqlens=cu)  # doctest: +SKIP
    """
    b, L, d = x.shape
    check_groups(d, C.shape[2], B.shape[2])
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, b, L)
    reason = unsupported_reason(x, dt, A, B, C, z)
    if reason:
        raise ValueError(f"the CUDA selective scan does not take these inputs: {reason}; use the Triton scan")
    n_seqs = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_seqs, d, A.shape[1]):
        raise ValueError(f"initial_state must be {(n_seqs, d, A.shape[1])}, got {tuple(initial_state.shape)}")
    return CudaScanFunction.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens, dt_softplus, return_final_state
    )
