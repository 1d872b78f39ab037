"""``accelerate launch ... benchmarks/gpu_fsdp_rank.py CFG``: ``axolotl.cli.train CFG`` with per-rank evidence.

Each process prints one ``[m1-rank]`` line when it starts (rank, world size, device) and one at its
first distillation step: the class of the model the trainer hands to ``compute_loss`` and how many
of the student's parameters are FSDP2 DTensor shards (their local vs full element counts), so the
log shows that every rank ran and that the student really was sharded. Then it runs Axolotl's
training entry point unchanged (``python -m axolotl.cli.train CFG``).
"""

import os
import runpy
import sys


def _describe(model) -> str:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch
        DTensor = ()  # noqa: N806
    params = list(model.parameters())
    sharded = [p for p in params if DTensor and isinstance(p, DTensor)]
    local = sum(p.to_local().numel() for p in sharded)
    full = sum(p.numel() for p in sharded)
    return (
        f"model {type(model).__name__}, {len(params)} parameters, {len(sharded)} DTensor shards "
        f"(local {local:,} of {full:,} elements), dtype {params[0].dtype if params else None}"
    )


def _patch() -> None:
    from axolotl_m1.trainer import M1DistillTrainer

    compute_loss = M1DistillTrainer.compute_loss

    def traced(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if not getattr(self, "_m1_rank_traced", False):
            self._m1_rank_traced = True
            shape = tuple(inputs["input_ids"].shape)
            value = float(loss[0] if isinstance(loss, tuple) else loss)
            rank = os.environ.get("RANK", "0")
            print(f"[m1-rank] rank {rank} first step: {_describe(model)}; batch {shape}, loss {value:.4f}", flush=True)
        return loss

    M1DistillTrainer.compute_loss = traced


def main() -> None:
    """Print the rank line, patch the trainer, run ``axolotl.cli.train``."""
    import torch

    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.cuda.get_device_name(local) if torch.cuda.is_available() else "cpu"
    pid = os.getpid()
    print(f"[m1-rank] rank {rank} of world {world} started (local rank {local}, {device}, pid {pid})", flush=True)
    _patch()
    sys.argv = ["axolotl.cli.train", *sys.argv[1:]]
    runpy.run_module("axolotl.cli.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
