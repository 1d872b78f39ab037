"""Tensor-parallel check of the vLLM plugin: greedy tokens and top log-probs at TP=1 and TP=N vs HF ``generate``.

A real multi-GPU run of what ``tests/vllm/test_plugin.py::test_tp_shards_reproduce_the_layer`` emulates on CPU:
the same M1 checkpoint (by default the tests' random 4-layer hybrid with M1's 3x GQA repeat, ``dt_bias_twice``,
d_inner 384 = 24 C groups, 8 x/B groups, 2 KV heads; built with the SmolLM2 tokenizer files in
``--tokenizer-dir``) is served by vLLM at ``tensor_parallel_size`` 1 and ``--tp`` (fp32, CUDA graphs on,
prompts of different lengths in one batch), and its greedy continuations are compared with HF ``generate``
on one GPU. Each engine runs in a child process (its own CUDA context and TP workers); the plugin must be
installed (``pip install -e .``) so that the TP workers find it through the entry point.

Writes ``<out>/vllm_tp_check.json`` (per prompt: tokens identical to HF at each TP, the first differing
position, the largest |logprob| difference between TP=1 and TP=N on their common tokens) and exits non-zero
on a mismatch.

    python benchmarks/vllm_tp_check.py --tp 2 --out runs/tp_check
    python benchmarks/vllm_tp_check.py --model /path/to/m1_checkpoint --tp 2
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

PROMPT_LENS = [3, 9, 17, 33, 64, 120, 250, 5]


def parse_args(argv=None):
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="M1 checkpoint folder (default: build the tests' tiny random hybrid in --out)")
    p.add_argument("--tokenizer-dir", default=".gpu_tok", help="SmolLM2 tokenizer files for the default model")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size compared with 1")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/tp_check")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # child: the TP size to serve at
    return p.parse_args(argv)


def prompts(vocab: int) -> list[list[int]]:
    """Random token-id prompts of :data:`PROMPT_LENS` lengths (fixed seed)."""
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


def serve(args) -> None:
    """Child: one engine at TP ``args.worker``; prints one JSON line with the tokens and top log-probs."""
    from vllm import LLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, tensor_parallel_size=args.worker, dtype="float32", max_model_len=512,
              gpu_memory_utilization=0.3, skip_tokenizer_init=True, enable_prefix_caching=False, seed=0)  # fmt: skip
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts(vocab)], sp, use_tqdm=False)
    rows = []
    for o in outs:
        c = o.outputs[0]
        rows.append(
            {"tokens": list(c.token_ids), "logprobs": [{str(k): v.logprob for k, v in lp.items()} for lp in c.logprobs]}
        )
    print("RESULT " + json.dumps(rows), flush=True)


def run_engine(args, tp: int) -> list[dict]:
    """Serve at TP ``tp`` in a child process and return its rows."""
    t = time.time()
    proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--max-tokens", str(args.max_tokens),
                           "--worker", str(tp)], capture_output=True, text=True, timeout=900)  # fmt: skip
    print(f"TP={tp}: engine run {time.time() - t:.0f} s, exit {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"TP={tp} engine failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def hf_reference(model_dir: str, max_tokens: int) -> list[list[int]]:
    """HF ``generate`` greedy continuations on one GPU (fp32)."""
    import torch

    from m1_hybrid import M1HybridForCausalLM

    model = M1HybridForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).cuda().eval()
    out = []
    for p in prompts(model.config.vocab_size):
        ids = torch.tensor([p], device="cuda")
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
        out.append(gen[0, len(p) :].tolist())
    return out


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when identical."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def compare(hf: list[list[int]], tp1: list[dict], tpn: list[dict], tp: int) -> dict:
    """Per-prompt agreement of TP=1 and TP=``tp`` with HF, and their largest top-logprob difference."""
    per_prompt = []
    for i, (ref, a, b) in enumerate(zip(hf, tp1, tpn)):
        same = first_diff(a["tokens"], b["tokens"])
        common = len(a["tokens"]) if same is None else same
        lp_diff = 0.0
        for la, lb in zip(a["logprobs"][:common], b["logprobs"][:common]):
            for tok in set(la) & set(lb):
                lp_diff = max(lp_diff, abs(la[tok] - lb[tok]))
        per_prompt.append({
            "prompt_len": PROMPT_LENS[i],
            "tp1_equals_hf": a["tokens"] == ref,
            f"tp{tp}_equals_hf": b["tokens"] == ref,
            f"tp{tp}_first_diff_vs_tp1": same,
            "max_abs_logprob_diff": lp_diff,
        })  # fmt: skip
    ok = all(r["tp1_equals_hf"] and r[f"tp{tp}_equals_hf"] for r in per_prompt)
    return {"tp": tp, "all_equal": ok, "prompts": per_prompt,
            "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in per_prompt)}  # fmt: skip


def main(argv=None) -> int:
    """Build or take the model, run HF, TP=1 and TP=N, compare, write the JSON."""
    args = parse_args(argv)
    if args.worker:
        serve(args)
        return 0
    import torch

    if torch.cuda.device_count() < args.tp:
        print(f"vllm_tp_check needs {args.tp} GPUs; this machine has {torch.cuda.device_count()}.")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.model:
        import tests.vllm.conftest as fixtures

        fixtures.smollm2_dir = lambda n: Path(args.tokenizer_dir)  # tokenizer files only; the weights are random
        args.model = str(fixtures.build_tiny(str(out / "m1_tiny")))
    hf = hf_reference(args.model, args.max_tokens)
    tp1, tpn = run_engine(args, 1), run_engine(args, args.tp)
    result = {"model": args.model, "gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
              **compare(hf, tp1, tpn, args.tp)}  # fmt: skip
    (out / "vllm_tp_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["all_equal"] else 2


if __name__ == "__main__":
    sys.exit(main())
