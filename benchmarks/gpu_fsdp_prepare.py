"""Inputs of ``benchmarks/gpu_fsdp.sh``: a tiny random teacher, local chat data and the Axolotl YAML.

``python benchmarks/gpu_fsdp_prepare.py WORK [--steps 40] [--no-fsdp] [--fp32] [--no-activation-checkpointing]``

Writes, under ``WORK`` (no network needed):

- ``teacher/``: a random 4-layer GQA Llama (hidden 192, 3 query heads, 1 KV head, head_dim 64, tied
  embeddings, as SmolLM2) with SmolLM2's tokenizer copied from ``.gpu_tok`` (``tokenizer.json``
  must be gunzipped first). Initialised with std 0.1 and embeddings x2, so that its distributions
  are not flat and its layers matter: the student converted from it (attention at layer 3) starts
  at a reverse KL of ~7.5 nats/token (top-1 agreement ~0). With the default std 0.02 the teacher is
  near uniform (KL ~0.06), and scaling only the embeddings drowns the layers (KL 0).
- ``chat.jsonl``: short arithmetic chats (user question, assistant answer with ``\\boxed{}``).
- ``distill.yml``: ``examples/axolotl/tiny_cpu_distill.yml`` pointed at those files, without
  alignment (refused under FSDP), bf16 unless ``--fp32``, ``--steps`` steps logged every step,
  plus the FSDP2 section of ``examples/axolotl/fsdp_2gpu_distill.yml`` unless ``--no-fsdp``.

Prints the YAML's path.
"""

import argparse
import json
import random
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / ".gpu_tok"
FSDP_KEYS = ("fsdp_version", "fsdp_config")


def build_teacher(out: Path, seed: int = 0) -> Path:
    """The random GQA Llama teacher with SmolLM2's tokenizer (reused when already there)."""
    import torch
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    if not (TOK / "tokenizer.json").exists():
        raise SystemExit(f"{TOK}/tokenizer.json missing: gunzip -kf {TOK}/tokenizer.json.gz")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2.0)  # tied lm_head: sharper teacher distributions
    model.save_pretrained(out)
    for f in TOK.iterdir():
        if not f.name.endswith(".gz"):
            shutil.copy(f, out / f.name)
    return out


def write_chats(path: Path, rows: int = 1200, seed: int = 0) -> Path:
    """Arithmetic question/answer chats in the ``messages`` format of the tiny CPU config."""
    rng = random.Random(seed)
    ops = [
        ("+", lambda a, b: a + b, "add"),
        ("-", lambda a, b: a - b, "subtract"),
        ("*", lambda a, b: a * b, "multiply"),
    ]
    lines = []
    for _ in range(rows):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        sym, fn, verb = rng.choice(ops)
        question = f"What is {a} {sym} {b}?\nLet's think step by step and output the final answer within \\boxed{{}}."
        answer = f"We {verb}: ${a} {sym} {b} = {fn(a, b)}$. So the answer is $\\boxed{{{fn(a, b)}}}$."
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(work: Path, steps: int, fsdp: bool, bf16: bool, activation_checkpointing: bool) -> Path:
    """The distillation YAML (see the module docstring)."""
    cfg = yaml.safe_load((ROOT / "examples/axolotl/tiny_cpu_distill.yml").read_text())
    for key in ("m1_align_steps", "m1_align_lr"):  # alignment runs before sharding: refused under FSDP
        cfg.pop(key, None)
    teacher = str(work / "teacher")
    cfg.update(
        base_model=teacher,
        m1_teacher_model=teacher,
        m1_student_init_dir=str(work / "student_init"),
        m1_teacher_dtype="bfloat16" if bf16 else "float32",
        dataset_prepared_path=str(work / "prepared"),
        output_dir=str(work / "out"),
        sequence_len=256,
        micro_batch_size=2,
        max_steps=steps,
        num_epochs=4,
        warmup_steps=2,
        learning_rate=1.0e-3,
        bf16=bf16,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    cfg["datasets"][0]["path"] = str(work / "chat.jsonl")
    cfg.pop("save_steps", None)
    cfg.pop("save_total_limit", None)
    if fsdp:
        src = yaml.safe_load((ROOT / "examples/axolotl/fsdp_2gpu_distill.yml").read_text())
        for key in FSDP_KEYS:
            cfg[key] = src[key]
        cfg["fsdp_config"] = dict(cfg["fsdp_config"], activation_checkpointing=activation_checkpointing)
        cfg["gradient_checkpointing"] = False
    path = work / "distill.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv=None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", help="folder for the teacher, the data and the YAML")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-fsdp", action="store_true", help="leave the FSDP section out (1-process check)")
    parser.add_argument("--fp32", action="store_true", help="bf16: false (CPU check)")
    parser.add_argument("--no-activation-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    build_teacher(work / "teacher")
    if not (work / "chat.jsonl").exists():
        write_chats(work / "chat.jsonl")
    print(write_config(work, args.steps, not args.no_fsdp, not args.fp32, not args.no_activation_checkpointing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
