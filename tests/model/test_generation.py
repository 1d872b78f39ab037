"""Incremental decoding: cached steps == full forward, generate with and without cache, batches."""

import pytest
import torch

from m1_hybrid.convert import convert_model
from tests.model.conftest import PROMPTS
from tests.model.conftest import tiny_model
from tests.testing import rel_err


def test_cached_decoding_equals_full_forward_at_every_step():
    model = tiny_model(seed=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 14), generator=g)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)  # prefill 5 tokens
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 14):  # then one token at a time
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        # a multi-token continuation against the cache (chunked prefill) too
    cached = torch.cat(steps, dim=1)
    assert cache.get_seq_length() == 14
    for t in range(14):
        assert rel_err(full[:, t], cached[:, t]) < 1e-10, t


def test_chunked_prefill_against_cache():
    _check_chunked_prefill(tiny_model(seed=5), 12, 4, tol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU variant skipped")
def test_chunked_prefill_against_cache_on_gpu(monkeypatch):
    """Prefill in two chunks through the CUDA scan (fp32; M1_KERNELS_SCAN=cuda: no fallback): the second chunk
    starts from the first's final SSM states (its initial_state input), across the scan's 256-token chunks."""
    from m1_kernels.selective_scan.cuda_scan import find_nvcc

    if find_nvcc() is None:
        pytest.skip("no nvcc: the CUDA scan is built on first use")
    monkeypatch.setenv("M1_KERNELS_SCAN", "cuda")
    _check_chunked_prefill(tiny_model(seed=5).float().cuda(), 700, 300, tol=1e-4)


def _check_chunked_prefill(model, length, split, tol):
    device = next(model.parameters()).device
    ids = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :split], use_cache=True)
        rest = model(ids[:, split:], past_key_values=first.past_key_values, use_cache=True)
    assert rel_err(full[:, split:], rest.logits) < tol


def test_greedy_generate_same_with_and_without_cache_batched_left_padding(teacher, tokenizer):
    model = convert_model(teacher, attn_layers=[1])
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        cached = model.generate(**enc, max_new_tokens=8, do_sample=False)
        uncached = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        # Each row alone (no padding) gives the same continuation as in the left-padded batch.
        for i, prompt in enumerate(PROMPTS):
            one = tokenizer([prompt], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=8, do_sample=False)
            assert torch.equal(alone[0, one["input_ids"].shape[1] :], cached[i, enc["input_ids"].shape[1] :]), i


def test_sampling_generate_is_seeded_and_valid(teacher, tokenizer):
    model = convert_model(teacher, attn_layers=[1])
    enc = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(model.generate(**enc, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.95))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, enc["input_ids"].shape[1] + 6)
    assert int(runs[0].max()) < model.config.vocab_size
