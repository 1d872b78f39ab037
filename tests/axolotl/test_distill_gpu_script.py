"""CPU smoke test of ``benchmarks/distill_gpu.py`` (the GPU distillation run) on the 2-layer SmolLM2 slice."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.testing import REPO
from tests.testing import benchmark_script


def _script():
    return benchmark_script("distill_gpu")


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_default_attention_layers():
    script = _script()
    layers = script.default_attn_layers(30)
    assert len(layers) == 8 and layers[-1] == 29 and layers == sorted(set(layers))


def test_distill_gpu_smoke(tmp_path):
    """Two steps on CPU: CSVs, plot and summary with finite numbers, held-out eval, loadable bf16 student."""
    from transformers import AutoModelForCausalLM

    script = _script()
    out, save = tmp_path / "out", tmp_path / "student"
    data = script.prepare_data(tmp_path / "data")
    assert set(data) == {"train.jsonl", "test.jsonl", script.EXTRA_FILE}
    summary = script.main(
        ["--device", "cpu", "--teacher-slice", "2", "--data-dir", str(tmp_path / "data"), "--seq-len", "128",
         "--batch-rows", "2", "--max-steps", "2", "--eval-docs", "2", "--align-minutes", "0.02", "--out", str(out),
         "--save", str(save)]
    )  # fmt: skip

    log = _rows(out / "distill_log.csv")
    assert [int(r["step"]) for r in log] == [1, 2]
    for r in log:
        assert all(math.isfinite(float(r[k])) for k in ("kl", "ce", "top1", "tok_per_s", "lr"))
        assert 0.0 <= float(r["top1"]) <= 1.0 and float(r["kl"]) >= 0.0
    evals = _rows(out / "distill_eval.csv")
    assert [(int(r["step"]), r["stage"]) for r in evals] == [(0, "init"), (0, "aligned"), (2, "kl")]
    # The alignment stage ran (time-bounded, at most --max-steps steps) and its errors are relative.
    align = _rows(out / "distill_align.csv")
    assert 1 <= len(align) <= 2 and all(0.0 < float(r["rel_err"]) <= float(r["rel_err_max"]) for r in align)
    assert all(int(r["tokens"]) > 0 and math.isfinite(float(r["kl"])) for r in evals)
    memory = {r["loss"]: r for r in _rows(out / "distill_memory.csv")}
    assert set(memory) == {"fused", "naive"}
    # CPU: no CUDA allocator to read, so memory is reported as not measured (never faked); times are.
    assert all(r["peak_extra_mib"] == "nan" and float(r["ms_median"]) > 0 for r in memory.values())
    # The fused loss and the naive fp32 full-logits KL are the same number.
    assert abs(float(memory["fused"]["value"]) - float(memory["naive"]["value"])) < 1e-4
    assert (out / "distill_curves.png").stat().st_size > 0

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 2 and on_disk["attn_layers"] == [1]
    assert on_disk["held_out_final"]["step"] == 2 and 0.0 <= on_disk["held_out_final"]["top1"] <= 1.0
    assert on_disk["loss_memory"]["fused_peak_extra_mib"] is None and "not measured" in on_disk["loss_memory"]["note"]
    assert math.isfinite(on_disk["tok_per_s_median"])

    student = AutoModelForCausalLM.from_pretrained(save, trust_remote_code=True)
    assert type(student).__name__ == "M1HybridForCausalLM" and student.dtype == torch.bfloat16
    assert student.config.attn_layers == [1]

    # --init-student continues from the saved student (its held-out start is where the first run ended, up to
    # the bf16 save, not a fresh conversion); --profile-steps writes the profiler table.
    out2 = tmp_path / "out2"
    script.main(
        ["--device", "cpu", "--teacher-slice", "2", "--data-dir", str(tmp_path / "data"), "--seq-len", "128",
         "--batch-rows", "2", "--max-steps", str(script.PROFILE_AFTER + 1), "--eval-docs", "2", "--no-memory",
         "--init-student", str(save), "--profile-steps", "1", "--out", str(out2)]
    )  # fmt: skip
    start = _rows(out2 / "distill_eval.csv")[0]
    end, fresh = float(evals[-1]["kl"]), float(evals[0]["kl"])
    assert start["stage"] == "init" and abs(float(start["kl"]) - end) < 0.5 * abs(fresh - end)
    assert json.loads((out2 / "summary.json").read_text())["attn_layers"] == [1]
    assert "training steps, top ops" in (out2 / script.PROFILE_FILE).read_text()


def test_distill_gpu_resumes_its_training_state(tmp_path):
    """``--state``: a second call continues the first one exactly (weights, optimizer, step count, schedule,
    and the data: its batches are those an uninterrupted run trains on next, not the first ones again)."""
    script = _script()
    script.prepare_data(tmp_path / "data")
    state = tmp_path / "state"

    def call(max_steps, out, state=state):
        return script.main(
            ["--device", "cpu", "--teacher-slice", "2", "--data-dir", str(tmp_path / "data"), "--seq-len", "128",
             "--batch-rows", "2", "--max-steps", str(max_steps), "--eval-docs", "2", "--no-memory", "--lr", "1e-3",
             "--warmup", "4", "--state", str(state), "--schedule-minutes", "1000", "--out", str(tmp_path / out)]
        )  # fmt: skip

    call(4, "whole", state=tmp_path / "whole_state")
    call(2, "first")
    assert script.load_state(state)["step"] == 2
    call(4, "second")
    first_end = _rows(tmp_path / "first" / "distill_eval.csv")[-1]
    resumed, *_ = _rows(tmp_path / "second" / "distill_eval.csv")
    assert resumed["stage"] == "resumed" and int(resumed["step"]) == 2
    assert float(resumed["kl"]) == pytest.approx(float(first_end["kl"]), rel=1e-6)  # the fp32 weights, unrounded
    log = _rows(tmp_path / "second" / "distill_log.csv")
    assert [int(r["step"]) for r in log] == [3, 4]
    whole = _rows(tmp_path / "whole" / "distill_log.csv")[2:]  # steps 3 and 4 of the uninterrupted run
    assert [r["counted_tokens"] for r in log] == [r["counted_tokens"] for r in whole]
    assert [float(r["kl"]) for r in log] == pytest.approx([float(r["kl"]) for r in whole], rel=1e-4)
    assert float(log[0]["lr"]) == pytest.approx(1e-3 * 3 / 4)  # warm-up goes on, not restarted
    saved = script.load_state(state)
    assert saved["step"] == 4 and all(int(s["step"]) == 4 for s in saved["optimizer"]["state"].values())
    with pytest.raises(SystemExit, match="drop --init-student"):
        script.main(["--device", "cpu", "--teacher-slice", "2", "--state", str(state), "--init-student", str(state)])


def test_samples_join_the_training_text_and_held_out_problems_are_refused(tmp_path):
    """``--samples``: the parts of ``sample_teacher.py`` (xz JSONL, in name order; a folder or files) join the
    training rows and are trained on; a sampled row with a MATH500 problem is refused, as is a folder with none."""
    script = _script()
    data = tmp_path / "data"
    script.prepare_data(data)
    held_out = script.held_out_problems(data)
    rows = [{"problem": f"What is {i} + {i}?", "solution": f"It is $\\boxed{{{2 * i}}}$."} for i in range(6)]
    parts = tmp_path / "samples"
    parts.mkdir()
    sampler = benchmark_script("sample_teacher")
    sampler.write_part(rows[3:], parts / "part_001.jsonl.xz")
    sampler.write_part(rows[:3], parts / "part_000.jsonl.xz")
    assert script.read_samples([parts], held_out) == rows
    assert script.read_samples([parts / "part_001.jsonl.xz"], held_out) == rows[3:]
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"problem": next(iter(held_out)) + " ", "solution": "x"}) + "\n")
    with pytest.raises(ValueError, match="held-out MATH500"):
        script.read_samples([parts, leak], held_out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl"):
        script.read_samples([tmp_path / "empty"], held_out)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        script.read_samples([tmp_path / "nothing"], held_out)

    summary = script.main(
        ["--device", "cpu", "--teacher-slice", "2", "--data-dir", str(data), "--seq-len", "128", "--batch-rows", "2",
         "--max-steps", "1", "--eval-docs", "1", "--no-memory", "--samples", str(parts), "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert summary["teacher_samples"] == len(rows)
    trained = script.training_data(data, False) + rows  # what the run's rows are drawn from
    assert len(trained) == summary["train_solutions"]


def test_distill_gpu_trains_only_mamba_when_asked(tmp_path):
    """``--train mamba`` (MambaInLlama's stepwise phase 1): every non-Mamba weight stays as converted."""
    from m1_hybrid import M1HybridForCausalLM
    from m1_hybrid.convert import convert_checkpoint
    from m1_hybrid.teacher import smollm2_slice_path

    script = _script()
    script.prepare_data(tmp_path / "data")
    converted = M1HybridForCausalLM.from_pretrained(
        convert_checkpoint(smollm2_slice_path(2), tmp_path / "converted", [1], "fp32")
    )
    script.main(
        ["--device", "cpu", "--teacher-slice", "2", "--data-dir", str(tmp_path / "data"), "--seq-len", "128",
         "--batch-rows", "2", "--max-steps", "1", "--eval-docs", "1", "--no-memory",
         "--train", "mamba", "--lr", "0.1", "--warmup", "0",
         "--out", str(tmp_path / "out"), "--save", str(tmp_path / "student")]
    )  # fmt: skip
    trained = M1HybridForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32)
    before, after = converted.state_dict(), trained.state_dict()
    frozen = [n for n in before if ".mamba." not in n]
    assert frozen and all(torch.equal(before[n].bfloat16().float(), after[n]) for n in frozen)
    # ... while the step did update something (the mixers): a non-zero gradient was clipped and applied.
    assert float(_rows(tmp_path / "out" / "distill_log.csv")[0]["grad_norm"]) > 0


