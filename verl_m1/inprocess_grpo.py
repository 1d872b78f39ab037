"""A few real GRPO steps of an M1 hybrid through VeRL's own training engine, driven in one process.

What runs here is VeRL's code, driven in-process instead of through Ray:

- the actor: ``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead`` (FSDP2 over a one-process
  group: ``gloo`` on CPU, ``nccl`` on CUDA) loading the M1 checkpoint through
  ``HFModelConfig(external_lib="verl_m1")``, with remove-padding on and (by default)
  ``use_fused_kernels`` served by :mod:`verl_m1.fused`;
- the batch layout: the trainer's ``left_right_2_no_padding`` (nested ``(1, total_nnz)`` rows whose
  ``position_ids`` restart per sample);
- old log-probs: ``engine.infer_batch``; update: ``engine.train_batch`` with
  ``verl.workers.utils.losses.ppo_loss`` (GRPO: clip, token-mean, entropy bonus, KL off), AdamW step;
- advantages: ``verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage`` over ``n`` rollouts per prompt;
- reward: :func:`verl_m1.reward.compute_score` (the evaluation grader);
- weight sync: ``engine.get_per_tensor_param()`` (the stream VeRL sends to vLLM's ``load_weights``) loaded
  into the rollout by name.

Rollouts (``rollout=``): ``"hf"``, Hugging Face ``generate`` on an M1 model refreshed from the engine
every step (CPU tests, ``m1 demo``); ``"vllm"``, a real in-process vLLM engine through the
``vllm_m1`` plugin (:class:`verl_m1.vllm_rollout.VLLMRollout`: CUDA graphs, sleep mode on GPU).
What is not used: VeRL's Ray trainer (``RayPPOTrainer``) and its server-mode rollout workers. Ray
itself need not be installed (:mod:`verl_m1.ray_absent`).

``device="cpu"`` installs VeRL's missing CPU platform (:mod:`verl_m1.cpu`); ``device="cuda"`` uses
VeRL's own CUDA platform unchanged.

Example::

    >>> from verl_m1.inprocess_grpo import InProcessGRPO       # doctest: +SKIP
    >>> trainer = InProcessGRPO("ckpt", lr=1e-6, entropy_coeff=0.01)  # CPU, HF rollouts  # doctest: +SKIP
    >>> trainer.step(["What is 2+3?"], ["5"], n=4, max_new_tokens=16)  # doctest: +SKIP
    >>> gpu = InProcessGRPO("ckpt", device="cuda", rollout="vllm")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch

from verl_m1 import ray_absent
from verl_m1.cpu import init_single_process_group
from verl_m1.cpu import use_cpu_platform


def _scalar(value):
    """A VeRL metric (``Metric``, list of them, or number) as a float."""
    if isinstance(value, list):
        vals = [_scalar(v) for v in value]
        return float(np.mean(vals)) if vals else float("nan")
    if hasattr(value, "aggregate"):
        return float(value.aggregate())
    return float(value)


def padded_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """VeRL's rollout layout: left-padded ``prompts``, right-padded ``responses``, their concatenation
    ``input_ids`` with ``attention_mask`` / ``position_ids`` (counting real tokens), ``response_mask``."""
    bs = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(max(len(r) for r in responses), 1)
    prompt_ids = torch.full((bs, P), pad_id, dtype=torch.long)
    response_ids = torch.full((bs, R), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(bs, P, dtype=torch.long)
    response_mask = torch.zeros(bs, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids[i, P - len(p) :] = torch.tensor(p)
        prompt_mask[i, P - len(p) :] = 1
        if r:
            response_ids[i, : len(r)] = torch.tensor(r)
            response_mask[i, : len(r)] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return {
        "prompts": prompt_ids,
        "responses": response_ids,
        "input_ids": torch.cat([prompt_ids, response_ids], 1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
    }


def to_engine_batch(batch: dict[str, torch.Tensor], **meta):
    """The trainer's conversion: a TensorDict in the no-padding (nested) layout plus non-tensor settings."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = tu.get_tensordict({k: v.clone() for k, v in batch.items()})
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, **meta)
    return td


