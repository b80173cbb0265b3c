"""Stage 3 started as the merge itself (`finetune.init: experts`): the experts' LoRA factors stacked and scaled by
the chosen coefficients are one LoRA whose delta is the task-arithmetic merge's, trained on every task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sentimerge.merge.engine import InMemoryMerge, merge_as_lora
from sentimerge.merge.genome import Genome
from sentimerge.merge.lora import DenseDelta
from sentimerge.merge.methods import get_method
from sentimerge.pipeline import export, finetune
from sentimerge.pipeline.cli import main
from sentimerge.pipeline.core.candidates import load_search_inputs
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import ModelError, SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, read_manifest
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path
from tests.conftest import write_tiny_config
from tests.test_merge import load_base


def _genome(adapters, cfg, group_size: int = 1) -> Genome:
    return Genome(tuple(adapters), load_base(cfg).config.num_hidden_layers, group_size)


def test_the_stacked_factors_are_the_task_arithmetic_merge(tiny_experts):
    cfg, _, adapters = tiny_experts
    genome = _genome(adapters, cfg)
    coefficients = np.random.default_rng(3).uniform(-0.5, 1.5, genome.size)
    merger = InMemoryMerge(load_base(cfg), adapters, genome, get_method("task_arithmetic"))
    factors, rank = merge_as_lora(adapters, genome, coefficients, scale=0.5)
    assert rank == sum(next(iter(a.values())).a.shape[0] for a in adapters.values())  # 3 experts of rank 4
    merged = merger.merged_state(coefficients)
    assert set(factors) == set(merged)
    for weight, (a, b) in factors.items():
        assert a.shape[0] == b.shape[1] == rank
        base = merger.targets[[t.weight for t in merger.targets].index(weight)].base.float()
        torch.testing.assert_close(0.5 * b @ a, merged[weight] - base, atol=1e-5, rtol=1e-4)


def test_a_weight_fewer_experts_adapt_is_padded_with_zeros_that_stay_inert(tiny_experts):
    cfg, _, adapters = tiny_experts
    first, *others = adapters
    weight = min(adapters[first])
    fewer = {**adapters, first: {w: d for w, d in adapters[first].items() if w != weight}}
    genome = _genome(fewer, cfg, group_size=2)
    coefficients = genome.filled(0.7)
    factors, rank = merge_as_lora(fewer, genome, coefficients, scale=2.0)
    a, b = factors[weight]
    ranks = [fewer[name][weight].a.shape[0] for name in others]
    assert a.shape[0] == rank and not a[sum(ranks):].any() and not b[:, sum(ranks):].any()
    expected = sum(0.7 * fewer[name][weight].delta() for name in others)
    torch.testing.assert_close(2.0 * b @ a, expected, atol=1e-5, rtol=1e-4)


def test_a_dense_expert_is_refused_by_name(tiny_experts):
    cfg, _, adapters = tiny_experts
    name = next(iter(adapters))
    weight = min(adapters[name])
    dense = {**adapters, name: {**adapters[name], weight: DenseDelta(weight, adapters[name][weight].delta())}}
    with pytest.raises(ModelError, match=rf"expert {name}: .* dense delta"):
        merge_as_lora(dense, _genome(dense, cfg), _genome(dense, cfg).filled(1.0), scale=1.0)


@pytest.mark.parametrize(("section", "message"), [
    ({"finetune": {"init": "experts", "start": "base"}}, "set finetune.start: merged"),
    ({"finetune": {"init": "experts"}, "search": {"method": "ties"}}, "not ties"),
])
def test_settings_it_cannot_honour_are_refused_when_the_config_loads(tmp_path, cache_dir, section, message):
    path = write_tiny_config(tmp_path, cache_dir=cache_dir, **section)
    with pytest.raises(Exception, match=message):
        load_config(path)


SECTIONS = {"experts": {"steps": 4, "batch_size": 4, "dev_examples": 8},
            "search": {"population": 4, "generations": 1, "weak": {"per_task": 4}, "gold": {"per_generation": 0},
                       "dtype": "float32"},
            "finetune": {"steps": 3, "dev_examples": 8, "evaluations": 1, "init": "experts",
                         "lora": {"r": 4, "alpha": 8}},
            "export": {"dtype": "float32"}}


def test_stage_3_starts_as_the_chosen_merge_and_exports_from_the_experts_base(tmp_path, cache_dir):
    config = write_tiny_config(tmp_path, cache_dir=cache_dir, **SECTIONS)
    assert main(["run", str(config)]) == 0
    cfg = load_config(config)
    run = RunDir(cfg.resolved_run_dir)
    manifest = read_manifest(run.finetune)
    assert manifest["init"] == "experts" and manifest["start"] == prepared_model_path(run)

    # before training, the adapter on the experts' base is the merge stage 2 chose
    model, tokenizer, adapters, genome = load_search_inputs(cfg, run)
    selected = np.asarray(json.loads(run.search_selected.read_text())["coefficients"])
    InMemoryMerge(model, adapters, genome, get_method("task_arithmetic")).apply(selected)
    warm, _ = finetune.merge_as_adapter(cfg, run, manifest["start"], seed=0)
    from peft import PeftConfig

    ids = tokenizer([row["text"] for row in load_prepared(run, "polarity", "dev")[:4]], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        torch.testing.assert_close(warm.float()(**ids).logits, model.float()(**ids).logits, atol=1e-4, rtol=1e-4)
    assert PeftConfig.from_pretrained(run.finetune_adapter).r == 3 * cfg.experts.lora.r  # the 3 experts' ranks

    # training moved it, and the export is the experts' base with the trained adapter merged in
    exported = export.merged_model(manifest["start"], run.finetune_adapter, cfg)
    with torch.no_grad():
        assert not torch.allclose(exported(**ids).logits, model(**ids).logits, atol=1e-4)
    assert json.loads((run.root / "export" / "provenance.json").read_text())["merged_model"] == manifest["start"]

    # the same stage 3 with the other init is another model: refused, not reported as done
    fresh = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"init": "fresh"})})
    with pytest.raises(SentimergeError, match="finished with another config"):
        finetune.main(fresh)
    # the baselines and the shared adapter train a fresh LoRA from the base whatever stage 3's init: the report's
    # multi-task LoRA is not built from the experts, and the shared adapter is not invalidated by the option
    from sentimerge.pipeline import report
    from sentimerge.pipeline.experts import shared_fingerprint

    assert report.multitask_variant(cfg, run, 4).cfg.finetune.init == "fresh"
    assert shared_fingerprint(cfg, run) == shared_fingerprint(fresh, run)