def test_distill_gpu_chooses_attention_layers_after_alignment(tmp_path):
    """``--attn-layers auto``: every layer is aligned as a mixer, the costliest substitution keeps attention."""
    script = _script()
    script.prepare_data(tmp_path / "data")
    out = tmp_path / "out"
    summary = script.main(
        ["--device", "cpu", "--teacher-slice", "3", "--data-dir", str(tmp_path / "data"), "--seq-len", "96",
         "--batch-rows", "2", "--max-steps", "2", "--eval-docs", "2", "--no-memory", "--attn-layers", "auto",
         "--align-minutes", "0.05", "--out", str(out)]
    )  # fmt: skip
    scores = {int(i): v for i, v in summary["substitution_kl"].items()}
    assert sorted(scores) == [0, 1, 2] and all(v > 0 for v in scores.values())
    assert summary["attn_layers"] == [max(scores, key=scores.get)]  # 3 layers -> one attention layer
    assert [(int(r["step"]), r["stage"]) for r in _rows(out / "distill_eval.csv")] == [(0, "aligned"), (2, "kl")]
    align = _rows(out / "distill_align.csv")
    assert align and all(float(r["rel_err"]) > 0 for r in align)
    with pytest.raises(SystemExit, match="give --align-minutes"):
        script.main(["--device", "cpu", "--teacher-slice", "3", "--attn-layers", "auto", "--out", str(tmp_path / "x")])


