"""Data parallelism for ``distill_gpu.py``: one process per GPU, each training its own shard of the data on a full
replica of the student, gradients averaged before every optimizer step.

Launched by torchrun (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address)::

    torchrun --nproc-per-node 8 benchmarks/distill_gpu.py --teacher T --data-dir D --minutes 4 --out $OUT

Why replicas and not FSDP: the 135M student, its optimizer and the teacher fit one GPU many times over; what one
GPU lacks is tokens per minute (``axolotl_m1/README.md``). Why a hand-written gradient average and not
``DistributedDataParallel``: the alignment stage trains the mixers on local losses, outside the student's
``forward`` that DDP hooks, so both stages share one explicit average (one flat all-reduce per step, ~0.57 GB in
fp32 for SmolLM2-135M). Replicas stay identical only if every rank takes the same steps with the same learning
rate, so wall-clock decisions (the time-based schedule, when to stop) are rank 0's, broadcast over a CPU (gloo)
group that never waits for the GPUs; :meth:`DataParallel.check_replicas` verifies the result.

Without torchrun (``WORLD_SIZE`` unset or 1) every method is the identity and nothing is initialised.

Example (one process)::

    >>> dp, device = start_data_parallel("cpu")
    >>> dp.world, dp.main, dp.agree(1.5), dp.gather((0, 3)), str(device)
    (1, True, 1.5, [(0, 3)], 'cpu')
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel ranks, and the few collectives the training loop needs."""

    rank: int = 0
    world: int = 1
    cpu_group: object = None  # gloo: agreement on Python values without a device sync

    @property
    def main(self) -> bool:
        """Rank 0 writes the outputs (CSVs, plots, summary, training state, saved student)."""
        return self.rank == 0

    def average_gradients(self, params) -> None:
        """Replace every gradient of ``params`` by its mean over the ranks (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (a new tensor; the input is left alone)."""
        if self.world == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (e.g. elapsed seconds: the schedule and the stop must be the same)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers into every replica (so all start from the same weights)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)

    def check_replicas(self, model: torch.nn.Module) -> None:
        """Raise if the replicas of ``model`` differ: each rank's float64 sum of every parameter must be equal
        bit for bit, since every rank applies the same averaged gradients with the same learning rate."""
        if self.world == 1:
            return
        with torch.no_grad():
            fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().item()
        seen = self.gather(fingerprint)
        if len(set(seen)) != 1:
            raise RuntimeError(f"data-parallel replicas diverged (parameter sums per rank: {seen}): every rank "
                               "must take the same steps with the same learning rate")  # fmt: skip

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.cpu_group)

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def start_data_parallel(device: str, backend: str = "auto") -> tuple[DataParallel, torch.device]:
    """Join the torchrun job this process belongs to, if any; returns its :class:`DataParallel` and the device it
    trains on (``cuda:LOCAL_RANK`` for a CUDA ``device``).

    ``backend`` ``auto`` is NCCL for CUDA and gloo for CPU; ``gloo`` also runs CUDA tensors, which lets several
    ranks share one GPU (NCCL refuses that), e.g. to smoke-test this path on a single-GPU machine.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world == 1:
        return DataParallel(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DataParallel(rank, world, cpu_group), device
