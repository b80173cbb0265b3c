"""Stage 3's task-level curriculum (`finetune.task_pacing`, MEM-MCL): tasks enter the batches easiest first."""

from __future__ import annotations

import math

import pytest
import torch

from sentimerge.curriculum.config import TaskPacingConfig
from sentimerge.curriculum.pacing import batch_counts, task_shares
from sentimerge.experts.multitask import fill_absent, pacing_schedule
from sentimerge.pipeline import finetune
from sentimerge.pipeline.core.config import FinetuneConfig
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl, write_manifest
from tests.test_finetune import FINETUNE, _config, kill_and_resume


def test_task_shares_open_one_task_after_another_and_batches_keep_their_size():
    assert task_shares(0.0, 3) == [1.0, 0.0, 0.0]
    assert task_shares(0.5, 3) == pytest.approx([1.0, 0.5, 0.0])
    assert task_shares(1.0, 3) == [1.0, 1.0, 1.0]
    assert batch_counts([1.0, 0.5, 0.0], 6) == [4, 2, 0]
    assert batch_counts([1.0, 1.0, 1.0], 6) == [2, 2, 2]
    assert batch_counts([1.0, 0.01, 0.0], 6) == [6, 0, 0]  # a share too small for a slot: the task is not in yet
    for level in torch.linspace(0, 1, 23).tolist():
        assert sum(batch_counts(task_shares(level, 4), 8)) == 8


def test_the_schedule_follows_the_task_order_and_reaches_every_task_by_full_at():
    settings = FinetuneConfig(steps=10, per_task=2, task_pacing=TaskPacingConfig(pacing="linear", full_at=0.5))
    names = ["polarity", "aspect3", "intensity"]
    counts = pacing_schedule(settings, ["intensity", "polarity", "aspect3"], names)  # easiest first
    schedule = [counts(step) for step in range(10)]
    assert all(sum(row) == 6 for row in schedule)
    assert schedule[0] == [0, 0, 6]  # only the easiest task at the start (competence 1/3)
    assert all(row[2] >= row[0] >= row[1] for row in schedule)  # an easier task never has fewer examples
    assert schedule[5:] == [[2, 2, 2]] * 5  # full shares from step full_at x steps on
    assert [row[1] > 0 for row in schedule].index(True) > [row[0] > 0 for row in schedule].index(True)
    off = FinetuneConfig(steps=10, per_task=2)
    assert pacing_schedule(off, names, names)(0) is None  # the off-switch: every task in every batch


def test_a_task_left_out_keeps_its_last_loss_and_adds_no_gradient():
    losses = torch.tensor([1.0, 0.0, 3.0], requires_grad=True)
    present = torch.tensor([True, False, True])
    first = fill_absent(losses, present, torch.full((3,), float("nan")))
    assert first.tolist() == [1.0, 2.0, 3.0]  # before its first batch: the mean of the present tasks
    later = fill_absent(losses, present, torch.tensor([5.0, 7.0, 9.0]))
    assert later.tolist() == [1.0, 7.0, 3.0]
    later.sum().backward()
    assert losses.grad.tolist() == [1.0, 0.0, 1.0]


def test_stage_3_paces_the_tasks_by_the_experts_difficulty_and_logs_each_batch(tmp_path, cache_dir):
    cfg = _config(tmp_path, cache_dir, steps=6, task_pacing={"pacing": "linear", "full_at": 0.5})
    run = RunDir(cfg.resolved_run_dir)
    for name, difficulty in (("polarity", 0.1), ("aspect3", 0.6), ("intensity", 0.3)):
        write_manifest(run.expert(name), stage="experts", task=name, task_difficulty={"difficulty": difficulty})
    assert finetune.task_order(cfg, run) == ["polarity", "intensity", "aspect3"]
    manifest = finetune.main(cfg)
    assert manifest["task_order"] == ["polarity", "intensity", "aspect3"] and manifest["examples"] == 6 * 2 * 3
    rows = [row for row in read_jsonl(run.finetune_metrics) if "batch_tasks" in row]
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert rows[0]["batch_tasks"] == {"polarity": 6, "aspect3": 0, "intensity": 0}
    assert rows[-1]["batch_tasks"] == {"polarity": 2, "aspect3": 2, "intensity": 2}
    for row in rows:
        assert all(math.isfinite(value) for value in row["weights"].values())
        assert sum(row["weights"].values()) == pytest.approx(3.0, abs=1e-3)
    # the order is decisive only with pacing on; a changed order is another run
    write_manifest(run.expert("aspect3"), stage="experts", task="aspect3", task_difficulty={"difficulty": 0.0})
    start = finetune.start_model_path(cfg, run)
    assert finetune.fingerprint(cfg, start, ["polarity", "intensity", "aspect3"]) == manifest["fingerprint"]
    assert finetune.fingerprint(cfg, start, finetune.task_order(cfg, run)) != manifest["fingerprint"]


def test_a_killed_paced_finetune_resumes_to_the_same_adapter_and_log(tmp_path, cache_dir):
    kill_and_resume(tmp_path, cache_dir, kill_at=3, checkpoint=2,
                    task_pacing={"pacing": "linear", "full_at": 0.8}, weighting={"name": "famo"})


def test_pacing_off_is_hashed_as_before_and_an_unknown_pacing_is_refused(tmp_path, cache_dir):
    assert "task_pacing" not in FinetuneConfig(**FINETUNE).decisive()
    assert "task_pacing" in FinetuneConfig(**FINETUNE, task_pacing={"pacing": "sqrt"}).decisive()
    with pytest.raises(ValueError, match="pacing"):
        TaskPacingConfig(pacing="cubic")