class HFRollout:
    """Rollouts from Hugging Face ``generate`` on an M1 model refreshed by name from the engine's stream."""

    def __init__(self, hf_config, device: str, dtype: torch.dtype = torch.float32):
        from m1_hybrid import M1HybridForCausalLM

        self.device, self.dtype = device, dtype
        self.model = M1HybridForCausalLM(hf_config).to(device=device, dtype=dtype).eval()

    def sync_weights(self, weights) -> dict:
        """Load ``(name, tensor)`` pairs (trainer names) into the model; returns seconds/bytes/tensors."""
        t0 = time.perf_counter()
        state = {name: t.detach().to(self.device, self.dtype).clone() for name, t in weights}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and self.model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"weight sync mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes, "tensors": len(state)}

    def generate(self, prompt_ids, *, n: int, max_tokens: int, temperature: float, eos_id: int, pad_id: int) -> dict:
        """``n`` sampled responses per prompt (prompt-major), cut after the first EOS."""
        t0 = time.perf_counter()
        token_ids = []
        for ids in prompt_ids:
            x = torch.tensor([list(ids)] * n, device=self.device)
            with torch.no_grad():
                out = self.model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    max_new_tokens=max_tokens,
                    pad_token_id=pad_id,
                )
            for row in out[:, len(ids) :].tolist():
                if eos_id in row:
                    row = row[: row.index(eos_id) + 1]
                token_ids.append(row)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r) for r in token_ids)
        return {"token_ids": token_ids, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}

    def sleep(self) -> None:
        """Nothing to free (interface shared with :class:`verl_m1.vllm_rollout.VLLMRollout`)."""


