"""Plugin registration, TP shard arithmetic, state dtypes/shapes, checkpoint key checks (no engine)."""

import contextlib
import sys
from importlib.metadata import entry_points
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import m1_kernels
from m1_hybrid import M1HybridConfig
from m1_hybrid.mamba_layer import M1MambaMixer as HFMixer
from tests.testing import assert_close

from . import conftest  # noqa: F401  (environment)


def test_entry_point_in_exact_group():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "m1_hybrid"]
    assert len(eps) == 1 and eps[0].value == "vllm_m1:register"
    assert eps[0].load().__module__ == "vllm_m1"


def test_register_is_idempotent_and_lazy():
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.config.compilation import CompilationConfig

    import vllm_m1

    for _ in range(3):
        vllm_m1.register()
    assert "M1HybridForCausalLM" in ModelRegistry.get_supported_archs()
    entry = ModelRegistry.models["M1HybridForCausalLM"]
    assert type(entry).__name__ == "_LazyRegisteredModel"  # "module:Class": imported on use only
    assert CompilationConfig._attention_ops.count(vllm_m1.SPLITTING_OP) == 1
    assert type(AutoConfig.for_model("m1_hybrid")).__name__ == "M1HybridConfig"
    assert entry.load_model_cls().is_hybrid


def _tiny_cfg(**kw):
    base = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        attn_layers=[1],
        d_inner=96,
        d_xb=32,
        d_state=8,
        dt_bias_twice=True,
    )
    base.update(kw)
    return M1HybridConfig(**base)


@contextlib.contextmanager
def fake_tp(size: int, rank: int):
    """Pretend to be rank ``rank`` of ``size`` (patches every module's bound TP rank/size getters)."""
    import vllm.distributed.parallel_state as ps

    repl = {ps.get_tensor_model_parallel_world_size: lambda: size, ps.get_tensor_model_parallel_rank: lambda: rank}
    with contextlib.ExitStack() as stack:
        for mod in list(sys.modules.values()):
            try:
                names = object.__getattribute__(mod, "__dict__")
            except Exception:
                continue
            for key, value in list(names.items()):
                for orig, new in repl.items():
                    if value is orig:
                        stack.enter_context(mock.patch.object(mod, key, new))
        yield


def _vllm_mixer(cfg, tp: int, rank: int, hf: HFMixer):
    from vllm.config import VllmConfig
    from vllm.config import set_current_vllm_config

    from vllm_m1.mixer import M1MambaMixer

    with set_current_vllm_config(VllmConfig()), fake_tp(tp, rank):
        layer = M1MambaMixer(cfg, prefix=f"tp{tp}.rank{rank}")
        for name, tensor in hf.state_dict().items():
            layer.load_checkpoint_weight(name, tensor)
    return layer


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_reproduce_the_layer(tp):
    """Sum over ranks of out_proj(local scan) == the HF layer: in_proj blocks, replicated dt_low,
    column dt_proj, sharded conv/A/D and row-parallel out_proj fit together."""
    from vllm_m1.sharding import channel_rows
    from vllm_m1.sharding import in_proj_rows

    cfg = _tiny_cfg()
    torch.manual_seed(0)
    hf = HFMixer(cfg, 0).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        hf.A_log.copy_(torch.log(torch.rand_like(hf.A_log) * 4 + 0.5))
    u = torch.randn(1, 11, cfg.hidden_size)
    ref = hf(u)
    total = torch.zeros_like(ref[0])
    for rank in range(tp):
        layer = _vllm_mixer(cfg, tp, rank, hf)
        rows = torch.cat([hf.in_proj.weight[a:b] for a, b in in_proj_rows(cfg, tp, rank)])
        got_rows = torch.cat([layer.in_proj.weight, layer.in_proj_dt.weight])
        assert torch.equal(got_rows, rows)
        lo, hi = channel_rows(cfg, tp, rank)
        assert torch.equal(layer.D, hf.D[lo:hi]) and torch.equal(layer.out_proj.weight, hf.out_proj.weight[:, lo:hi])
        out_w = layer.out_proj.weight.detach().clone()
        for module in layer.modules():  # what vLLM's loader does after loading (CPU GEMM dispatch)
            if getattr(module, "quant_method", None) is not None:
                module.quant_method.process_weights_after_loading(module)
        z, x, B, C, dt = layer.project(u[0])
        A, D, dt_bias = layer.scan_params()
        xc = m1_kernels.causal_conv1d(x[None], layer.conv_weight, layer.conv_bias, "silu")
        y = m1_kernels.selective_scan(xc, dt[None], A, B[None], C[None], D, z[None], dt_bias, True)
        total += F.linear(y[0], out_w)
    assert_close(f"tp={tp}", ref[0], total, atol=1e-4, rtol=1e-4)


