"""Metrics on resamples and the paired bootstrap that says whether one model really beats another."""

from __future__ import annotations

import numpy as np
import pytest

from sentimerge.pipeline.core.metrics import compute_metrics, paired_bootstrap, resampled_metric, resampled_primary
from sentimerge.pipeline.core.tasks import DataSource, TaskSpec

SOURCE = DataSource(path="x.jsonl")
LABELS = ["negative", "neutral", "positive"]


def task(primary: str, kind: str = "classification") -> TaskSpec:
    if kind == "regression":
        return TaskSpec(name="i", kind="regression", range=[-4, 4], instruction="?", source=SOURCE)
    return TaskSpec(name=f"t_{primary}", kind="classification", labels=LABELS, instruction="?", source=SOURCE,
                    primary_metric=primary)


@pytest.mark.parametrize("spec", [task("accuracy"), task("macro_f1"), task("pearson", "regression")],
                         ids=["accuracy", "macro_f1", "pearson"])
def test_each_resample_scores_like_compute_metrics(spec):
    rng = np.random.default_rng(0)
    n = 30
    if spec.kind == "regression":
        gold = rng.uniform(-4, 4, n).tolist()
        predicted = (np.asarray(gold) * 0.5 + rng.normal(0, 2, n)).tolist()
    else:  # "neutral" rare, so some resamples have it neither gold nor predicted
        gold = rng.choice(LABELS, n, p=[0.48, 0.04, 0.48]).tolist()
        predicted = [g if rng.random() < 0.6 else rng.choice(["negative", "positive"]) for g in gold]
    indices = rng.integers(0, n, size=(50, n))
    vectorised = resampled_primary(spec, gold, predicted, indices)
    expected = [compute_metrics(spec, [gold[i] for i in row], [predicted[i] for i in row])["primary"]
                for row in indices]
    np.testing.assert_allclose(vectorised, expected, atol=1e-12)


@pytest.mark.parametrize("kind,metric", [("classification", "accuracy"), ("classification", "macro_f1"),
                                         ("regression", "mse"), ("regression", "pearson")])
def test_every_metric_resamples_like_compute_metrics(kind, metric):
    rng = np.random.default_rng(2)
    spec = task("accuracy" if kind == "classification" else "pearson", kind)  # the primary metric is another one
    n = 40
    if kind == "regression":
        gold = rng.uniform(-1, 1, n).tolist()
        predicted = (np.asarray(gold) * 0.3 + rng.normal(0, 0.5, n)).tolist()
    else:
        gold = rng.choice(LABELS, n).tolist()
        predicted = [g if rng.random() < 0.5 else rng.choice(LABELS) for g in gold]
    indices = rng.integers(0, n, size=(30, n))
    expected = [compute_metrics(spec, [gold[i] for i in row], [predicted[i] for i in row])[metric] for row in indices]
    np.testing.assert_allclose(resampled_metric(spec, metric, gold, predicted, indices), expected, atol=1e-12)


def test_a_metric_of_the_other_kind_of_task_is_refused():
    with pytest.raises(ValueError, match="no metric 'mse' for a classification task"):
        resampled_metric(task("accuracy"), "mse", ["positive"], ["positive"], np.array([[0]]))


def test_a_constant_prediction_has_pearson_zero_on_every_resample():
    spec = task("pearson", "regression")
    values = resampled_primary(spec, [0.0, 1.0, 2.0, 3.0], [1.0] * 4, np.array([[0, 1, 2, 3], [0, 0, 1, 1]]))
    assert values.tolist() == [0.0, 0.0]


def test_the_paired_bootstrap_separates_a_real_lead_from_none():
    rng = np.random.default_rng(1)
    spec, reg = task("accuracy"), task("pearson", "regression")
    gold = {spec.name: rng.choice(LABELS, 200).tolist(), reg.name: rng.uniform(-4, 4, 200).tolist()}
    right = {spec.name: list(gold[spec.name]), reg.name: list(gold[reg.name])}
    noisy = {spec.name: [g if rng.random() < 0.5 else "neutral" for g in gold[spec.name]],
             reg.name: (np.asarray(gold[reg.name]) + rng.normal(0, 4, 200)).tolist()}
    lead = paired_bootstrap([spec, reg], gold, right, noisy, resamples=500, seed=0)
    observed = {spec.name: 1 - compute_metrics(spec, gold[spec.name], noisy[spec.name])["primary"],
                reg.name: 1 - compute_metrics(reg, gold[reg.name], noisy[reg.name])["primary"]}
    for name in observed:
        assert lead["tasks"][name]["difference"] == pytest.approx(observed[name], abs=1e-6)
        assert 0 < lead["tasks"][name]["low"] <= lead["tasks"][name]["high"]
    assert lead["mean"]["difference"] == pytest.approx(np.mean(list(observed.values())), abs=1e-6)
    assert lead["mean"]["p_better"] == 1.0
    same = paired_bootstrap([spec, reg], gold, noisy, noisy, resamples=500, seed=0)
    assert same["mean"] == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_better": 0.0}
    behind = paired_bootstrap([spec, reg], gold, noisy, right, resamples=500, seed=0)
    assert behind["mean"]["high"] < 0 and behind["mean"]["p_better"] == 0.0
    assert paired_bootstrap([spec, reg], gold, right, noisy, resamples=500, seed=0) == lead  # seeded
