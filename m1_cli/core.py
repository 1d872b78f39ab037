"""Subcommands of the model core: ``m1 convert``, ``m1 import``, ``m1 demo``."""

import argparse


def register(subparsers) -> None:
    """Add ``convert``, ``import`` and ``demo`` to the ``m1`` parser."""
    p = subparsers.add_parser(
        "convert",
        help="turn a Llama/Qwen2 teacher into an M1 hybrid (Algorithm 1 init)",
        description="Convert a Llama/Qwen2-style GQA teacher into an M1 hybrid: Mamba layers initialised from "
        "attention (C<-q, B<-k, x<-v, out<-o), attention kept at --attn-layers.",
    )
    p.add_argument("--teacher", required=True, help="Hugging Face model folder of the teacher")
    p.add_argument("--out", required=True, help="output folder for the hybrid checkpoint")
    p.add_argument(
        "--attn-layers",
        default=None,
        help="comma-separated attention layer indices (default: ~6/28 spread like M1; 'none' for all Mamba)",
    )
    p.add_argument("--dtype", default="bf16", help="saved dtype: bf16, fp16 or fp32 (default bf16)")
    p.add_argument("--d-state", type=int, default=16, help="SSM state size per channel (default 16, as M1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parameters")
    p.set_defaults(func=run_convert)

    p = subparsers.add_parser(
        "import",
        help="import a released M1 checkpoint (mamba_config.json layout)",
        description="Read a released M1 checkpoint (mamba_config.json + Llama config.json + safetensors with "
        "model.layers.{i}.mamba.* / .mha.* keys) and write a self-contained m1_hybrid checkpoint.",
    )
    p.add_argument("--src", required=True, help="folder of the released checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="bf16", help="saved dtype: bf16, fp16 or fp32 (default bf16)")
    p.set_defaults(func=run_import)

    p = subparsers.add_parser(
        "demo",
        help="the main job on the embedded SmolLM2 teacher",
        description="Convert SmolLM2-135M-Instruct (shipped in a PyPI package) into an M1 hybrid, distill it with "
        "Axolotl, answer a MATH500 problem, serve it with vLLM, evaluate it, optionally run GRPO steps.",
    )
    p.add_argument("--out", default="runs/demo", help="working folder (default runs/demo)")
    p.add_argument("--attn-layers", default=None, help="attention layers of the hybrid (default: M1's spread rule)")
    p.add_argument("--problem", type=int, default=0, help="MATH500 problem index (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--distill-steps", type=int, default=4, help="Axolotl distillation steps (default 4; 0 skips)")
    p.add_argument("--eval-problems", type=int, default=5, help="MATH500 problems to evaluate (default 5)")
    p.add_argument("--grpo-steps", type=int, default=0, help="VeRL GRPO steps (default 0: slow on CPU)")
    p.set_defaults(func=run_demo)


def run_convert(args: argparse.Namespace) -> int:
    from m1_hybrid.convert import convert_checkpoint
    from m1_hybrid.convert import parse_layers

    out = convert_checkpoint(
        args.teacher, args.out, parse_layers(args.attn_layers), args.dtype, args.d_state, args.seed
    )
    print(f"wrote M1 hybrid checkpoint to {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from m1_hybrid.convert import DTYPES
    from m1_hybrid.import_m1 import import_released

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    _, out = import_released(args.src, args.out, DTYPES[args.dtype])
    print(f"wrote m1_hybrid checkpoint to {out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from m1_hybrid.demo import run

    return run(args)
