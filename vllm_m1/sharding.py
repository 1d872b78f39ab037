"""Tensor-parallel shard arithmetic of the M1 Mamba layer (pure Python, no vLLM import).

The M1 layer cuts its channels into ``d_state``-sized groups: ``G_C = d_inner / N`` groups of C
(one per ``N`` channels of ``x``, ``z``, the conv and the SSM state) and ``G_xb = d_xb / N`` groups
of x and B, each read by ``repeat = G_C / G_xb`` consecutive C groups (channel ``d`` reads C group
``d // N`` and x/B group ``(d // N) // repeat``).

With ``tp`` ranks we shard the channel dimension contiguously: rank ``r`` owns channels
``[r d_inner/tp, (r+1) d_inner/tp)``, i.e. C groups ``[r G_C/tp, (r+1) G_C/tp)``, whose x/B groups
are exactly ``[r G_xb/tp, (r+1) G_xb/tp)`` when ``G_xb % tp == 0`` (then ``G_C/tp = repeat G_xb/tp``
and the local group arithmetic is the global one with ``G_C/tp``, ``G_xb/tp``). So every block of
``in_proj`` is column-parallel with a plain contiguous split ([z, x, B, C] blocks each split by
``tp``), the local conv/scan/update run unchanged on the local shapes, and no communication is
needed before ``out_proj`` (row-parallel, one all-reduce per layer, like an MLP).

``dt_low`` (``dt_rank`` rows of ``in_proj``) is needed in full by every rank (``dt = W_dt dt_low``
with ``W_dt`` column-parallel over ``d_inner``): it is computed replicated (``dt_rank`` x hidden,
tiny) instead of sharding it and all-reducing a ``d_inner``-wide ``dt``.

Example::

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(d_inner=3072, d_xb=1024, d_state=16, dt_rank=192)
    >>> m1_local_sizes(cfg, 2)
    {'d_inner': 1536, 'd_xb': 512, 'c_groups': 96, 'xb_groups': 32, 'repeat': 3, 'dt_rank': 192}
    >>> in_proj_rows(cfg, 2, 1)[:2]
    [(1536, 3072), (3584, 4096)]
"""


def m1_local_sizes(config, tp_size: int) -> dict:
    """Per-rank sizes of one M1 Mamba layer under tensor parallelism ``tp_size``.

    Raises ``ValueError`` with the rule when the config cannot be sharded that way.
    """
    d_inner, d_xb, n = config.d_inner, config.d_xb, config.d_state
    c_groups, xb_groups = d_inner // n, d_xb // n
    if c_groups % tp_size or xb_groups % tp_size:
        raise ValueError(
            f"M1 tensor parallelism needs the C groups (d_inner/d_state = {c_groups}) and the x/B groups "
            f"(d_xb/d_state = {xb_groups}) to be multiples of tensor_parallel_size={tp_size}: each rank must "
            "hold whole C groups and the x/B groups they read; pick a smaller tensor_parallel_size"
        )
    return {
        "d_inner": d_inner // tp_size,
        "d_xb": d_xb // tp_size,
        "c_groups": c_groups // tp_size,
        "xb_groups": xb_groups // tp_size,
        "repeat": c_groups // xb_groups,
        "dt_rank": config.dt_rank,
    }


def in_proj_rows(config, tp_size: int, rank: int) -> list[tuple[int, int]]:
    """Row ranges of the checkpoint's fused ``in_proj.weight`` held by ``rank``, in local order:
    ``[z_r, x_r, B_r, C_r, dt_low (all ranks)]``."""
    sizes = m1_local_sizes(config, tp_size)
    di, dxb = config.d_inner, config.d_xb
    starts = [0, di, di + dxb, di + 2 * dxb]
    local = [sizes["d_inner"], sizes["d_xb"], sizes["d_xb"], sizes["d_inner"]]
    rows = [(s + rank * n, s + (rank + 1) * n) for s, n in zip(starts, local)]
    dt0 = 2 * di + 2 * dxb
    return rows + [(dt0, dt0 + config.dt_rank)]


def channel_rows(config, tp_size: int, rank: int) -> tuple[int, int]:
    """Channel range (of ``d_inner``) owned by ``rank``: conv, A, D, dt_proj rows, out_proj columns."""
    n = m1_local_sizes(config, tp_size)["d_inner"]
    return rank * n, (rank + 1) * n
