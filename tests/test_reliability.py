"""Reliability: numeric faults in training are skipped by the stated rule, and runs killed with SIGKILL at random
write points resume to the same artifacts as uninterrupted runs (the reduced form of `benchmarks/kill_resume.py`)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sentimerge.experts.loop import Loop, run_loop
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import read_jsonl
from sentimerge.pipeline.killtest import KillHarness, differences, snapshot
from tests.conftest import write_tiny_config


def _loop(tmp_path, model, nan_steps: set[int], total: int = 8) -> Loop:
    inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def step(index: int) -> dict:
        loss = model(inputs).pow(2).mean()
        if index in nan_steps:
            loss = loss * float("nan")
        loss.backward()
        return {"loss": loss.item()}

    return Loop(name="toy", total_steps=total, checkpoint_dir=tmp_path / "checkpoint", metrics_log=tmp_path / "m.jsonl",
                fingerprint="toy", step=step, learning_rate=lambda s: 0.1, evaluate=lambda: {"primary": 0.0},
                eval_steps={total}, checkpoint_every=100)


def test_a_non_finite_step_is_skipped_logged_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    seen = []
    loop = _loop(tmp_path, model, nan_steps={2})
    loop.before_step = lambda s: seen.append(model.weight.detach().clone())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = run_loop(loop, model, optimizer, torch.device("cpu"))
    assert state["skipped_steps"] == [3]
    assert torch.equal(seen[2], seen[3]), "the skipped step must not move the weights"
    assert not torch.equal(seen[3], seen[4]), "training goes on after it"
    rows = read_jsonl(tmp_path / "m.jsonl")
    skipped = [row for row in rows if "skipped" in row]
    assert [(row["step"], row["skipped"], row["loss"]) for row in skipped] == [(3, "non-finite loss", None)]
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row and "skipped" not in row)
    json.loads((tmp_path / "m.jsonl").read_text().splitlines()[3])  # strict JSON: no NaN literal


def test_a_fresh_start_voids_rows_logged_by_an_attempt_that_died_before_its_first_checkpoint(tmp_path):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(3)))
    model = torch.nn.Linear(3, 2)
    run_loop(_loop(tmp_path, model, nan_steps=set(), total=4), model, torch.optim.SGD(model.parameters(), lr=0.1),
             torch.device("cpu"))
    assert [row["step"] for row in read_jsonl(tmp_path / "m.jsonl")] == [0, 1, 2, 3, 4]
    assert all(row.get("loss") != 9.0 for row in read_jsonl(tmp_path / "m.jsonl"))


def test_five_non_finite_steps_in_a_row_stop_the_run_with_a_clear_error(tmp_path):
    model = torch.nn.Linear(3, 2)
    loop = _loop(tmp_path, model, nan_steps={1, 2, 3, 4, 5, 6})
    with pytest.raises(SentimergeError, match=r"toy: 5 steps in a row with a non-finite loss \(the last at step 6\)"):
        run_loop(loop, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    assert [row.get("skipped") for row in read_jsonl(tmp_path / "m.jsonl")][-1] == "non-finite loss"


def test_snapshot_comparison_ignores_wall_clock_and_sees_everything_else(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, seconds, loss in [("a", 1.0, 0.5), ("b", 7.0, 0.5)]:
        (tmp_path / folder / "log.jsonl").write_text(json.dumps({"step": 1, "loss": loss, "seconds": seconds}) + "\n")
    assert differences(snapshot(tmp_path / "a"), snapshot(tmp_path / "b")) == []
    (tmp_path / "b" / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.6, "seconds": 1.0}) + "\n")
    (tmp_path / "b" / ".x.tmp-12").write_text("")
    assert differences(snapshot(tmp_path / "a"), snapshot(tmp_path / "b")) == [
        "unexpected: .x.tmp-12", "log.jsonl: content differs"]


def test_stages_killed_at_random_writes_resume_to_the_uninterrupted_artifacts(tmp_path, cache_dir):
    config = write_tiny_config(tmp_path, cache_dir=cache_dir,
                               experts={"steps": 4, "batch_size": 4, "dev_examples": 8, "checkpoint_every": 2},
                               search={"population": 4, "generations": 2, "weak": {"per_task": 4},
                                       "select": {"top": 2, "per_task": 4}, "gold": {"per_generation": 4}},
                               finetune={"steps": 4, "dev_examples": 8, "checkpoint_every": 2})
    harness = KillHarness(config, tmp_path / "run", tmp_path / "work", in_process=True)
    harness.prepare_reference()
    assert (tmp_path / "run" / "search" / "selection.jsonl").is_file()  # the held-out selection is in the trials
    assert all(harness.points[stage] > 0 for stage in harness.stages), harness.points
    trials = list(harness.trials(3, seed=0, modes=("write",), stages=("experts", "search", "finetune")))
    assert [t.stage for t in trials] == ["experts", "search", "finetune"]
    assert all(t.killed for t in trials), "each kill lands before the stage ends"
    for trial in trials:
        assert trial.ok, (trial.stage, trial.kill_at, trial.differences, trial.stray_files)
