"""Packed-document attention (m1_hybrid.varlen_attention): every backend against a float64 loop over the
documents, gradients included; the ``m1_varlen`` transformers teacher against the same teacher on SDPA."""

import math
from unittest import mock

import pytest
import torch

import m1_hybrid.varlen_attention as varlen_module
from m1_hybrid.varlen_attention import hf_packed_kwargs
from m1_hybrid.varlen_attention import register_hf_attention
from m1_hybrid.varlen_attention import varlen_attention
from m1_hybrid.varlen_attention import varlen_backend
from tests.testing import HAS_CUDA
from tests.testing import assert_close
from tests.testing import check_rel
from tests.testing import random_cu_seqlens


def naive_attention(q, k, v, lengths):
    """Causal softmax attention per document, float64, one query at a time (GQA: head h reads kv h // g)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    start = 0
    for n in lengths:
        for t in range(start, start + n):
            for h in range(q.shape[1]):
                keys, vals = k[start : t + 1, h // g], v[start : t + 1, h // g]
                w = torch.softmax(keys @ q[t, h] / math.sqrt(q.shape[-1]), dim=0)
                out[t, h] = w @ vals
        start += n
    return out


def packed_inputs(rows_lengths, heads, kv_heads, dim, dtype, device, seed=0):
    """Rows of equal length, each split into documents (the first starts at the row start)."""
    torch.manual_seed(seed)
    lengths = [n for row in rows_lengths for n in row]
    T = sum(lengths)
    mk = lambda h: torch.randn(T, h, dim, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return mk(heads), mk(kv_heads), mk(kv_heads), lengths


# Two rows of 13 tokens (documents of length 1 included), and one odd row: 3 query heads per kv head.
CASES = [([[5, 1, 7], [13]], 6, 2, 16), ([[1, 2, 1, 3]], 3, 1, 8)]


@pytest.mark.parametrize("rows_lengths,heads,kv_heads,dim", CASES)
def test_reference_matches_naive_loop(rows_lengths, heads, kv_heads, dim):
    q, k, v, lengths = packed_inputs(rows_lengths, heads, kv_heads, dim, torch.float64, "cpu")
    cu = random_cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, max(lengths), rows=len(rows_lengths), backend="sdpa_mask")
    assert_close("out", naive_attention(q, k, v, lengths), out, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(naive_attention(q, k, v, lengths), (q, k, v), grad)
    for name, r, g in zip("qkv", ref, got):
        assert_close(f"d{name}", r, g, atol=1e-11)


def test_cpu_uses_the_reference_and_unknown_backend_is_refused():
    q = torch.zeros(4, 2, 8)
    assert varlen_backend(q) == "sdpa_mask"
    with pytest.raises(ValueError, match="flash_attn, torch_flash or sdpa_mask"):
        varlen_attention(q, q, q, torch.tensor([0, 4], dtype=torch.int32), 4, rows=1, backend="flash3")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: GPU variant skipped")
@pytest.mark.parametrize("backend", ["torch_flash", "flash_attn"])
def test_cuda_kernels_match_reference(backend):
    """bf16 kernels against the fp32 reference on the same bf16 inputs: 8 rows x 512, head_dim 64, GQA 3:1."""
    if (
        backend == "flash_attn"
        and varlen_backend(torch.zeros(1, 1, 64, device="cuda", dtype=torch.bfloat16)) != backend
    ):
        pytest.skip("flash-attn is not installed on this CUDA machine: its backend is skipped")
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(8):
        cuts = sorted(torch.randint(1, 512, (6,), generator=gen).tolist())
        rows.append([b - a for a, b in zip([0, *cuts], [*cuts, 512]) if b > a])
    q, k, v, lengths = packed_inputs(rows, 9, 3, 64, torch.bfloat16, "cuda")
    cu = random_cu_seqlens(lengths, "cuda")
    out = varlen_attention(q, k, v, cu, max(lengths), rows=8, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = varlen_attention(*ref_in, cu, max(lengths), rows=8, backend="sdpa_mask")
    check_rel("out", ref, out.float(), 1e-2)
    for name, r, g in zip("qkv", torch.autograd.grad(ref, ref_in, grad.float()), got):
        check_rel(f"d{name}", r, g.float(), 2e-2)


def test_hf_packed_kwargs_only_for_packed_rows():
    assert hf_packed_kwargs(torch.arange(6)[None]) == {}
    assert hf_packed_kwargs(None) == {}
    kw = hf_packed_kwargs(torch.tensor([[0, 1, 2, 0], [0, 0, 1, 2]]))
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 4, 5, 8] and kw["max_length_k"] == 3


def test_teacher_m1_varlen_equals_sdpa(teacher_dir, tokenizer):
    """The real (4-layer SmolLM2) teacher: packed rows with their flash kwargs, and a left-padded batch
    (the SDPA fallback with its mask), give the logits of the teacher on transformers' SDPA."""
    from transformers import AutoModelForCausalLM

    from axolotl_m1.teacher import teacher_logits_at

    load = lambda attn: AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, attn_implementation=attn)  # noqa: E731
    sdpa, varlen = load("sdpa").eval(), load(register_hf_attention()).eval()
    assert varlen.config._attn_implementation == "m1_varlen"
    docs = [tokenizer(t)["input_ids"] for t in ("What is 2 + 3?", "Hi", "Solve x + 1 = 4 for x, please.")]
    ids = torch.tensor([docs[0] + docs[1] + docs[2]])
    pos = torch.tensor([[i for d in docs for i in range(len(d))]])
    counted = torch.ones_like(ids, dtype=torch.bool)
    ref = teacher_logits_at(sdpa, ids, counted, position_ids=pos)
    with mock.patch.object(varlen_module, "varlen_attention", wraps=varlen_attention) as spy:
        got = teacher_logits_at(varlen, ids, counted, position_ids=pos)
    assert spy.call_count == varlen.config.num_hidden_layers  # every layer took the packed path
    assert_close("packed logits", ref, got, atol=2e-4)
    # Packed == one by one: the third document alone.
    alone = teacher_logits_at(sdpa, torch.tensor([docs[2]]), torch.ones(1, len(docs[2]), dtype=torch.bool))
    assert_close("third document", alone, ref[-len(docs[2]) :], atol=2e-4)
    batch = tokenizer(["What is 2 + 3?", "Hi"], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        a = sdpa(**batch).logits[real]
        b = varlen(**batch).logits[real]
    assert_close("padded logits", a, b, atol=2e-4)