class InProcessGRPO:
    """An M1 actor in VeRL's FSDP engine plus the GRPO pieces around it (see the module docstring).

    ``ckpt``: an ``m1_hybrid`` checkpoint folder (with tokenizer). ``device``: ``"cpu"`` or ``"cuda"``.
    ``rollout``: ``"hf"`` or ``"vllm"`` (``vllm_kwargs`` go to :class:`~verl_m1.vllm_rollout.VLLMRollout`,
    e.g. ``enforce_eager``, ``gpu_memory_utilization``, ``max_model_len``). ``fused``: serve
    log-probs/entropy through :mod:`verl_m1.fused` (VeRL's ``use_fused_kernels``) instead of full logits.
    On CUDA the actor keeps fp32 master weights and computes in bf16 (VeRL's default mixed precision).
    """

    def __init__(
        self,
        ckpt: str,
        *,
        lr: float = 1e-6,
        entropy_coeff: float = 0.01,
        clip_ratio: float = 0.2,
        fused: bool = True,
        micro_batch_size: int = 4,
        temperature: float = 1.0,
        seed: int = 0,
        device: str = "cpu",
        rollout: str = "hf",
        vllm_kwargs: dict | None = None,
    ):
        if device not in ("cpu", "cuda") or rollout not in ("hf", "vllm"):
            raise ValueError(f"device must be cpu|cuda and rollout hf|vllm, got {device!r}, {rollout!r}")
        # VeRL imports ray at module top; without Ray installed a placeholder stands in (never used here).
        # Then (re)apply the verl_m1 patches: if verl_m1 was imported first, its import-time
        # apply_patches() found VeRL unimportable and did nothing.
        ray_absent.install()
        import verl_m1

        verl_m1.apply_patches()
        if device == "cpu":
            use_cpu_platform()
            init_single_process_group()
        else:
            torch.cuda.set_device(0)
            init_single_process_group(backend="nccl")
        self.device = device
        from verl.trainer.config import CheckpointConfig
        from verl.workers.config import FSDPActorConfig
        from verl.workers.config import FSDPEngineConfig
        from verl.workers.config import FSDPOptimizerConfig
        from verl.workers.config import HFModelConfig
        from verl.workers.engine import EngineRegistry
        from verl.workers.utils.losses import ppo_loss

        torch.manual_seed(seed)
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.fused = fused
        self.model_config = HFModelConfig(
            path=str(ckpt),
            external_lib="verl_m1",
            use_remove_padding=True,
            use_fused_kernels=fused,
            fused_kernel_options={"impl_backend": "torch"},
            override_config={"attn_implementation": "eager"},
        )
        self.model_config.model_type = "language_model"
        compute_dtype = "fp32" if device == "cpu" else "bf16"
        engine_config = FSDPEngineConfig(
            strategy="fsdp2",
            use_torch_compile=False,
            model_dtype="fp32",
            mixed_precision={"param_dtype": compute_dtype, "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        )
        engine_config.use_remove_padding = True
        engine_config.use_fused_kernels = fused
        optim = FSDPOptimizerConfig(lr=lr, weight_decay=0.01, clip_grad=1.0)
        self.engine = EngineRegistry.new(
            model_type="language_model",
            backend="fsdp2",
            model_config=self.model_config,
            engine_config=engine_config,
            optimizer_config=optim,
            checkpoint_config=CheckpointConfig(),
        )
        self.engine.initialize()
        self.actor_config = FSDPActorConfig(
            strategy="fsdp2",
            rollout_n=1,
            ppo_mini_batch_size=1,
            ppo_micro_batch_size_per_gpu=micro_batch_size,
            use_dynamic_bsz=False,
            clip_ratio=clip_ratio,
            entropy_coeff=entropy_coeff,
            use_kl_loss=False,
            loss_agg_mode="token-mean",
            optim=optim,
        )
        self.loss_fn = partial(ppo_loss, config=self.actor_config)
        self.tokenizer = self.model_config.tokenizer
        if rollout == "vllm":
            from verl_m1.vllm_rollout import VLLMRollout

            self.rollout_backend = VLLMRollout(str(ckpt), seed=seed, **(vllm_kwargs or {}))
        else:
            self.rollout_backend = HFRollout(self.model_config.hf_config, device)
        self.synced = False
        self.last_sync: dict = {}

    @property
    def rollout_model(self):
        """The HF rollout model (``rollout="hf"``), else None."""
        return getattr(self.rollout_backend, "model", None)

    # -- engine calls ------------------------------------------------------------------------------

    def _meta(self, bs: int, *, entropy: bool) -> dict:
        return dict(
            temperature=self.temperature,
            use_remove_padding=True,
            use_fused_kernels=self.fused,
            use_dynamic_bsz=False,
            micro_batch_size_per_gpu=math.gcd(bs, self.micro_batch_size),  # VeRL needs it to divide bs
            calculate_entropy=entropy,
            global_batch_size=bs,
            mini_batch_size=bs,
        )

    def log_probs(self, batch: dict[str, torch.Tensor], entropy: bool = False):
        """Response-token log-probs ``(bs, R)`` (and entropy) from the engine: VeRL's ``compute_log_prob``."""
        from verl.workers.utils.padding import no_padding_2_padding

        td = to_engine_batch(batch, **self._meta(len(batch["prompts"]), entropy=entropy))
        with self.engine.eval_mode():
            out = self.engine.infer_batch(td)
        model_output = out["model_output"]  # the engine returns a plain dict (model_output, loss, metrics)
        # The batch stays on CPU (the engine moves each micro-batch to the device); bring outputs back.
        lp = no_padding_2_padding(model_output["log_probs"].cpu(), td).float()
        ent = no_padding_2_padding(model_output["entropy"].cpu(), td).float() if entropy else None
        return lp, ent

    def update(self, batch: dict[str, torch.Tensor], old_log_probs, advantages) -> dict:
        """One optimizer step on ``batch`` with VeRL's ``ppo_loss``; returns the engine's metrics."""
        full = dict(batch, old_log_probs=old_log_probs, advantages=advantages)
        meta = self._meta(len(batch["prompts"]), entropy=self.actor_config.entropy_coeff != 0)
        td = to_engine_batch(full, **meta)
        with self.engine.train_mode():
            out = self.engine.train_batch(td, loss_function=self.loss_fn)
        return {k: _scalar(v) for k, v in out["metrics"].items()}

    def sync_rollout_model(self) -> float:
        """Stream the engine's per-tensor weights (trainer names) into the rollout; returns seconds.

        The stream is consumed inside the rollout's loader, so the time includes producing it (FSDP
        all-gathers) as VeRL's ``update_weights`` does; :attr:`last_sync` also has bytes and tensor count.
        """
        params, _ = self.engine.get_per_tensor_param()
        self.last_sync = self.rollout_backend.sync_weights(params)
        self.synced = True
        return self.last_sync["seconds"]

    # -- one GRPO step -----------------------------------------------------------------------------

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of ``prompts`` with the chat template and the evaluation prompt suffix."""
        from m1_eval.prompting import PromptConfig
        from m1_eval.prompting import build_prompt

        tok = self.tokenizer
        return [tok(build_prompt(t, tok, PromptConfig()), add_special_tokens=False)["input_ids"] for t in prompts]

    def rollout(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float | None = None):
        """``n`` sampled responses per prompt (chat template applied), as token id lists.

        Returns ``(prompt_ids, response_ids)`` (one entry per response) and sets :attr:`last_rollout`
        (seconds, tokens, tok/s).
        """
        ids = self.prompt_ids(prompts)
        temp = self.temperature if temperature is None else temperature
        kw = dict(n=n, max_tokens=max_new_tokens, temperature=temp)
        if isinstance(self.rollout_backend, HFRollout):
            kw.update(eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id)
        out = self.rollout_backend.generate(ids, **kw)
        self.last_rollout = {k: out[k] for k in ("seconds", "tokens", "tok_s")}
        return [p for p in ids for _ in range(n)], out["token_ids"]

    def step(self, prompts: list[str], answers: list[str], n: int = 4, max_new_tokens: int = 32) -> dict:
        """Rollout -> reward -> GRPO advantages -> old log-probs -> update -> weight sync; returns metrics."""
        from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

        from verl_m1.reward import compute_score

        t0 = time.time()
        if not self.synced:
            self.sync_rollout_model()
        prompt_ids, response_ids = self.rollout(prompts, n, max_new_tokens)
        self.rollout_backend.sleep()  # vLLM sleep mode: free KV cache + offload weights while training
        t_rollout = time.time() - t0
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        rewards = [compute_score("math", t, answers[i // n], timeout_s=2.0) for i, t in enumerate(texts)]
        batch = padded_batch(prompt_ids, response_ids, self.tokenizer.pad_token_id)
        mask = batch["response_mask"].float()
        scores = torch.zeros_like(mask)
        last = (mask.sum(-1).long() - 1).clamp_min(0)
        scores[torch.arange(len(rewards)), last] = torch.tensor(rewards)
        index = np.array([i // n for i in range(len(rewards))])
        advantages, _ = compute_grpo_outcome_advantage(scores, mask, index)
        t1 = time.time()
        old_lp, _ = self.log_probs(batch)
        metrics = self.update(batch, old_lp, advantages)
        t_update = time.time() - t1
        t_sync = self.sync_rollout_model()
        return {
            "reward_mean": float(np.mean(rewards)),
            "rewards": rewards,
            "texts": texts,
            "response_tokens": int(mask.sum()),
            "rollout_s": t_rollout,
            "rollout_tok_s": self.last_rollout["tok_s"],
            "update_s": t_update,
            "sync_s": t_sync,
            "sync_bytes": self.last_sync.get("bytes", 0),
            "metrics": metrics,
        }


def demo_steps(ckpt, problem: str, answer: str, *, steps: int = 2, n: int = 4, max_new_tokens: int = 32, log=print):
    """``m1 demo``'s GRPO stage: ``steps`` GRPO steps on one problem with VeRL's engine on CPU.

    Returns the per-step results of :meth:`InProcessGRPO.step`. ``log`` receives one line per step.
    """
    trainer = InProcessGRPO(str(ckpt), lr=1e-6, entropy_coeff=0.01, micro_batch_size=n)
    results = []
    for i in range(steps):
        res = trainer.step([problem], [answer], n=n, max_new_tokens=max_new_tokens)
        m = {k: res["metrics"].get(k, float("nan")) for k in ("actor/pg_loss", "actor/entropy_loss", "grad_norm")}
        log(
            f"GRPO step {i + 1}/{steps}: reward {res['reward_mean']:.2f} over {n} rollouts, "
            f"pg_loss {m['actor/pg_loss']:.4f}, entropy {m['actor/entropy_loss']:.3f}, "
            f"grad_norm {m['grad_norm']:.3f}; rollout {res['rollout_s']:.1f} s, "
            f"update {res['update_s']:.1f} s, weight sync {res['sync_s']:.2f} s"
        )
        results.append(res)
    return results


# The CPU-only name this module had before it drove CUDA and vLLM too.
CPUGRPO = InProcessGRPO

__all__ = ["CPUGRPO", "HFRollout", "InProcessGRPO", "demo_steps", "padded_batch", "to_engine_batch"]
