"""The M1 Mamba mixer: parameter names and maths of the released M1-3B layer.

Per token (``d_state = N``, groups of N channels)::

    [z, x, B, C, dt_low] = in_proj(u)                 # d_inner, d_xb, d_xb, d_inner, dt_rank
    x <- repeat each N-channel group of x  (d_inner / d_xb) times      # GQA repeat, before the conv
    x <- silu(conv1d(x))                              # causal, depthwise, width d_conv
    delta = softplus(dt_proj.weight @ dt_low + k * dt_proj.bias)      # k = 2 with the M1-3B quirk
    h_t = exp(delta A) h_{t-1} + delta B x ;  y = C h_t + D x          # B read through the same repeat
    out = out_proj(y * silu(z))

The ops (conv, scan, their one-token updates) come from ``m1_kernels``: Triton on CUDA, PyTorch
references elsewhere.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import m1_kernels

from .configuration_m1 import M1HybridConfig


def repeat_groups(x: torch.Tensor, group: int, times: int) -> torch.Tensor:
    """Repeat each ``group``-sized channel chunk of ``x (..., G * group)`` ``times`` times, in place
    order ``g, g, g, g+1, ...`` (HF ``repeat_kv`` on d_state-sized chunks)."""
    if times == 1:
        return x
    *lead, channels = x.shape
    chunks = x.reshape(*lead, channels // group, 1, group)
    return chunks.expand(*lead, channels // group, times, group).reshape(*lead, channels * times)


def init_dt_bias(d_inner: int, dt_min: float, dt_max: float, floor: float, generator=None) -> torch.Tensor:
    """Mamba's dt init: dt log-uniform in [dt_min, dt_max] (floored), bias = softplus^-1(dt)."""
    u = torch.rand(d_inner, generator=generator, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class M1MambaMixer(nn.Module):
    """Mamba layer of M1 (see module docstring); keys ``in_proj, dt_proj, conv1d, A_log, D, out_proj``."""

    def __init__(self, config: M1HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner, self.d_xb, self.d_state = config.d_inner, config.d_xb, config.d_state
        self.dt_rank, self.d_conv = config.dt_rank, config.d_conv
        self.repeat = config.repeat_group
        self.dt_bias_scale = 2.0 if config.dt_bias_twice else 1.0
        proj_out = 2 * self.d_inner + 2 * self.d_xb + self.dt_rank
        self.in_proj = nn.Linear(config.hidden_size, proj_out, bias=config.mamba_in_proj_bias)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1, bias=config.conv_bias
        )
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)

    def _project(self, hidden: torch.Tensor):
        zxbcdt = self.in_proj(hidden)
        z, x, B, C, dt_low = torch.split(
            zxbcdt, [self.d_inner, self.d_xb, self.d_xb, self.d_inner, self.dt_rank], dim=-1
        )
        dt = F.linear(dt_low, self.dt_proj.weight)  # the bias enters the scan (once or twice)
        return z, repeat_groups(x, self.d_state, self.repeat), B, C, dt

    def _scan_args(self):
        A = -torch.exp(self.A_log.float())
        return A, self.D, self.dt_proj.bias * self.dt_bias_scale

    def forward(
        self,
        hidden: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
        state: "MambaLayerState | None" = None,
    ) -> torch.Tensor:
        """``hidden (b, L, d_model)`` -> ``(b, L, d_model)``.

        ``cu_seqlens``: packed documents in one row (``b == 1``); ``pad_mask (b, L)``: False at
        padding (pads carry zero input, so left padding leaves the states at zero); ``state``: the
        layer's cache (initial states in, final states written back).
        """
        b, L, _ = hidden.shape
        z, x, B, C, dt = self._project(hidden)
        A, D, dt_bias = self._scan_args()
        conv_w = self.conv1d.weight.squeeze(1)
        B = B.reshape(b, L, -1, self.d_state)
        C = C.reshape(b, L, -1, self.d_state)
        if state is not None and state.filled and L == 1:
            # Decode: one token against the cached conv window and SSM state, both updated in place.
            xc = m1_kernels.causal_conv1d_update(x[:, 0], state.conv, conv_w, self.conv1d.bias, "silu")
            y = m1_kernels.selective_state_update(
                state.ssm, xc, dt[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], dt_bias, True
            )
            return self.out_proj(y.unsqueeze(1))
        if pad_mask is not None:
            x = x * pad_mask.unsqueeze(-1).to(x.dtype)
        want_state = state is not None
        init_conv = state.conv if want_state and state.filled else None
        init_ssm = state.ssm if want_state and state.filled else None
        conv_out = m1_kernels.causal_conv1d(
            x, conv_w, self.conv1d.bias, "silu", cu_seqlens, init_conv, return_final_state=want_state
        )
        xc, conv_final = conv_out if want_state else (conv_out, None)
        if pad_mask is not None:
            xc = xc * pad_mask.unsqueeze(-1).to(xc.dtype)
        scan_out = m1_kernels.selective_scan(
            xc, dt, A, B, C, D, z, dt_bias, True, cu_seqlens, init_ssm, return_final_state=want_state
        )
        y, ssm_final = scan_out if want_state else (scan_out, None)
        if want_state:
            state.store(conv_final, ssm_final)
        return self.out_proj(y)


class MambaLayerState:
    """Cached conv window ``(b, d_inner, d_conv - 1)`` and SSM state ``(b, d_inner, d_state)`` of one layer."""

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor):
        self.conv, self.ssm = conv, ssm
        self.filled = False

    def store(self, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.conv.copy_(conv)
        self.ssm.copy_(ssm)
        self.filled = True

    def select(self, index: torch.Tensor) -> None:
        self.conv = self.conv.index_select(0, index)
        self.ssm = self.ssm.index_select(0, index)
