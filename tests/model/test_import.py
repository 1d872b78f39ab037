"""`m1 import` of the released M1 layout, checked against an independent float64 implementation of
the documented layer equations (written here from ../shared/docs/m1-reference.md, not our model)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from m1_cli.main import main as m1_main
from m1_hybrid import M1HybridForCausalLM
from m1_hybrid.import_m1 import import_released

D_MODEL, HEADS, KV, HEAD_DIM, N, LAYERS, VOCAB, FF = 64, 4, 2, 16, 16, 3, 50, 96
D_INNER, D_XB, DT_RANK, K = 64, 32, math.ceil(64 / 16), 4
ATTN = [1]


def released_tensors(seed=0):
    """Random tensors under the released key names (tied embeddings: no lm_head)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.2: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    t = {"model.embed_tokens.weight": r(VOCAB, D_MODEL, scale=1.0), "model.norm.weight": 1 + r(D_MODEL)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + r(D_MODEL)
        t[p + "post_attention_layernorm.weight"] = 1 + r(D_MODEL)
        t[p + "mlp.gate_proj.weight"] = r(FF, D_MODEL)
        t[p + "mlp.up_proj.weight"] = r(FF, D_MODEL)
        t[p + "mlp.down_proj.weight"] = r(D_MODEL, FF)
        if i in ATTN:
            t[p + "mha.in_proj.weight"] = r(HEADS * HEAD_DIM + 2 * KV * HEAD_DIM, D_MODEL)
            t[p + "mha.out_proj.weight"] = r(D_MODEL, HEADS * HEAD_DIM)
        else:
            t[p + "mamba.in_proj.weight"] = r(2 * D_INNER + 2 * D_XB + DT_RANK, D_MODEL)
            t[p + "mamba.dt_proj.weight"] = r(D_INNER, DT_RANK)
            t[p + "mamba.dt_proj.bias"] = r(D_INNER, scale=1.0) - 3
            t[p + "mamba.conv1d.weight"] = r(D_INNER, 1, K, scale=0.5)
            t[p + "mamba.conv1d.bias"] = r(D_INNER)
            t[p + "mamba.A_log"] = torch.log(torch.arange(1, N + 1, dtype=torch.float64)).repeat(D_INNER, 1) + r(
                D_INNER, N
            )
            t[p + "mamba.D"] = 1 + r(D_INNER)
            t[p + "mamba.out_proj.weight"] = r(D_MODEL, D_INNER)
    return t


def write_released(folder, tensors, attn_layers=ATTN):
    """The released layout: Llama config.json + mamba_config.json + safetensors (bf16 would also do)."""
    folder.mkdir(parents=True, exist_ok=True)
    llama = {
        "_name_or_path": "meta-llama/Llama-3.2-3B-Instruct",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": D_MODEL,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HEAD_DIM,
        "intermediate_size": FF,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
    }
    mamba = {
        "d_model": D_MODEL,
        "ssm_cfg": {"expand": 1},
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "d_inner": D_INNER,
        "d_xb": D_XB,
        "intermediate_size": FF,
        "hidden_act": "silu",
        "n_layer": LAYERS,
        "attn_layers": attn_layers,
    }
    (folder / "config.json").write_text(json.dumps(llama, indent=2))
    (folder / "mamba_config.json").write_text(json.dumps(mamba, indent=4))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def rope_plain(x, pos):
    """Rotate halves of one head vector by position ``pos`` (base 500000, no scaling)."""
    out = x.clone()
    for j in range(HEAD_DIM // 2):
        angle = pos * 500000.0 ** (-2 * j / HEAD_DIM)
        c, s = math.cos(angle), math.sin(angle)
        a, b = x[j], x[j + HEAD_DIM // 2]
        out[j], out[j + HEAD_DIM // 2] = a * c - b * s, b * c + a * s
    return out


def reference_logits(t, ids):
    """Float64 forward of the released M1 architecture, straight from the documented equations."""
    rms = lambda x, w: w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)  # noqa: E731
    silu = lambda x: x / (1 + torch.exp(-x))  # noqa: E731
    softplus = lambda x: torch.log1p(torch.exp(x))  # noqa: E731
    L = ids.shape[0]
    h = t["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        u = rms(h, t[p + "input_layernorm.weight"])
        if i in ATTN:
            qkv = u @ t[p + "mha.in_proj.weight"].T
            q, k, v = qkv[:, :64], qkv[:, 64:96], qkv[:, 96:]
            # Plain RoPE (no llama3 scaling), rotate-half layout, base rope_theta.
            rope = rope_plain
            attn = torch.zeros(L, HEADS * HEAD_DIM, dtype=torch.float64)
            for hd in range(HEADS):
                kh = hd // (HEADS // KV)
                qs = [rope(q[tq, hd * 16 : hd * 16 + 16], tq) for tq in range(L)]
                ks = [rope(k[tk, kh * 16 : kh * 16 + 16], tk) for tk in range(L)]
                for tq in range(L):
                    scores = torch.stack([qs[tq] @ ks[tk] / math.sqrt(HEAD_DIM) for tk in range(tq + 1)])
                    w = torch.softmax(scores, 0)
                    attn[tq, hd * 16 : hd * 16 + 16] = sum(
                        w[tk] * v[tk, kh * 16 : kh * 16 + 16] for tk in range(tq + 1)
                    )
            mixed = attn @ t[p + "mha.out_proj.weight"].T
        else:
            proj = u @ t[p + "mamba.in_proj.weight"].T
            z, x = proj[:, :D_INNER], proj[:, D_INNER : D_INNER + D_XB]
            Bm = proj[:, D_INNER + D_XB : D_INNER + 2 * D_XB]
            Cm = proj[:, D_INNER + 2 * D_XB : 2 * D_INNER + 2 * D_XB]
            dt_low = proj[:, 2 * D_INNER + 2 * D_XB :]
            rep = (D_INNER // N) // (D_XB // N)
            # repeat_kv on d_state chunks: expanded chunk g reads original chunk g // rep.
            src = [((d // N) // rep) * N + d % N for d in range(D_INNER)]
            x_rep = x[:, src]
            w, cb = t[p + "mamba.conv1d.weight"][:, 0], t[p + "mamba.conv1d.bias"]
            xc = torch.zeros(L, D_INNER, dtype=torch.float64)
            for tt in range(L):
                acc = cb.clone()
                for j in range(K):
                    if tt - (K - 1) + j >= 0:
                        acc = acc + w[:, j] * x_rep[tt - (K - 1) + j]
                xc[tt] = silu(acc)
            bias = t[p + "mamba.dt_proj.bias"]
            delta = softplus(dt_low @ t[p + "mamba.dt_proj.weight"].T + bias + bias)  # bias applied twice
            A = -torch.exp(t[p + "mamba.A_log"])
            state = torch.zeros(D_INNER, N, dtype=torch.float64)
            y = torch.zeros(L, D_INNER, dtype=torch.float64)
            for tt in range(L):
                for d in range(D_INNER):
                    g = d // N
                    b_vec = Bm[tt, (g // rep) * N : (g // rep) * N + N]
                    c_vec = Cm[tt, g * N : g * N + N]
                    state[d] = torch.exp(delta[tt, d] * A[d]) * state[d] + delta[tt, d] * b_vec * xc[tt, d]
                    y[tt, d] = c_vec @ state[d] + t[p + "mamba.D"][d] * xc[tt, d]
            mixed = (y * silu(z)) @ t[p + "mamba.out_proj.weight"].T
        h = h + mixed
        m = rms(h, t[p + "post_attention_layernorm.weight"])
        h = (
            h
            + (silu(m @ t[p + "mlp.gate_proj.weight"].T) * (m @ t[p + "mlp.up_proj.weight"].T))
            @ t[p + "mlp.down_proj.weight"].T
        )
    return rms(h, t["model.norm.weight"]) @ t["model.embed_tokens.weight"].T


def test_import_matches_independent_float64_reference(tmp_path):
    tensors = released_tensors()
    write_released(tmp_path / "released", tensors)
    assert (
        m1_main(["import", "--src", str(tmp_path / "released"), "--out", str(tmp_path / "ours"), "--dtype", "fp32"])
        == 0
    )
    model, _ = import_released(tmp_path / "released", dtype=torch.float64)
    cfg = model.config
    assert cfg.dt_bias_twice and cfg.attn_layers == ATTN and cfg.repeat_group == 2
    assert (cfg.rope_scaling or {}).get("rope_type", "default") == "default"  # plain RoPE, as released
    ids = torch.tensor([3, 17, 42, 8, 0, 33, 21, 49, 5])
    with torch.no_grad():
        got = model(ids.unsqueeze(0)).logits[0]
    ref = reference_logits(tensors, ids)
    assert (got - ref).abs().max().item() < 1e-5
    saved = M1HybridForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert saved.config.dt_bias_twice and saved.config.layers_block_type == ["mamba", "attention", "mamba"]


def test_import_refuses_missing_and_unexpected_keys(tmp_path):
    tensors = released_tensors()
    del tensors["model.layers.0.mamba.A_log"]
    tensors["model.layers.0.mamba.dt_bias"] = torch.zeros(D_INNER, dtype=torch.float64)
    write_released(tmp_path / "bad", tensors)
    with pytest.raises(ValueError, match=r"missing keys \(1\): model.layers.0.mamba.A_log.*unexpected keys \(1\)"):
        import_released(tmp_path / "bad")


def test_import_refuses_layer_types_that_do_not_match_weights(tmp_path):
    write_released(tmp_path / "bad", released_tensors(), attn_layers=[2])
    with pytest.raises(ValueError, match="attn_layers/n_layer in mamba_config.json"):
        import_released(tmp_path / "bad")


def test_import_without_mamba_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert m1_main(["import", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no mamba_config.json" in capsys.readouterr().err
