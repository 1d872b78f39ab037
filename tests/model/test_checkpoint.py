"""Save/load round trip, trust_remote_code loading in a fresh process, the convert/import CLIs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import m1_kernels
from m1_cli.main import main as m1_main
from m1_hybrid import M1HybridForCausalLM
from m1_hybrid.checkpoint import save_atomically
from tests.model.conftest import tiny_model


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_model(seed=6, dtype=torch.float32)
    out = save_atomically(model, tmp_path / "ckpt")
    loaded = M1HybridForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "m1_hybrid" and cfg["architectures"] == ["M1HybridForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"].endswith("M1HybridForCausalLM")
    assert cfg["layers_block_type"] == ["mamba", "mamba", "attention", "mamba"]
    assert (out / "modeling_m1.py").exists() and (out / "mamba_layer.py").exists()


def test_save_is_atomic_and_replaces(tmp_path):
    target = tmp_path / "ckpt"
    save_atomically(tiny_model(seed=1, dtype=torch.float32), target)
    save_atomically(tiny_model(seed=2, dtype=torch.float32), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old folders left behind


def test_trust_remote_code_load_in_fresh_process(tmp_path):
    model = tiny_model(seed=7, dtype=torch.float32)
    out = save_atomically(model, tmp_path / "ckpt")
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32)
        assert "m1_hybrid" not in sys.modules, "the package was imported"
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            got = model(io["ids"]).logits
        assert torch.equal(got, io["logits"]), (got - io["logits"]).abs().max()
        print("OK", type(model).__module__)
        """
    )
    # The checkpoint's code needs the kernels package, not m1_hybrid: keep only the kernels' folder on the path (on a
    # machine where the packages are on PYTHONPATH rather than installed, the GPU one, that is what makes it import).
    kernels_root = str(Path(m1_kernels.__file__).resolve().parents[1])
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=kernels_root)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK transformers_modules" in res.stdout


def test_convert_cli_writes_checkpoint_with_tokenizer(teacher_dir, tmp_path, capsys):
    out = tmp_path / "hybrid"
    assert (
        m1_main(["convert", "--teacher", str(teacher_dir), "--out", str(out), "--attn-layers", "1", "--dtype", "fp32"])
        == 0
    )
    assert "wrote M1 hybrid checkpoint" in capsys.readouterr().out
    model = M1HybridForCausalLM.from_pretrained(out)
    assert model.config.attn_layers == [1] and model.config.layers_block_type[1] == "attention"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_convert_cli_errors_name_the_fix(teacher_dir, tmp_path, capsys):
    code = m1_main(["convert", "--teacher", str(teacher_dir), "--out", str(tmp_path / "x"), "--attn-layers", "9"])
    assert code == 1
    err = capsys.readouterr().err
    assert "out of range" in err and "--attn-layers" in err
    assert m1_main(["convert", "--teacher", str(tmp_path), "--out", str(tmp_path / "y")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_help_for_every_command(capsys):
    import pytest

    for cmd in (["--help"], ["convert", "--help"], ["import", "--help"], ["demo", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as exc:
            m1_main(cmd)
        assert exc.value.code == 0
        assert "usage: m1" in capsys.readouterr().out
