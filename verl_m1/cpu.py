"""Run VeRL's FSDP training engine on CPU (tests, the ``m1 demo`` GRPO steps).

VeRL 0.9.1 has no CPU platform: with no accelerator, platform detection falls back to NVIDIA and the
engine calls ``torch.cuda.set_device``; and its FSDP engine classes are registered for
``device=["cuda", "npu"]`` only. :func:`use_cpu_platform` installs a minimal CPU platform
(``gloo`` collectives, ``torch.cpu`` device module, device id ``"cpu"``) and registers the FSDP
engines for ``"cpu"`` too. Nothing else of VeRL is changed: the engine's model building, FSDP2
wrapping, remove-padding input preparation, loss, optimizer and weight export run as on GPU.

This is for CPU test and demo runs only; never call it in a GPU job.

Example::

    >>> from verl_m1.cpu import use_cpu_platform
    >>> use_cpu_platform().device_name  # doctest: +SKIP
    'cpu'
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Any

import torch


def _platform_class():
    from verl.plugin.platform.platform_base import PlatformBase

    class CPUPlatform(PlatformBase):
        """VeRL platform for CPU-only processes (gloo, no streams, no memory management)."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> ModuleType:
            return torch.cpu

        def is_available(self) -> bool:
            return True

        def current_device(self):
            return "cpu"  # used as ``tensor.to(get_device_id())``

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return (None, None)

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    return CPUPlatform


def use_cpu_platform():
    """Make VeRL run its FSDP engines on CPU in this process; returns the platform (idempotent)."""
    from verl.plugin.platform import platform_manager
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithValueHead

    current = platform_manager._current_platform
    if current is None or current.device_name != "cpu":
        current = _platform_class()()
        platform_manager.set_platform(current)
    for model_type, cls in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        for backend in ("fsdp", "fsdp2"):
            EngineRegistry._engines.setdefault(model_type, {}).setdefault(backend, {}).setdefault("cpu", cls)
    return current


def init_single_process_group(port: int | None = None, backend: str = "gloo") -> None:
    """A one-process group (rank 0 of 1), as VeRL's workers expect ``torch.distributed``.

    ``port``: the rendezvous port when ``MASTER_PORT`` is unset (default: a free one, so two runs on one
    machine do not collide); ``backend``: ``gloo`` on CPU; ``nccl`` for CUDA tensors (FSDP2 on GPU)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        if port is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=0, world_size=1)


__all__ = ["init_single_process_group", "use_cpu_platform"]
