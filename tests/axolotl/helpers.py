"""Helpers shared by the Axolotl plugin tests: a real M1DistillTrainer on a fixed batch, a naive KL."""

import torch
import torch.nn.functional as F


def make_trainer(cfg, tmp_path, student=None):
    """An ``M1DistillTrainer`` built like Axolotl builds it (tokenizer from ``load_tokenizer``)."""
    from axolotl.core.training_args import AxolotlTrainingArguments
    from axolotl.loaders.tokenizer import load_tokenizer

    from axolotl_m1.trainer import M1DistillTrainer
    from m1_hybrid import M1HybridForCausalLM

    tokenizer = load_tokenizer(cfg)
    if student is None:
        student = M1HybridForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    args = AxolotlTrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=1, report_to=[], use_cpu=True
    )
    trainer = M1DistillTrainer(model=student.train(), args=args, processing_class=tokenizer)
    return trainer, tokenizer


def collate(tokenizer, rows, packed: bool, drop_mask: bool = True, pad_to_multiple_of=None):
    """Axolotl's collators: rows packed into one row (V2, segment-id mask) or padded one per row."""
    from axolotl.utils.collators import DataCollatorForSeq2Seq
    from axolotl.utils.collators import V2BatchSamplerDataCollatorForSeq2Seq

    feats = [{k: list(r[k]) for k in ("input_ids", "labels", "attention_mask", "position_ids")} for r in rows]
    if drop_mask:  # what Axolotl does for eager/sdpa packing (sample_packing_drop_attention_mask)
        for f in feats:
            f.pop("attention_mask")
    if packed:
        coll = V2BatchSamplerDataCollatorForSeq2Seq(
            tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt"
        )
        return dict(coll([feats]))
    coll = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
    return dict(coll(feats))


def naive_kl(student_logits, teacher_logits, positions, direction="reverse", temperature=1.0):
    """Full-vocab fp32 KL at ``positions`` (a (b, L) bool mask), mean over them."""
    s = F.log_softmax(student_logits[positions].float() / temperature, -1)
    t = F.log_softmax(teacher_logits[positions].float() / temperature, -1)
    if direction == "reverse":
        per = (s.exp() * (s - t)).sum(-1)
    else:
        per = (t.exp() * (t - s)).sum(-1)
    return per.mean()
