"""The online teacher of stage 1: loading (frozen, own dtype/device), the vocabulary check, its logits."""

from __future__ import annotations

import torch

from m1_hybrid.varlen_attention import hf_packed_kwargs
from m1_hybrid.varlen_attention import register_hf_attention


def check_vocab(student_tokenizer, teacher_tokenizer, student_vocab: int, teacher_vocab: int, teacher_name: str):
    """Refuse a teacher whose logits or tokenizer differ from the student's.

    The KL compares the two distributions token id by token id, so both models need the same
    number of logits and the same token -> id map (the same tokenizer).

    Raises:
        ValueError: naming both sizes and the fix.
    """
    fix = (
        "fix: distill from the teacher the student was converted from (base_model: <teacher> + m1_attn_layers "
        "builds such a student), or choose a teacher that uses the student's tokenizer; do not add tokens "
        "(special_tokens/tokens) to only one of them"
    )
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"teacher {teacher_name} has {teacher_vocab} output logits but the student has {student_vocab}: "
            f"the KL needs one vocabulary. {fix}"
        )
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(
            f"teacher {teacher_name} tokenizer ({len(t_vocab)} tokens) differs from the student's "
            f"({len(s_vocab)} tokens), e.g. {diff}: the KL needs the same token ids. {fix}"
        )


def load_teacher(
    name: str, dtype: torch.dtype, device, attn_implementation: str = "m1_varlen", trust_remote_code=False
):
    """The teacher model, frozen (``requires_grad_(False)``, ``eval()``), in ``dtype`` on ``device``.

    ``m1_varlen`` (:mod:`m1_hybrid.varlen_attention`): packed rows through varlen flash-attention on
    CUDA (no cross-document tiles computed), everything else exactly as ``sdpa``.

    Under FSDP every rank holds a full replica (the teacher runs forward only, under ``no_grad``).
    """
    from transformers import AutoModelForCausalLM

    if attn_implementation == "m1_varlen":
        register_hf_attention()
    teacher = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
    )
    teacher.config.use_cache = False
    return teacher.to(device).eval().requires_grad_(False)


def load_teacher_tokenizer(name: str, trust_remote_code=False):
    """The teacher's tokenizer (for :func:`check_vocab`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


@torch.no_grad()
def teacher_logits_at(teacher, input_ids, positions, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Teacher logits ``(n, V)`` (its dtype) at the counted ``positions (b, L)`` only.

    Packed rows go in with ``position_ids``, no mask, and their document boundaries as flash-attention
    kwargs (:func:`m1_hybrid.varlen_attention.hf_packed_kwargs`): ``m1_varlen`` and ``flash_attention_2``
    read those, SDPA/eager find the documents from the position restarts; each attends within a document.
    The lm_head is applied to the counted rows only, so no ``(b, L, V)`` teacher tensor exists.
    """
    base = getattr(teacher, teacher.base_model_prefix)
    packed = hf_packed_kwargs(position_ids, attention_mask)  # {} unless packed
    out = base(
        input_ids=input_ids,
        attention_mask=None if packed else attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **packed,
    )
    hidden = out.last_hidden_state[positions.to(out.last_hidden_state.device)]
    return teacher.get_output_embeddings()(hidden)
