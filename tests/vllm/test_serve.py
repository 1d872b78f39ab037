"""``vllm serve CKPT`` (no extra flags beyond CPU sizing) answers OpenAI completions and chat with the
text HF ``generate`` gives; broken checkpoints fail at load with a message naming the problem."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import ENV
from .conftest import hf_greedy
from .conftest import hf_model

pytestmark = pytest.mark.slow

MAX_NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _server_env() -> dict:
    env = {**os.environ, **ENV}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the API server runs its engine core in a child process
    return env


def test_vllm_serve_completion_and_chat(smol_ckpt, tmp_path):
    from transformers import AutoTokenizer

    vllm_bin = Path(sys.executable).with_name("vllm")
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    cmd = [str(vllm_bin), "serve", smol_ckpt, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    cmd += ["--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4", "--distributed-executor-backend", "uni"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_server_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"vllm serve exited: {(tmp_path / 'serve.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not come up in 300 s"
            time.sleep(2)

        tok = AutoTokenizer.from_pretrained(smol_ckpt)
        hf = hf_model(smol_ckpt)
        prompt = "The three primary colours are"
        want = tok.decode(hf_greedy(hf, tok(prompt).input_ids, MAX_NEW), skip_special_tokens=True)
        got = _post(f"{base}/v1/completions", dict(model=smol_ckpt, prompt=prompt, max_tokens=MAX_NEW, temperature=0))
        assert got["choices"][0]["text"] == want

        messages = [{"role": "user", "content": "Name a prime number."}]
        chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        chat_ids = chat_ids["input_ids"] if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys") else chat_ids
        want_chat = tok.decode(hf_greedy(hf, list(chat_ids), MAX_NEW), skip_special_tokens=True)
        got = _post(
            f"{base}/v1/chat/completions", dict(model=smol_ckpt, messages=messages, max_tokens=MAX_NEW, temperature=0)
        )
        assert got["choices"][0]["message"]["content"] == want_chat
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


BAD_INPUT_SCRIPT = textwrap.dedent(
    """
    import sys
    if __name__ == "__main__":
        from vllm import LLM
        for path in sys.argv[1:]:
            try:
                LLM(path, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=2)
                print("LOADED", path)
            except Exception as e:
                print("ERROR", path, "::", " | ".join(str(e).splitlines()))
            sys.stdout.flush()
    """
)


def test_bad_checkpoints_fail_at_load_with_a_clear_message(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file
    from safetensors.torch import save_file

    missing = tmp_path / "missing_key"
    shutil.copytree(tiny_ckpt, missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.0.mamba.A_log"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})

    swapped = tmp_path / "swapped_types"
    shutil.copytree(tiny_ckpt, swapped)
    cfg = json.loads((swapped / "config.json").read_text())
    cfg["attn_layers"] = [1]
    cfg.pop("layers_block_type", None)
    (swapped / "config.json").write_text(json.dumps(cfg))

    script = tmp_path / "bad.py"
    script.write_text(BAD_INPUT_SCRIPT)
    res = subprocess.run(
        [sys.executable, str(script), str(missing), str(swapped)],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=400,
    )
    lines = {ln.split()[1]: ln for ln in res.stdout.splitlines() if ln.startswith(("ERROR", "LOADED"))}
    assert str(missing) in lines and str(swapped) in lines, res.stdout[-2000:] + res.stderr[-3000:]
    assert "missing M1 keys: model.layers.0.mamba.A_log" in lines[str(missing)]
    bad = lines[str(swapped)]
    assert "layer types do not match the weights" in bad
    assert "layer 1 is 'attention'" in bad and "layer 2 is 'mamba'" in bad
