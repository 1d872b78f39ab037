"""Fixtures for the Axolotl plugin tests: offline env, the SmolLM2 slice teacher, tiny MATH chat data,
YAMLs derived from the shipped tiny examples, and one in-process Axolotl config + tokenized dataset."""

import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import OFFLINE_ENV  # applied to os.environ there

pytest.importorskip("axolotl", reason="axolotl is not installed (pip install -e .[axolotl])")

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "axolotl"
SEQ_LEN = 128


def chat_datasets(path) -> list[dict]:
    """Axolotl ``datasets:`` for the tiny MATH chats at ``path`` (assistant turns trained, eos included)."""
    return [
        dict(
            path=str(path),
            ds_type="json",
            type="chat_template",
            field_messages="messages",
            roles_to_train=["assistant"],
            train_on_eos="turn",
        )
    ]


def tiny_yaml(path: Path, example: str, **overrides) -> Path:
    """The shipped ``examples/axolotl/<example>`` with paths/steps overridden, written to ``path``."""
    cfg = yaml.safe_load((EXAMPLES / example).read_text())
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def axolotl_env() -> dict:
    """Environment for ``axolotl train`` subprocesses: offline, the venv's bin first on PATH."""
    env = dict(os.environ, **OFFLINE_ENV)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.fixture(scope="session")
def teacher_dir():
    """The real 4-layer SmolLM2-135M-Instruct slice (ChatML template)."""
    from m1_hybrid.teacher import smollm2_slice_path

    return smollm2_slice_path(4)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, teacher_dir):
    """60 short MATH chats (<= 128 tokens after the chat template)."""
    from transformers import AutoTokenizer

    from axolotl_m1.data import write_math_chat_jsonl

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    out = tmp_path_factory.mktemp("data") / "math_train.jsonl"
    return write_math_chat_jsonl(out, max_rows=60, max_chars=400, tokenizer=tok, max_tokens=SEQ_LEN)


@pytest.fixture(scope="session")
def axolotl_setup(tmp_path_factory, teacher_dir, tiny_data):
    """Axolotl's own config loading (plugin registered, student converted) and tokenized dataset."""
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets

    root = tmp_path_factory.mktemp("axolotl_setup")
    path = tiny_yaml(
        root / "cfg.yml",
        "tiny_cpu_distill.yml",
        base_model=str(teacher_dir),
        m1_teacher_model=str(teacher_dir),
        m1_student_init_dir=str(root / "student_init"),
        datasets=chat_datasets(tiny_data),
        dataset_prepared_path=str(root / "prepared"),
        output_dir=str(root / "out"),
    )
    cfg = load_cfg(str(path))
    meta = load_datasets(cfg=cfg)
    return cfg, meta.train_dataset
