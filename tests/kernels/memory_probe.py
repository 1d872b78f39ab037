"""Deterministic allocation accounting for the memory tests (CPU-friendly, no allocator stats needed).

Under a ``TorchDispatchMode``, every aten op's outputs are inspected; an output whose storage is not
one of the op's inputs' storages is a fresh allocation (views and in-place/``out=`` results are
not). We record the element count of each fresh allocation, forward and backward alike, so a test
can assert that nothing of ``T x V`` size is created and that the largest allocation does not grow
with T. It checks shapes, not the allocator's live peak: it would not catch a chunked loop that keeps
every chunk alive, which the code review and the ``del`` in the loops cover.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.fresh: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        in_ptrs = {a.untyped_storage().data_ptr() for a in inputs if a.numel() > 0}
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.numel() > 0 and o.untyped_storage().data_ptr() not in in_ptrs:
                self.fresh.append((str(func), tuple(o.shape)))
        return out

    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for _, s in self.fresh]

    def at_least(self, numel: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f, s) for f, s in self.fresh if torch.Size(s).numel() >= numel]