def test_plot_distill_runs_chains_continued_stages(tmp_path):
    """A continued run's curve goes on where its first stage ended; the unaligned start and the repeated
    step-0 evaluation of the continuation are not plotted."""
    plot = benchmark_script("plot_distill_runs")

    def stage(name, seconds, steps, rows):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"train_seconds": seconds, "steps": steps}))
        (d / "distill_eval.csv").write_text("step,stage,top1\n" + "".join(f"{s},{k},{t}\n" for s, k, t in rows))
        return d

    a = stage("a", 120, 100, [(0, "init", 0.001), (0, "aligned", 0.5), (50, "kl", 0.7), (100, "kl", 0.8)])
    b = stage("b", 60, 10, [(0, "init", 0.8), (10, "kl", 0.85)])
    assert plot.chain_points([a, b]) == [(0.0, 0.5), (1.0, 0.7), (2.0, 0.8), (3.0, 0.85)]
    # A --state continuation counts its steps on from the resumed step (here 100 -> 130 in 60 s).
    c = stage("c", 60, 30, [(100, "resumed", 0.8), (115, "kl", 0.82), (130, "kl", 0.86)])
    assert plot.chain_points([a, c])[-2:] == [(2.5, 0.82), (3.0, 0.86)]
    out = tmp_path / "runs.png"
    plot.main(["--run", f"x={a},{b}", "--out", str(out)])
    assert out.stat().st_size > 0


def test_extra_data_never_holds_a_held_out_problem(tmp_path):
    """``--extra-data``: MATH test minus the 500 held-out MATH500 problems, plus GSM8K train as boxed solutions."""
    script = _script()
    script.prepare_data(tmp_path)
    held_out = {r["problem"].strip() for r in script.read_jsonl(tmp_path / "test.jsonl")}
    extra = script.read_jsonl(tmp_path / script.EXTRA_FILE)
    assert len(held_out) == 500 and len(extra) == 4500 + 7473
    assert not held_out & {r["problem"].strip() for r in extra}
    gsm = extra[-1]["solution"]
    assert gsm.endswith("The answer is $\\boxed{50}$.") and "<<" not in gsm and "####" not in gsm


