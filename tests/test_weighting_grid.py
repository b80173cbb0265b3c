"""The weighting grid's paired comparisons (benchmarks/weighting_grid.py): the figures DAO's claim is judged by."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.weighting_grid import paired_changes
from sentimerge.pipeline.core.tasks import DataSource, TaskSpec

SOURCE = DataSource(path="x.jsonl")
LABELS = ["negative", "neutral", "positive"]
TASKS = [TaskSpec(name="cls", kind="classification", labels=LABELS, instruction="?", source=SOURCE,
                  primary_metric="macro_f1"),
         TaskSpec(name="reg", kind="regression", range=[-1, 1], instruction="?", source=SOURCE)]


def _data(seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    gold = {"cls": rng.choice(LABELS, n).tolist(), "reg": rng.uniform(-1, 1, n).tolist()}
    return rng, gold


def test_a_model_against_itself_changes_nothing_with_a_zero_interval():
    rng, gold = _data()
    model = {"cls": rng.choice(LABELS, 200).tolist(), "reg": (np.asarray(gold["reg"]) + rng.normal(0, .3, 200)).tolist()}
    changes = paired_changes(TASKS, gold, model, model, seed=0)
    assert set(changes) == {"primary", "mse_pct:reg", "accuracy_points", "macro_f1_points"}
    for interval in changes.values():
        assert interval == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_better": 0.0}


def test_the_changes_equal_their_definitions_and_a_clear_lead_has_an_interval_clear_of_zero():
    rng, gold = _data(1)
    truth = np.asarray(gold["reg"])
    noise = rng.normal(0, 1, 200)
    better = {"cls": list(gold["cls"]), "reg": (truth + 0.2 * noise).tolist()}  # right on every class example
    worse = {"cls": [g if i % 2 else LABELS[(LABELS.index(g) + 1) % 3] for i, g in enumerate(gold["cls"])],
             "reg": (truth + 0.4 * noise).tolist()}
    changes = paired_changes(TASKS, gold, better, worse, seed=3)
    accuracy_worse = np.mean([b == g for b, g in zip(worse["cls"], gold["cls"])])
    assert changes["accuracy_points"]["difference"] == pytest.approx(100 * (1 - accuracy_worse), abs=1e-4)
    assert changes["mse_pct:reg"]["difference"] == pytest.approx(-75.0, abs=1e-3)  # (0.2 / 0.4)^2 = 1/4 of the MSE
    assert changes["mse_pct:reg"]["high"] < 0 < changes["accuracy_points"]["low"]
    assert changes["primary"]["low"] > 0
    for interval in changes.values():
        assert interval["low"] <= interval["difference"] <= interval["high"]


def test_a_weighting_spec_gives_the_strategy_its_options_and_the_cell_a_label_of_its_own():
    from benchmarks.weighting_grid import parse_weighting

    assert parse_weighting("famo") == ("famo", "famo", {})
    assert parse_weighting("famo:floor=0.1") == ("famo-floor0.1", "famo", {"floor": 0.1})
    assert parse_weighting("famo:floor=0.5:lr=0.01") == ("famo-floor0.5-lr0.01", "famo", {"floor": 0.5, "lr": 0.01})
    with pytest.raises(SystemExit, match="key=number"):
        parse_weighting("famo:floor")


def test_a_cell_with_options_trains_that_strategy_with_them(prepared_tiny):
    from benchmarks.weighting_grid import cell_variant
    from sentimerge.pipeline.core.rundir import RunDir

    run = RunDir(prepared_tiny.resolved_run_dir)
    variant = cell_variant(prepared_tiny, run, "famo:floor=0.1", "level_ce", 3)
    weighting = variant.cfg.finetune.weighting
    assert (weighting.name, weighting.options, variant.cfg.finetune.seed) == ("famo", {"floor": 0.1}, 3)
    assert variant.folder.name == "ablation-famo-floor0.1-level_ce-seed3"
    plain = cell_variant(prepared_tiny, run, "famo", "level_ce", 3)
    assert plain.cfg.finetune.weighting.options == {} and plain.folder != variant.folder
