"""The evaluation pipeline: datasets -> prompts -> vLLM samples -> grading -> metrics -> JSON, table, PNG.

Example::

    >>> from m1_eval import evaluate                                               # doctest: +SKIP
    >>> print(evaluate("/path/to/model", datasets="math500", limit=5, n=1, max_tokens=256))  # doctest: +SKIP
    dataset  problems  n  pass@1  maj@1
    ...
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from m1_eval.generate import SamplingConfig
from m1_eval.grading import DEFAULT_TIMEOUT_S
from m1_eval.prompting import PromptConfig


def _as_list(datasets: str | Sequence[str]) -> list[str]:
    if isinstance(datasets, str):
        return [d.strip() for d in datasets.split(",") if d.strip()]
    return list(datasets)


def run_evaluation(
    model: str,
    datasets: str | Sequence[str] = ("math500",),
    *,
    n: int = 1,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_tokens: int = 32768,
    max_tokens_per_dataset: dict[str, int] | None = None,
    seed: int = 0,
    limit: int | None = None,
    prompt: PromptConfig | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    llm_kwargs: dict | None = None,
    llm=None,
    label: str | None = None,
    throughput: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    require_think: bool = False,
    ks: list[int] | None = None,
    repeats: int = 100,
    output_json: str | Path | None = None,
    output_png: str | Path | None = None,
    compare: Sequence[str | Path] = (),
    progress: bool = True,
) -> dict:
    """Run one model over ``datasets`` and return the results dict (see :mod:`m1_eval.report`).

    ``llm`` reuses an already built ``vllm.LLM``; otherwise one is built from ``model``. ``throughput``
    (tokens/s) overrides the throughput measured during generation for the time-budget curves.
    ``compare`` adds earlier results JSON files (other models) to the PNG.
    """
    from m1_eval.datasets import load_dataset
    from m1_eval.generate import generate
    from m1_eval.generate import load_llm
    from m1_eval.prompting import build_prompt
    from m1_eval.report import compute_metrics
    from m1_eval.report import grade_records
    from m1_eval.report import load_results
    from m1_eval.report import make_results
    from m1_eval.report import save_results

    prompt = prompt or PromptConfig()
    sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    names = _as_list(datasets)
    problems = [p for name in names for p in load_dataset(name, limit=limit)]
    if not problems:
        raise ValueError(f"no problems in {names}")
    per_ds = max_tokens_per_dataset or {}

    if llm is None:
        llm = load_llm(model, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       tensor_parallel_size=tensor_parallel_size, **(llm_kwargs or {}))  # fmt: skip
    tokenizer = llm.get_tokenizer()
    prompts = [build_prompt(p.problem, tokenizer, prompt) for p in problems]
    limits = [per_ds.get(p.dataset, max_tokens) for p in problems]
    t0 = time.perf_counter()
    gen = generate(llm, prompts, sampling, use_tqdm=progress, max_tokens=limits)

    records = []
    for i, p in enumerate(problems):
        records.append(
            {
                "dataset": p.dataset,
                "id": p.id,
                "problem": p.problem,
                "answer": p.answer,
                "meta": p.meta,
                "prompt": prompts[i],
                "prompt_tokens": gen.prompt_tokens[i] if gen.prompt_tokens else None,
                "max_tokens": limits[i],
                "samples": [
                    {"text": t, "num_tokens": nt, "finish_reason": fr}
                    for t, nt, fr in zip(gen.texts[i], gen.num_tokens[i], gen.finish_reasons[i])
                ],
            }
        )
    grade_records(records, timeout_s, require_think, progress)
    metrics = compute_metrics(records, ks, repeats, seed)
    results = make_results(
        records,
        metrics,
        model,
        label=label,
        sampling={**sampling.to_dict(), "max_tokens_per_dataset": per_ds},
        prompt=prompt.to_dict(),
        grading={"timeout_s": timeout_s, "require_think": require_think, "repeats": repeats},
        throughput=throughput if throughput else gen.throughput,
        throughput_source="given" if throughput else "measured",
        generation={"wall_s": gen.wall_s, "total_tokens": gen.total_tokens, "elapsed_s": time.perf_counter() - t0},
    )
    if output_json:
        save_results(results, output_json)
    if output_png:
        from m1_eval.scaling import plot_scaling

        plot_scaling([results] + [load_results(c) for c in compare], output_png, repeats=repeats)
    return results


def evaluate(
    model: str,
    datasets: str | Sequence[str] = ("math500",),
    limit: int | None = None,
    n: int = 1,
    max_tokens: int = 1024,
    temperature: float = 0.7,
    top_p: float = 1.0,
    output_dir: str | Path | None = None,
    **kwargs,
) -> str:
    """Evaluate ``model`` and return the results table as text (for ``m1 demo`` and notebooks).

    With ``output_dir``, also writes ``results.json`` and ``scaling.png`` there. Other keyword arguments
    go to :func:`run_evaluation` (``dtype``, ``seed``, ``max_model_len``, ``llm``, ``prompt``...).

    Example::

        >>> table = evaluate(model_path, "math500", limit=5, max_tokens=64, dtype="float32")  # doctest: +SKIP
        >>> print(table)                                                                       # doctest: +SKIP
    """
    from m1_eval.report import format_table

    if output_dir is not None:
        kwargs.setdefault("output_json", Path(output_dir) / "results.json")
        kwargs.setdefault("output_png", Path(output_dir) / "scaling.png")
    res = run_evaluation(
        model, datasets, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, limit=limit, **kwargs
    )
    return format_table(res["metrics"])
