"""Fixtures for the vLLM plugin tests: checkpoints (a tiny random M1 hybrid with SmolLM2's tokenizer,
and a SmolLM2 slice converted to a hybrid), CPU/offline environment, HF references.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager (``enforce_eager=True``: vLLM's
CPU torch.compile is too slow for CI on 2 cores), with a 1 GiB CPU KV cache.
"""

import os
import shutil

import pytest
import torch

ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
os.environ.update(ENV)

# Prompts of very different lengths: with max_num_batched_tokens=32 the long ones are prefilled in
# several chunks (initial states from the cache) while short ones already decode (mixed batches).
PROMPTS = [
    "Hi",
    "The capital of France is",
    "Solve for x: 3x + 5 = 20. First subtract five from both sides, then divide by three.",
    "Once upon a time, in a land far away, there lived a very old king who had three daughters. "
    "The eldest was proud, the second was clever, and the youngest was kind to everyone she met, "
    "even to the old beggar who sat at the castle gate every morning.",
    "2+2=",
    "List three prime numbers greater than ten and explain briefly why each one is prime.",
]

ENGINE_KW = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=512,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    enable_chunked_prefill=True,
    seed=0,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def smollm2_dir(num_layers: int):
    from m1_hybrid.teacher import smollm2_slice_path

    return smollm2_slice_path(num_layers)


def build_tiny(out_dir, seed: int = 0):
    """A random 4-layer M1 hybrid (attention at layer 2, head_dim 64, M1's 3x GQA repeat, untied head,
    ``dt_bias_twice``) whose logits are peaked enough for greedy decoding to be a sharp test."""
    from m1_hybrid import M1HybridForCausalLM
    from tests.testing import tiny_m1_config

    src = smollm2_dir(2)
    cfg = tiny_m1_config(  # 4 layers, attention at 2, 2 KV heads, d_state 16, rope_theta 1e4, untied head
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        head_dim=64,
        d_inner=384,
        d_xb=128,
        dt_bias_twice=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    model = M1HybridForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
        for layer in model.model.layers:
            if not layer.is_attention:
                layer.mamba.conv1d.bias.normal_(0, 0.3)
                layer.mamba.D.normal_(1, 0.3)
                layer.mamba.in_proj.weight.mul_(3.0)  # make the recurrent path carry weight
                layer.mamba.out_proj.weight.mul_(5.0)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, os.path.join(out_dir, name))
    return out_dir


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return str(build_tiny(tmp_path_factory.mktemp("m1_tiny")))


@pytest.fixture(scope="session")
def smol_ckpt(tmp_path_factory):
    """SmolLM2's first 3 layers converted to a hybrid with attention at layer 1 (fp32, tied head)."""
    from m1_hybrid.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("m1_smol") / "ckpt"
    convert_checkpoint(smollm2_dir(3), out, attn_layers=[1], dtype="fp32")
    return str(out)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    import m1_hybrid  # noqa: F401  (registers the config/model)

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` greedy continuation of one unpadded prompt."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


@torch.no_grad()
def hf_logprobs(model, prompt_ids: list[int], gen_ids: list[int]) -> torch.Tensor:
    """Teacher-forced log-probabilities at each generated position: ``(len(gen_ids), vocab)``."""
    ids = torch.tensor([prompt_ids + gen_ids])
    logits = model(ids).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(gen_ids)]
    return torch.log_softmax(logits.double(), dim=-1)
