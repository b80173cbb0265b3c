"""`experts.replay` on the tiny model: the batches it builds (own task in curriculum order, the other tasks in turn,
inside the same budget), what it teaches about the other tasks, the weak sets it keeps clean, resume, and the settings
it refuses."""

from __future__ import annotations

import pytest
import torch

from sentimerge.experts.config import ExpertsConfig, LoraSettings
from sentimerge.experts.train import answer_losses, load_lora_model
from sentimerge.merge.weak import sample_weak_set, trained_ids
from sentimerge.pipeline import experts, prepare
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl, read_manifest
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path
from tests.conftest import TINY_TASKS, write_tiny_config
from tests.test_experts import SMALL, one_thread, resumed_like_whole  # noqa: F401 (one_thread: autouse)

CPU = torch.device("cpu")


def prepared(folder, cache_dir, tasks=None, **experts_section):
    cfg = load_config(write_tiny_config(folder, cache_dir=cache_dir, tasks=tasks, experts={**SMALL, **experts_section}))
    prepare.main(cfg)
    return cfg


def test_replayed_batches_take_the_other_tasks_in_turn_inside_the_experts_budget(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir, replay={"per_step": 2, "pool": 5})
    experts.main(cfg, tasks=["polarity"])
    run = RunDir(cfg.resolved_run_dir)
    schedule = read_jsonl(run.expert_schedule("polarity"))
    assert len(schedule) == SMALL["steps"]
    own_ids = {row["id"] for row in load_prepared(run, "polarity", "train")}
    assert all(len(row["ids"]) == SMALL["batch_size"] - 2 and set(row["ids"]) <= own_ids for row in schedule)
    others = [task.name for task in cfg.tasks if task.name != "polarity"]
    assert [row["replay"]["task"] for row in schedule] == [others[step % 2] for step in range(len(schedule))]
    for row in schedule:
        train = {example["id"] for example in load_prepared(run, row["replay"]["task"], "train")}
        assert len(set(row["replay"]["ids"])) == 2 and set(row["replay"]["ids"]) <= train
    pooled = {task: {i for row in schedule if row["replay"]["task"] == task for i in row["replay"]["ids"]}
              for task in others}
    assert all(len(ids) <= 5 for ids in pooled.values())  # drawn from a seeded pool of `pool` rows per task
    metrics = read_jsonl(run.expert_metrics("polarity"))[1:]
    assert all("replay_loss" in row and row["replay_loss"] > 0 for row in metrics if "loss" in row)
    manifest = read_manifest(run.expert("polarity"))  # the budget counts every example trained on, replayed or own
    trained = sum(len(row["ids"]) + len(row["replay"]["ids"]) for row in schedule)
    assert manifest["examples"] == trained == SMALL["steps"] * SMALL["batch_size"]


def test_a_replaying_expert_learns_the_other_tasks_answers(tmp_path, cache_dir):
    """The same polarity expert (seed, steps, learning rate) with and without replay: with it, the other tasks' rows it
    replayed get a lower answer loss."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    losses, replayed = {}, None
    for per_step in (2, 0):
        cfg = prepared(tmp_path / f"r{per_step}", cache_dir, learning_rate=2e-2, steps=10,
                       replay={"per_step": per_step, "pool": 4})
        experts.main(cfg, tasks=["polarity"])
        run = RunDir(cfg.resolved_run_dir)
        if per_step:
            replayed = {}
            for row in read_jsonl(run.expert_schedule("polarity")):
                replayed.setdefault(row["replay"]["task"], set()).update(row["replay"]["ids"])
        model, tokenizer = load_lora_model(prepared_model_path(run), LoraSettings(r=4, alpha=8), dtype="float32",
                                           device=CPU, seed=0)
        set_peft_model_state_dict(model, load_file(run.expert_adapter("polarity") / "adapter_model.safetensors"))
        losses[per_step] = {task: float(answer_losses(
            model, tokenizer, cfg.task(task), [row for row in load_prepared(run, task, "train") if row["id"] in ids],
            CPU, use_autocast=False, batch_size=8).mean()) for task, ids in replayed.items()}
    assert all(losses[2][task] < losses[0][task] for task in losses[2]), losses


def test_the_other_tasks_weak_sets_exclude_the_rows_an_expert_replayed(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir, replay={"per_step": 2, "pool": 6})
    experts.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    replayed = {}
    for task in cfg.tasks:
        for row in read_jsonl(run.expert_schedule(task.name)):
            replayed.setdefault(row["replay"]["task"], set()).update(row["replay"]["ids"])
    assert set(replayed) == {task.name for task in cfg.tasks}
    for task in cfg.tasks:
        own = {i for row in read_jsonl(run.expert_schedule(task.name)) for i in row["ids"]}
        assert trained_ids(run, task.name) == own | replayed[task.name]
        assert replayed[task.name] - own  # rows only another expert trained on are excluded too
        weak, _ = sample_weak_set(run, cfg.search.weak, task, seed=0)
        assert not {row["id"] for row in weak} & replayed[task.name]


def test_an_interrupted_expert_with_replay_resumes_to_the_same_adapter_and_batches(tmp_path, cache_dir):
    runs = resumed_like_whole(tmp_path, cache_dir, "aspect3", replay={"per_step": 1, "pool": 6})
    schedules = [[row["replay"] for row in read_jsonl(run.expert_schedule("aspect3"))] for run in runs]
    assert schedules[1] == schedules[0]


def test_replay_is_refused_with_hybrid_lora_a_full_batch_and_without_another_task(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="replay"):
        ExpertsConfig.model_validate({"mode": "hybrid", "replay": {"per_step": 1}})
    with pytest.raises(ValueError, match=r"replay.per_step \(8\) must be below experts.batch_size \(8\)"):
        ExpertsConfig.model_validate({"batch_size": 8, "replay": {"per_step": 8}})
    alone = [{**TINY_TASKS[0], "source": {"path": "{data_root}/{task}/{split}.jsonl"}}]
    cfg = prepared(tmp_path, cache_dir, tasks=alone, replay={"per_step": 1})
    with pytest.raises(ConfigError, match="no other task"):
        experts.main(cfg, tasks=["polarity"])