def test_a_data_position_is_kept_only_for_the_same_data(capsys):
    """A saved data position refers to one data mix; other data (files, sizes, share) starts again, saying so."""
    script = _script()
    identity = script.data_identity([{}] * 3, [{}] * 5, 0.5, ranks=2)
    state = {"data_positions": [[2, 7], [2, 6]], "data": identity}
    assert script.resumed_data_position(state, identity, rank=1) == (2, 6)  # each rank its own
    assert script.resumed_data_position(state, script.data_identity([{}] * 3, [{}] * 5, None, 2)) == (0, 0)
    assert "starts again from the first document" in capsys.readouterr().out
    assert script.resumed_data_position(state, script.data_identity([{}] * 3, [{}] * 5, 0.5, 1)) == (0, 0)
    assert "number of ranks" in capsys.readouterr().out


def test_training_rows_resume_at_their_data_position():
    """Each packed row carries the data position after it; a stream started there goes on exactly as the
    uninterrupted one, also across the epoch boundary (where the documents are reshuffled)."""
    from transformers import AutoTokenizer

    from m1_hybrid.teacher import smollm2_slice_path

    script = _script()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_slice_path(2))
    docs = script.training_data(None, False)[:7]
    stream = script.train_rows(docs, tokenizer, 512, seed=3)
    rows = [next(stream) for _ in range(12)]
    epochs = [epoch for _, (epoch, _) in rows]
    assert epochs[0] == 0 and epochs[-1] >= 2  # the twelve rows span several epochs
    for k in range(len(rows) - 3):
        resumed = script.train_rows(docs, tokenizer, 512, seed=3, start=rows[k][1])
        assert [next(resumed) for _ in range(3)] == rows[k + 1 : k + 4]


def test_distill_gpu_data_parallel_over_two_ranks(tmp_path):
    """torchrun, two CPU ranks over gloo: one layer choice for both, gradients averaged (the script checks that the
    replicas end identical, and fails otherwise), each step's tokens counted over both ranks, and a ``--state``
    call resuming each rank's own data position."""
    script = _script()
    script.prepare_data(tmp_path / "data")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "kernels")])

    def torchrun(max_steps, out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "benchmarks" / "distill_gpu.py"), "--device", "cpu", "--teacher-slice", "3", "--data-dir",
               str(tmp_path / "data"), "--seq-len", "192", "--batch-rows", "1", "--max-steps", str(max_steps),
               "--eval-docs", "2", "--no-memory", "--attn-layers", "auto", "--align-minutes", "0.02", "--warmup",
               "4", "--state", str(state), "--schedule-minutes", "1000", "--out", str(tmp_path / out)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads((tmp_path / out / "summary.json").read_text())

    first = torchrun(2, "first")
    assert first["data_parallel_ranks"] == 2 and first["steps"] == 2 and len(first["attn_layers"]) == 1
    assert [int(r["tokens"]) for r in _rows(tmp_path / "first" / "distill_log.csv")] == [384, 768]  # 2 ranks x 192
    positions = script.load_state(state)["data_positions"]
    assert len(positions) == 2 and all(epoch == 0 and done > 0 for epoch, done in positions)

    second = torchrun(4, "second")
    assert second["attn_layers"] == first["attn_layers"] and second["steps"] == 2
    assert [int(r["step"]) for r in _rows(tmp_path / "second" / "distill_log.csv")] == [3, 4]
    resumed = script.load_state(state)["data_positions"]
    assert all(tuple(new) > tuple(old) for new, old in zip(resumed, positions))  # each rank went on from its own


def test_the_schedule_runs_on_the_agreed_clock():
    """``scheduled_steps`` sets the learning rate and stops by the elapsed time ``agree`` returns (rank 0's under
    data parallelism), not by this process's own clock."""
    script = _script()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    clock = iter([0.0, 30.0, 59.0, 60.0])  # seconds on the agreed clock at steps 1, 2, 3 and the stop check
    steps = list(script.scheduled_steps(opt, 1.0, 0, 1.0, 100, agree=lambda own: next(clock)))
    assert [step for step, _ in steps] == [1, 2, 3]  # stopped when the agreed clock reached the minute
    assert [lr for _, lr in steps] == pytest.approx([script.lr_at(p, 1, 1.0, 0) for p in (0.0, 0.5, 59 / 60)])
    assert steps[1][1] == pytest.approx(0.55) and opt.param_groups[0]["lr"] == steps[-1][1]


