"""``verl_m1.cpu.init_single_process_group``: two runs on one machine at once do not collide on a port."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import time, torch.distributed as dist
from verl_m1.cpu import init_single_process_group
init_single_process_group()
assert dist.get_world_size() == 1
time.sleep(4)  # hold the rendezvous port while the other process starts
dist.destroy_process_group()
"""


def test_concurrent_single_process_groups_pick_free_ports():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
