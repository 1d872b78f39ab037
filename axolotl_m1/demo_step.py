"""The distillation step of ``m1 demo``: a few Axolotl steps of stage 1 on CPU, through ``axolotl train``.

Example (what ``m1_hybrid/demo.py`` calls between conversion and serving)::

    from axolotl_m1.demo_step import distill
    distilled_dir, metrics = distill(hybrid_dir, teacher_dir, out / "distilled", steps=4)
    # metrics: {"steps": 4, "loss_first": ..., "loss_last": ..., "kl_last": ..., "top1_agreement_last": ...,
    #           "ce_last": ..., "seconds": ...}
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

# No hub, no telemetry: the environment of every framework process we start (the tests extend it).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
}


def demo_config(hybrid_dir, teacher_dir, data_path, out_dir, steps: int, seq_len: int, lr: float) -> dict:
    """The Axolotl config of the demo step (tiny_cpu_distill.yml with the demo's paths)."""
    return {
        "plugins": ["axolotl_m1.M1Plugin"],
        "base_model": str(hybrid_dir),
        "model_type": "m1_hybrid",
        "tokenizer_type": "AutoTokenizer",
        "m1_distill": True,
        "m1_teacher_model": str(teacher_dir),
        "m1_teacher_dtype": "float32",
        "m1_kl_weight": 1.0,
        "m1_ce_weight": 0.0,
        "chat_template": "tokenizer_default",
        "special_tokens": {"eos_token": "<|im_end|>"},
        "datasets": [
            {
                "path": str(data_path),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
                "train_on_eos": "turn",
            }
        ],
        "dataset_prepared_path": str(Path(out_dir).parent / f".{Path(out_dir).name}-prepared"),
        "dataset_num_proc": 1,
        "val_set_size": 0,
        "output_dir": str(out_dir),
        "sequence_len": seq_len,
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "attn_implementation": "eager",
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "weight_decay": 0.1,
        "learning_rate": lr,
        "lr_scheduler": "cosine",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "dataloader_num_workers": 0,
        "use_wandb": False,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": steps,
        "save_total_limit": 1,
        "seed": 42,
    }


def summarize(log_history: list[dict]) -> dict:
    """First/last loss and the last kl, ce, top-1 agreement of a trainer ``log_history``."""
    rows = [r for r in log_history if "loss" in r]
    if not rows:
        return {"steps": 0}
    last = rows[-1]
    return {
        "steps": int(last.get("step", len(rows))),
        "loss_first": rows[0]["loss"],
        "loss_last": last["loss"],
        "kl_last": last.get("kl"),
        "ce_last": last.get("ce"),
        "top1_agreement_last": last.get("top1_agreement"),
    }


def distill(hybrid_dir, teacher_dir, out_dir, steps: int = 4, seq_len: int = 128, lr: float = 1e-4, rows: int = 64):
    """Distill the converted hybrid at ``hybrid_dir`` from ``teacher_dir`` for ``steps`` Axolotl steps (CPU).

    Runs ``axolotl train`` (the venv's ``bin`` first on PATH, offline) on short MATH chats written
    next to ``out_dir``; the distilled checkpoint (weights + tokenizer + model code) lands in
    ``out_dir``.

    Returns:
        ``(Path(out_dir), metrics)``: metrics as :func:`summarize`, plus ``seconds`` and ``log`` (the
        run's log file).

    Raises:
        RuntimeError: when ``axolotl train`` fails (the log's tail is in the message).
    """
    from transformers import AutoTokenizer

    from .data import write_math_chat_jsonl

    out = Path(out_dir).resolve()
    work = out.parent / f".{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    data = write_math_chat_jsonl(
        work / "math_train.jsonl", max_rows=rows, max_chars=400, tokenizer=tok, max_tokens=seq_len
    )
    cfg_path = work / "distill.yml"
    cfg_path.write_text(yaml.safe_dump(demo_config(hybrid_dir, teacher_dir, data, out, steps, seq_len, lr)))
    env = dict(os.environ, **OFFLINE_ENV)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = work / "axolotl_train.log"
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "axolotl"), "train", str(cfg_path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"axolotl train failed (exit {proc.returncode}); log {log}:\n{tail}")
    state = out / f"checkpoint-{steps}" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"] if state.exists() else []
    metrics = summarize(history)
    metrics.update(seconds=round(time.time() - t0, 1), log=str(log))
    return out, metrics
