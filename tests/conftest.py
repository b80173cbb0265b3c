"""Shared fixtures: tiny data written by the tests, a tiny random Llama, a prepared tiny run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from sentimerge.pipeline.core.config import RunConfig, load_config
from sentimerge.pipeline.core.rundir import RunDir

POSITIVE = ["wonderful", "great", "delightful", "superb", "lovely", "brilliant"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "horrible", "broken"]
NEUTRAL = ["scheduled for monday", "sold in stores", "two hours long"]
SUBJECTS = ["the film", "this phone", "the hotel", "our dinner", "the concert", "that book"]


def tiny_rows(task: str, count: int, seed: int) -> list[dict]:
    """Rows for one of the tiny tasks: `polarity` (2-way), `aspect3` (3-way with aspect and agreement), `intensity`."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        kind = ["positive", "negative", "neutral"][i % (2 if task == "polarity" else 3)]
        word = rng.choice({"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[kind])
        subject = rng.choice(SUBJECTS)
        text = f"{rng.choice(['honestly,', 'i think', 'they said'])} {subject} was {word} #{i}"
        row = {"id": f"{task}-{seed}-{i}", "text": text, "label": kind}
        if task == "aspect3":
            row.update(aspect=subject, meta={"agreement": rng.choice([50, 66, 75, 100])})
        if task == "intensity":
            row["label"] = {"positive": 2.0, "negative": -2.0, "neutral": 0.0}[kind] + rng.uniform(-0.5, 0.5)
        rows.append(row)
    return rows


TINY_TASKS = [
    {"name": "polarity", "kind": "classification", "labels": ["negative", "positive"],
     "instruction": "Is this sentence negative or positive?"},
    {"name": "aspect3", "kind": "classification", "labels": ["negative", "neutral", "positive"],
     "instruction": "What is the sentiment towards the aspect?", "input_fields": ["text", "aspect"], "group": "aspect"},
    {"name": "intensity", "kind": "regression", "range": [-3.0, 3.0], "levels": 5,
     "instruction": "How positive is this sentence, from 0 to 4?"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_tiny_data(root: Path, train: int = 24, dev: int = 12) -> Path:
    for index, task in enumerate(TINY_TASKS):
        write_jsonl(root / task["name"] / "train.jsonl", tiny_rows(task["name"], train, seed=index))
        write_jsonl(root / task["name"] / "dev.jsonl", tiny_rows(task["name"], dev, seed=100 + index))
    return root


def write_tiny_config(folder: Path, *, cache_dir: Path, tasks: list[dict] | None = None, **sections) -> Path:
    """A run config over the tiny tasks (data under `folder/data`), a 2-layer random Llama and `sections`."""
    data_root = write_tiny_data(folder / "data")
    tasks = tasks if tasks is not None else [
        {**task, "source": {"path": "{data_root}/{task}/{split}.jsonl"}} for task in TINY_TASKS]
    config = {"name": "tiny", "seed": 0, "run_dir": str(folder / "run"), "cache_dir": str(cache_dir),
              "base_model": {"tiny": {"num_layers": 2, "hidden_size": 64, "vocab_size": 400}, "dtype": "float32"},
              "data_root": str(data_root), "tasks": tasks, **sections}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session, so the tiny model and downloads are built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_config_path(tmp_path, cache_dir) -> Path:
    return write_tiny_config(tmp_path, cache_dir=cache_dir)


@pytest.fixture
def prepared_tiny(tiny_config_path) -> RunConfig:
    """A tiny run whose `prepare` stage is done."""
    from sentimerge.pipeline import prepare

    cfg = load_config(tiny_config_path)
    prepare.main(cfg)
    return cfg


@pytest.fixture
def tiny_experts(prepared_tiny):
    """The prepared tiny run with a finished random LoRA expert per task: (config, adapter folders, their factors)."""
    from sentimerge.merge.lora import read_adapter
    from tests.test_merge import make_experts

    paths = make_experts(prepared_tiny)
    adapters = {task: read_adapter(RunDir(prepared_tiny.resolved_run_dir).expert_adapter(task)) for task in paths}
    return prepared_tiny, paths, adapters
