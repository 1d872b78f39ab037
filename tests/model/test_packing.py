"""Packed sequences never leak state: packed == one by one (logits and every parameter gradient)."""

import pytest
import torch

from tests.model.conftest import tiny_model
from tests.testing import rel_err


def _packed_inputs(docs):
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d), device=d.device) for d in docs]).unsqueeze(0)
    return ids, pos


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lengths", [[5, 1, 9, 3], [1, 1, 13], [17]], ids=["mixed", "ones", "single"])
@pytest.mark.parametrize("boundary", ["position_ids", "segment_mask"])
def test_packed_equals_one_by_one(lengths, boundary):
    _check_packed_equals_one_by_one(tiny_model(seed=1), lengths, boundary)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU variant skipped")
@pytest.mark.parametrize("scan", ["cuda", "triton"])
def test_packed_equals_one_by_one_on_gpu(monkeypatch, scan):
    """The model on the GPU kernels (tiny config: 16 channels per C group, d_state 16, which the CUDA scan takes;
    M1_KERNELS_SCAN=cuda makes any fallback an error), documents across several of its 256-token chunks."""
    if scan == "cuda":
        from m1_kernels.selective_scan.cuda_scan import find_nvcc

        if find_nvcc() is None:
            pytest.skip("no nvcc: the CUDA scan is built on first use")
    monkeypatch.setenv("M1_KERNELS_SCAN", scan)
    # fp32: the tiny test models are float64, which the GPU kernels leave to the reference
    _check_packed_equals_one_by_one(tiny_model(seed=1).float().cuda(), [300, 1, 270], "position_ids")


def _check_packed_equals_one_by_one(model, lengths, boundary):
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(sum(lengths))
    docs = [torch.randint(0, 97, (n,), generator=g).to(device) for n in lengths]
    ids, pos = _packed_inputs(docs)
    if boundary == "position_ids":
        kwargs = dict(position_ids=pos)
    else:  # Axolotl's V2 collator: segment ids 1, 2, 3 ... in the attention mask, positions restarting
        seg = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)]).unsqueeze(0).to(device)
        kwargs = dict(position_ids=pos, attention_mask=seg)
    # Packed: one forward/backward of the sum of all logits (a loss touching every position).
    model.zero_grad()
    packed = model(ids, **kwargs).logits
    (packed * torch.linspace(-1, 1, packed.shape[-1], dtype=packed.dtype, device=device)).sum().backward()
    packed_grads = _grads(model)
    model.zero_grad()
    singles = []
    for d in docs:
        out = model(d.unsqueeze(0)).logits
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=device)).sum().backward()
        singles.append(out.detach())
    single_grads = _grads(model)
    assert rel_err(torch.cat(singles, dim=1), packed.detach()) < 1e-4
    assert set(packed_grads) == set(single_grads)
    for name in packed_grads:
        assert rel_err(single_grads[name], packed_grads[name]) < 1e-4, name


def test_packed_rows_in_a_batch_and_loss_skips_document_starts():
    model = tiny_model(seed=2)
    rows = [[4, 1, 6], [2, 9]]  # two packed rows of 11 tokens, documents of these lengths
    g = torch.Generator().manual_seed(0)
    docs = [[torch.randint(0, 97, (n,), generator=g) for n in r] for r in rows]
    ids = torch.stack([torch.cat(r) for r in docs])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in r]) for r in docs])
    out = model(ids, position_ids=pos, labels=ids)
    ref_logits = torch.cat([model(d.unsqueeze(0)).logits for r in docs for d in r], dim=1)
    assert rel_err(ref_logits.reshape(2, 11, -1), out.logits) < 1e-6
    # Next-token loss over document interiors only: the 6 cross-document targets are skipped.
    logp = torch.log_softmax(ref_logits.squeeze(0).double(), -1)
    targets, count, total = torch.cat([d for r in docs for d in r]), 0, 0.0
    start = 0
    for r in docs:
        for d in r:
            for t in range(len(d) - 1):
                total -= logp[start + t, targets[start + t + 1]].item()
                count += 1
            start += len(d)
    assert abs(out.loss.item() - total / count) < 1e-8


def test_padded_batch_matches_single_rows():
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (7, 3, 10)]
    L = 10
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as generate uses
        ids[i, L - len(s) :] = s
        mask[i, L - len(s) :] = 1
    batch = model(ids, attention_mask=mask).logits
    for i, s in enumerate(seqs):
        single = model(s.unsqueeze(0)).logits[0]
        assert rel_err(single, batch[i, L - len(s) :]) < 1e-10