def test_accumulated_micro_batches_make_one_step(tmp_path):
    """``--accum-steps 2`` of one row trains on the same rows per step as one batch of two rows, and its metrics are
    those of the whole step: at step 1 (the same weights) counted tokens and token-weighted KL / top-1 agree."""
    script = _script()
    script.prepare_data(tmp_path / "data")

    def run(out, *extra):
        script.main(
            ["--device", "cpu", "--teacher-slice", "2", "--data-dir", str(tmp_path / "data"), "--seq-len", "384",
             "--max-steps", "2", "--eval-docs", "2", "--no-memory", "--out", str(tmp_path / out), *extra]
        )  # fmt: skip
        return _rows(tmp_path / out / "distill_log.csv")

    whole, accumulated = run("whole", "--batch-rows", "2"), run("accum", "--batch-rows", "1", "--accum-steps", "2")
    assert [r["tokens"] for r in accumulated] == [r["tokens"] for r in whole] == ["768", "1536"]
    assert [r["counted_tokens"] for r in accumulated] == [r["counted_tokens"] for r in whole]
    for key in ("kl", "ce", "top1"):
        assert float(accumulated[0][key]) == pytest.approx(float(whole[0][key]), rel=1e-5)
    with pytest.raises(SystemExit, match="at least one micro-batch"):
        run("none", "--accum-steps", "0")


def test_data_parallel_ranks_share_out_every_epoch():
    """``shard=(rank, ranks)``: the ranks' rows hold disjoint documents that together are the whole epoch, and a
    rank's stream resumes at its own positions."""
    from transformers import AutoTokenizer

    from m1_hybrid.teacher import smollm2_slice_path

    script = _script()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_slice_path(2))
    docs = script.training_data(None, False)[:9]
    firsts = {tuple(script.encode_chat(tokenizer, d, 512)[0]) for d in docs}

    def epoch0_documents(rank):  # the documents of the rank's epoch-0 rows, split where positions restart at 0
        found = []
        for (ids, labels, pos), (epoch, _) in script.train_rows(docs, tokenizer, 512, 3, shard=(rank, 3)):
            if epoch > 0:
                return found
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            found += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:]) if labels[a:b].count(-100) < b - a]

    shares = [epoch0_documents(rank) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3] and set().union(*map(set, shares)) == firsts
    stream = script.train_rows(docs, tokenizer, 512, seed=3, shard=(1, 3))
    rows = [next(stream) for _ in range(4)]
    resumed = script.train_rows(docs, tokenizer, 512, seed=3, start=rows[1][1], shard=(1, 3))
    assert [next(resumed) for _ in range(2)] == rows[2:]


def test_the_script_examples_hold():
    """The ``Example::`` blocks of ``distill_gpu.py`` (benchmarks are outside the package doctest run)."""
    import doctest

    for module, examples in ((_script(), 4), (benchmark_script("data_parallel"), 1)):
        result = doctest.testmod(module)
        assert result.attempted >= examples and result.failed == 0


def test_mixed_epochs_keep_the_share_and_go_through_the_pool():
    """``--samples-share``: every epoch holds all written solutions plus sampled ones at the asked share, new
    ones each epoch until the pool is used up, then round again; the same epochs for the same seed."""
    MixedEpochs = _script().MixedEpochs
    written, sampled = [{"w": i} for i in range(6)], [{"s": i} for i in range(10)]
    epochs = MixedEpochs(written, sampled, 0.25, seed=1)
    assert epochs.per_epoch == 2  # 2 / (6 + 2) = 0.25
    drawn = [[d["s"] for d in epochs(e) if "s" in d] for e in range(6)]
    assert all(epochs(e)[:6] == written for e in range(6))
    assert sorted(s for e in range(5) for s in drawn[e]) == list(range(10))  # five epochs: each sample once
    assert drawn[5] == drawn[0]  # then round again
    assert drawn == [[d["s"] for d in MixedEpochs(written, sampled, 0.25, seed=1)(e) if "s" in d] for e in range(6)]
    with pytest.raises(ValueError, match="between 0 and 1"):
        MixedEpochs(written, sampled, 1.0, seed=1)
    with pytest.raises(ValueError, match="needs --samples"):
        MixedEpochs(written, [], 0.5, seed=1)
