"""In-context demonstrations (MEM-MCL's easiest-first examples before the question): drawn, validated, prompted."""

from __future__ import annotations

import pytest
import torch
import yaml

from sentimerge.curriculum.signals import SignalInputs, example_difficulty
from sentimerge.merge.config import WeakConfig
from sentimerge.merge.weak import sample_weak_set
from sentimerge.pipeline import demonstrations, prepare
from sentimerge.pipeline.cli import main as cli
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.data import load_task_splits, sample_examples
from sentimerge.pipeline.core.models import load_model
from sentimerge.pipeline.core.prompts import chat_messages, prompt_ids, training_example
from sentimerge.pipeline.core.rundir import RunDir
from sentimerge.pipeline.core.scoring import score_task
from sentimerge.pipeline.core.tasks import TaskSpec
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path
from tests.conftest import TINY_TASKS, write_tiny_config

SOURCE = {"path": "/nowhere/{split}.jsonl"}


def _with_demos(task: TaskSpec, demos: list[dict]) -> TaskSpec:
    return TaskSpec.model_validate({**task.model_dump(mode="json", exclude_unset=True), "demonstrations": demos})


def test_a_demonstration_must_fit_its_task():
    polarity, aspect3, intensity = ({**spec, "source": SOURCE} for spec in TINY_TASKS)
    with pytest.raises(ValueError, match="demonstration 1: label 'neutral' is not one of"):
        TaskSpec.model_validate({**polarity, "demonstrations": [{"text": "ok", "label": "neutral"}]})
    with pytest.raises(ValueError, match="demonstration 2: label 9.0 is not a number in"):
        TaskSpec.model_validate({**intensity, "demonstrations": [{"text": "a", "label": 1.0},
                                                                 {"text": "b", "label": 9.0}]})
    with pytest.raises(ValueError, match="asks about an aspect"):
        TaskSpec.model_validate({**aspect3, "demonstrations": [{"text": "ok", "label": "neutral"}]})
    # none by default, and then not hashed: runs made before the field existed keep their fingerprints
    assert "demonstrations" not in TaskSpec.model_validate(polarity).decisive()


def test_demonstrations_come_before_the_question_when_asking_and_not_when_teaching(prepared_tiny):
    run = RunDir(prepared_tiny.resolved_run_dir)
    model, tokenizer = load_model(prepared_model_path(run), dtype="float32")
    plain = prepared_tiny.task("aspect3")
    train, dev = load_prepared(run, "aspect3", "train"), load_prepared(run, "aspect3", "dev")
    shown = _with_demos(plain, [{"text": row["text"], "aspect": row["aspect"], "label": row["label"]}
                                for row in train[:2]])
    messages = chat_messages(tokenizer, shown, dev[0])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[2]["content"] == train[0]["label"] and train[0]["text"] in messages[1]["content"]
    assert dev[0]["text"] in messages[-1]["content"]
    assert training_example(tokenizer, shown, dev[0]) == training_example(tokenizer, plain, dev[0])
    with_demos, without = prompt_ids(tokenizer, shown, dev[0]), prompt_ids(tokenizer, plain, dev[0])
    assert len(with_demos) > len(without)
    # scoring (evaluation, search fitness, predict) asks with them: the answers' log-probabilities move
    scores = score_task(model, tokenizer, shown, dev[:6]).logprobs
    assert not torch.allclose(scores, score_task(model, tokenizer, plain, dev[:6]).logprobs)


def test_drawn_demonstrations_are_stratified_outside_dev_and_easiest_first(tmp_path, cache_dir):
    cfg = load_config(write_tiny_config(tmp_path, cache_dir=cache_dir))
    task = cfg.task("aspect3")
    splits = load_task_splits(task, data_root=cfg.data_root, cache_dir=cfg.resolved_cache_dir, seed=0)
    signals = {"agreement": 1.0, "length": 0.5, "rarity": 0.5, "lexicon": 1.0, "base_loss": 1.0}
    drawn = demonstrations.draw_demonstrations(task, splits, 3, seed=0, pool=16, signals=signals, label_polarity={})
    assert sorted(d["label"] for d in drawn) == ["negative", "neutral", "positive"]  # k = answers: each once
    dev_texts = {row["text"] for row in splits["dev"]}
    assert all(d["text"] not in dev_texts and d["aspect"] for d in drawn)
    # easiest first by the model-free difficulty of the pool they came from (base_loss needs a model: left out)
    pool = sample_examples(splits["train"], 16, 0, "aspect3/demonstrations")
    inputs = SignalInputs(task, pool, [len(row["text"].split()) for row in pool])
    scores = example_difficulty({k: v for k, v in signals.items() if k != "base_loss"}, inputs).scores
    rank = {row["text"]: scores[i] for i, row in enumerate(pool)}
    assert [rank[d["text"]] for d in drawn] == sorted(rank[d["text"]] for d in drawn)
    assert demonstrations.draw_demonstrations(task, splits, 3, seed=0, pool=16, signals=signals,
                                              label_polarity={}) == drawn  # seeded
    others = [demonstrations.draw_demonstrations(task, splits, 3, seed=s, pool=16, signals=signals,
                                                 label_polarity={}) for s in (1, 2, 3)]
    assert any(other != drawn for other in others)


def test_the_command_writes_a_tasks_file_a_config_runs_with_and_never_overwrites(tmp_path, cache_dir, capsys):
    config = write_tiny_config(tmp_path, cache_dir=cache_dir)
    out = tmp_path / "tasks_k2.yaml"
    assert cli(["demonstrations", str(config), "--k", "2", "--out", str(out)]) == 0
    raw = yaml.safe_load(config.read_text())
    raw["tasks"] = str(out)
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    assert [len(task.demonstrations) for task in cfg.tasks] == [2, 2, 2]
    assert isinstance(cfg.task("intensity").demonstrations[0].label, float)
    assert cli(["demonstrations", str(config), "--k", "2", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert cli(["demonstrations", str(config), "--k", "0", "--out", str(out), "--force"]) == 0
    assert all(not task.demonstrations for task in load_config(config).tasks)


def test_the_weak_set_never_draws_a_demonstrations_row(tmp_path, cache_dir):
    cfg = load_config(write_tiny_config(tmp_path, cache_dir=cache_dir))
    prepare.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    train = load_prepared(run, "polarity", "train")
    shown = _with_demos(cfg.task("polarity"), [{"text": row["text"], "label": row["label"]} for row in train[:3]])
    weak = WeakConfig(per_task=len(train), split="train")
    examples, summary = sample_weak_set(run, weak, shown, 0)
    assert summary["excluded_demonstrations"] == 3 and len(examples) == len(train) - 3
    assert not {row["text"] for row in train[:3]} & {row["text"] for row in examples}
    assert "excluded_demonstrations" not in sample_weak_set(run, weak, cfg.task("polarity"), 0)[1]