def test_tp_rejects_split_groups():
    from vllm_m1.sharding import m1_local_sizes

    with pytest.raises(ValueError, match="x/B groups"):
        m1_local_sizes(_tiny_cfg(), 8)  # 4 x/B groups cannot be split over 8 ranks


def test_state_dtypes_and_shapes():
    from types import SimpleNamespace

    from vllm_m1.mixer import m1_state_dtypes
    from vllm_m1.mixer import m1_state_shapes

    cfg = _tiny_cfg()
    cache = SimpleNamespace(mamba_cache_dtype="auto", mamba_ssm_cache_dtype="auto")
    assert m1_state_dtypes(torch.bfloat16, cache, cfg) == (torch.bfloat16, torch.float32)
    cache.mamba_ssm_cache_dtype = "bfloat16"
    assert m1_state_dtypes(torch.bfloat16, cache, cfg) == (torch.bfloat16, torch.bfloat16)
    cache.mamba_ssm_cache_dtype = "auto"
    assert m1_state_dtypes(torch.bfloat16, cache, _tiny_cfg(ssm_cache_dtype="model"))[1] == torch.bfloat16
    conv, ssm = m1_state_shapes(cfg, 2)
    assert ssm == (48, 8) and sorted(conv) == [3, 48]


def test_rope_parameters_match_m1_rotary():
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from m1_hybrid.rotary import RotaryEmbedding
    from m1_hybrid.rotary import apply_rotary
    from vllm_m1.model import m1_rope_parameters

    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = _tiny_cfg(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=4096)
    from vllm.config import VllmConfig
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        params = m1_rope_parameters(cfg)
        rope = get_rope(32, max_position=4096, is_neox_style=True, rope_parameters=params, dtype=torch.float32)
    pos = torch.tensor([0, 5, 100, 3000])
    q, k = torch.randn(4, 2 * 32), torch.randn(4, 32)
    q2, k2 = rope.forward_native(pos, q.clone(), k.clone())
    cos, sin = RotaryEmbedding(32, 500000.0, scaling)(pos[None], torch.float32)
    ref_q = apply_rotary(q.view(1, 4, 2, 32).transpose(1, 2), cos, sin).transpose(1, 2).reshape(4, 64)
    assert_close("rope q", ref_q, q2, atol=1e-4)


def test_checkpoint_key_check_names_the_problem():
    from vllm_m1.checkpoint import compare_keys
    from vllm_m1.checkpoint import expected_keys

    cfg = _tiny_cfg()
    keys = expected_keys(cfg)
    compare_keys(cfg, keys)
    with pytest.raises(ValueError, match=r"missing M1 keys: model\.layers\.0\.mamba\.A_log"):
        compare_keys(cfg, keys - {"model.layers.0.mamba.A_log"})
    swapped = _tiny_cfg(attn_layers=[0])
    with pytest.raises(ValueError, match="layer types do not match the weights") as err:
        compare_keys(swapped, keys)
    assert "layer 1 is 'mamba'" in str(err.value) and "model.layers.0.mha.in_proj.weight" in str(err.value)
