"""Hybrid LoRA (`experts.mode: hybrid`) on the tiny model: the routing, the joint training, the per-task adapters it
leaves for stage 2, and the attention averaged into stage 2's start point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sentimerge.experts.config import LoraSettings
from sentimerge.experts.hybrid import genome_coefficients, layer_coefficients, load_hybrid_model
from sentimerge.merge.genome import Genome
from sentimerge.merge.lora import read_adapter
from sentimerge.pipeline import report
from sentimerge.pipeline.cli import main
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl, read_manifest
from sentimerge.pipeline.core.upstream import prepared_model_path
from tests.conftest import write_tiny_config

TASKS = ["polarity", "aspect3", "intensity"]
SECTIONS = {"experts": {"mode": "hybrid", "examples": 8, "dev_examples": 8, "evaluations": 1,
                        "hybrid": {"per_task": 2, "router_dim": 8, "coefficient_examples": 6}},
            "search": {"init": "hybrid", "population": 4, "generations": 1, "weak": {"per_task": 4},
                       "gold": {"per_generation": 4}},
            "finetune": {"steps": 2, "dev_examples": 8}}


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, cache_dir) -> Path:
    folder = tmp_path_factory.mktemp("hybrid")
    config = write_tiny_config(folder, cache_dir=cache_dir, **SECTIONS)
    assert main(["run", str(config)]) == 0
    return config


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, cache_dir) -> str:
    from sentimerge.pipeline import prepare

    cfg = load_config(write_tiny_config(tmp_path_factory.mktemp("base"), cache_dir=cache_dir))
    prepare.main(cfg)
    return prepared_model_path(RunDir(cfg.resolved_run_dir))


def _hybrid(base: str, own_bias: float = 2.0):
    return load_hybrid_model(base, TASKS, LoraSettings(r=4, alpha=8), dim=8, own_bias=own_bias, dtype="float32",
                             device=torch.device("cpu"), seed=0)


def test_the_attention_starts_at_the_prior_and_sums_to_one(tiny_base):
    model, tokenizer = _hybrid(tiny_base, own_bias=2.0)
    routing = model.hybrid_routing
    ids = tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)
    routing.set_task(torch.tensor([0, 2]))
    model(**ids)
    alpha = next(iter(routing._alpha.values()))
    assert alpha.shape == (2, ids["input_ids"].shape[1], 3)
    assert torch.allclose(alpha.sum(-1), torch.ones(alpha.shape[:2]))
    own = np.exp(2.0) / (np.exp(2.0) + 2)  # keys start at zero: the prior alone
    assert alpha[0, :, 0].allclose(torch.tensor(own, dtype=alpha.dtype)) and alpha[1, :, 2].allclose(
        torch.tensor(own, dtype=alpha.dtype))
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert "hybrid_routing" in trainable or any("hybrid_routing" in n for n, p in model.named_parameters()
                                                 if p.requires_grad)
    assert all(any(f"lora_A.{task}" in n for n, p in model.named_parameters() if p.requires_grad) for task in TASKS)


def test_a_one_hot_attention_is_that_tasks_adapter_alone(tiny_base):
    """With the attention pinned to one module, the hybrid model computes what peft computes with only that task's
    adapter active: the routing weighs module outputs and changes nothing else."""
    model, tokenizer = _hybrid(tiny_base, own_bias=60.0)  # softmax of a 60-logit prior: one-hot within 1e-26
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = tokenizer(["a fine film"], return_tensors="pt")
    model.hybrid_routing.set_task(1)
    with torch.no_grad():
        routed = model(**ids).logits
        model.hybrid_routing.remove_hooks()
        model.base_model.set_adapter("aspect3")
        alone = model(**ids).logits
        model.base_model.set_adapter(TASKS)
        summed = model(**ids).logits
    assert torch.allclose(routed, alone, atol=1e-5)
    assert not torch.allclose(routed, summed, atol=1e-3)  # the check can fail: all three modules differ


def test_layer_coefficients_sum_each_tasks_mean_attention():
    attention = {"base_model.model.model.layers.0.self_attn.q_proj": np.array([[0.8, 0.2], [0.4, 0.6]]),
                 "base_model.model.model.layers.0.mlp.up_proj": np.array([[0.5, 0.5], [0.1, 0.9]]),
                 "base_model.model.model.layers.1.mlp.down_proj": np.array([[1.0, 0.0], [0.0, 1.0]])}
    c = layer_coefficients(attention, ["a", "b"], num_layers=2)
    assert c.shape == (2, 2, 2)
    assert c[:, 0, 0] == pytest.approx([1.2, 0.8]) and c[:, 0, 1] == pytest.approx([0.6, 1.4])
    assert c[:, 1, 1] == pytest.approx([1.0, 1.0]) and c[:, 1, 0] == pytest.approx([1.0, 1.0])  # filled from MLP
    genome = Genome(("a", "b"), num_layers=2, group_size=2)
    assert genome_coefficients(c, genome, (0.0, 1.5)) == pytest.approx([(1.2 + 0.6 + 1 + 1) / 4, (0.8 + 1.4 + 2) / 4])
    split = Genome(("a", "b"), num_layers=2, group_size=1, split_attention_mlp=True)
    assert genome_coefficients(c, split, (0.0, 1.0)).reshape(2, 2, 2)[1, 0].tolist() == [0.8, 1.0]  # clipped


def test_hybrid_training_leaves_one_plain_adapter_per_task_and_the_search_starts_from_its_attention(hybrid_run):
    cfg = load_config(hybrid_run)
    run = RunDir(cfg.resolved_run_dir)
    manifest = read_manifest(run.hybrid)
    assert manifest["steps"] == 4 and manifest["examples"] == 24  # 8 examples per task, 2 per task per step
    steps = [row for row in read_jsonl(run.hybrid / "metrics.jsonl") if "task_loss" in row]
    assert len(steps) == 4 and all(set(row["task_loss"]) == set(TASKS) for row in steps)
    shapes = None
    for task in TASKS:
        assert is_done(run.expert(task)) and read_manifest(run.expert(task))["mode"] == "hybrid"
        factors = read_adapter(run.expert_adapter(task))
        found = sorted((f.weight, tuple(f.a.shape), tuple(f.b.shape), f.scale) for f in factors.values())
        shapes = shapes or found
        assert found == shapes and len(found) == 2 * 7  # every projection of both layers, for every task
        ids = json.loads((run.expert(task) / "train_ids.json").read_text())
        assert len(ids) == 8  # 4 steps x 2 of this task, no repeats within a pass
    saved = json.loads(run.hybrid_coefficients.read_text())
    coefficients = np.asarray(saved["coefficients"])
    assert coefficients.shape == (3, 2, 2) and saved["experts"] == TASKS
    assert coefficients.sum(axis=0) == pytest.approx(np.full((2, 2), 3.0), abs=1e-4)  # each task's alpha sums to 1
    baselines = json.loads(run.search_baselines.read_text())
    assert "hybrid" in baselines and "uniform" in baselines
    genome = Genome(tuple(TASKS), 2, cfg.search.layer_group_size, cfg.search.split_attention_mlp)
    assert baselines["hybrid"]["coefficients"] == pytest.approx(
        genome_coefficients(coefficients, genome, cfg.search.bounds).tolist(), abs=1e-6)
    assert "Hybrid LoRA attention coefficients" in (run.root / "results.md").read_text()


def test_hybrid_budget_is_the_experts_examples(tmp_path, cache_dir):
    cfg = load_config(write_tiny_config(tmp_path, cache_dir=cache_dir, **SECTIONS))
    b = report.budgets(cfg)
    assert b["experts_steps_per_task"] == 4 and b["experts_examples_per_task"] == 8 and b["experts_examples"] == 24


def test_search_init_hybrid_needs_hybrid_experts(tmp_path, cache_dir):
    path = write_tiny_config(tmp_path, cache_dir=cache_dir, search={"init": "hybrid"})
    with pytest.raises(ConfigError, match="search.init hybrid .*experts.mode: hybrid"):
        load_config(path)


def test_a_crash_while_writing_the_experts_does_not_train_again(hybrid_run, tmp_path):
    """Killed after the joint training, before every expert folder was written: the next `experts` writes them from
    the finished training (the same adapters), without training again."""
    import shutil

    from sentimerge.pipeline import experts

    shutil.copytree(load_config(hybrid_run).resolved_run_dir, tmp_path / "run")
    cfg = load_config(hybrid_run, run_dir=str(tmp_path / "run"))
    run = RunDir(cfg.resolved_run_dir)
    adapter = (run.expert_adapter("aspect3") / "adapter_model.safetensors").read_bytes()
    metrics = (run.hybrid / "metrics.jsonl").read_bytes()
    shutil.rmtree(run.expert("aspect3"))
    experts.main(cfg)
    assert (run.hybrid / "metrics.jsonl").read_bytes() == metrics
    assert (run.expert_adapter("aspect3") / "adapter_model.safetensors").read_bytes() == adapter
    assert all(is_done(run.expert(task)) for task in TASKS)
