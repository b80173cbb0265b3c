"""Task metrics (scikit-learn and scipy do the arithmetic) and the cross-task aggregate."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error

from sentimerge.pipeline.core.tasks import CLASSIFICATION_METRICS, REGRESSION_METRICS, TaskSpec


def compute_metrics(task: TaskSpec, gold: list, predicted: list) -> dict[str, float]:
    """Every metric of `task` for the given gold labels and predictions."""
    if task.kind == "classification":
        values = {
            "accuracy": float(accuracy_score(gold, predicted)),
            "macro_f1": float(f1_score(gold, predicted, labels=task.labels, average="macro", zero_division=0)),
        }
    else:
        gold_values, predicted_values = np.asarray(gold, dtype=float), np.asarray(predicted, dtype=float)
        values = {"mse": float(mean_squared_error(gold_values, predicted_values)), "pearson": _correlation(
            pearsonr, gold_values, predicted_values)}
    return {name: values[name] for name in task.metric_names} | {"primary": values[task.primary]}


def _correlation(function, a: np.ndarray, b: np.ndarray) -> float:
    """A correlation that is 0, not NaN, when either side is constant (a model that always answers the same)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    value = float(function(a, b)[0])
    return 0.0 if math.isnan(value) else value


def spearman(a: list[float], b: list[float]) -> float:
    return _correlation(spearmanr, np.asarray(a, dtype=float), np.asarray(b, dtype=float))


def resampled_primary(task: TaskSpec, gold: list, predicted: list, indices: np.ndarray) -> np.ndarray:
    """The primary metric on each resample of the examples: `indices` is [resamples, n] rows of example indices.

    Vectorised over resamples (a bootstrap needs thousands); equals `compute_metrics(...)["primary"]` on each row.
    """
    return resampled_metric(task, task.primary, gold, predicted, indices)


def resampled_metric(task: TaskSpec, metric: str, gold: list, predicted: list, indices: np.ndarray) -> np.ndarray:
    """Metric `metric` of `task` on each resample: `indices` is [resamples, n] rows of example indices; returns
    [resamples]. Equals `compute_metrics(...)[metric]` on each row.

    Raises ValueError for a metric of the other kind of task (MSE of a classification task, say)."""
    known = CLASSIFICATION_METRICS if task.kind == "classification" else REGRESSION_METRICS
    if metric not in known:
        raise ValueError(f"task {task.name}: no metric {metric!r} for a {task.kind} task (one of {', '.join(known)})")
    if metric == "mse":
        g, p = np.asarray(gold, dtype=float)[indices], np.asarray(predicted, dtype=float)[indices]
        return ((g - p) ** 2).mean(1)
    if metric == "pearson":
        g, p = np.asarray(gold, dtype=float)[indices], np.asarray(predicted, dtype=float)[indices]
        g, p = g - g.mean(1, keepdims=True), p - p.mean(1, keepdims=True)
        denominator = np.sqrt((g * g).sum(1) * (p * p).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, (g * p).sum(1) / np.where(denominator > 0, denominator, 1), 0.0)
    g, p = np.asarray(gold, dtype=object), np.asarray(predicted, dtype=object)
    if metric == "accuracy":
        return (g == p)[indices].mean(1)
    f1 = []
    for label in task.labels:  # macro-F1 over the task's labels; a class never gold nor predicted scores 0
        true, said = (g == label)[indices], (p == label)[indices]
        tp = (true & said).sum(1)
        denominator = true.sum(1) + said.sum(1)
        f1.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0))
    return np.mean(f1, axis=0)


def bootstrap_rows(tasks: list[TaskSpec], gold: dict[str, list], *, resamples: int = 2000,
                   seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, the rows of a paired bootstrap: (identity (1, n), resampled indices (resamples, n)), drawn with
    replacement, task after task from one generator seeded with `seed`; both models of a comparison are scored on
    the same rows."""
    rng = np.random.default_rng(seed)
    rows = {}
    for task in tasks:
        n = len(gold[task.name])
        rows[task.name] = (np.arange(n)[None], rng.integers(0, n, size=(resamples, n)))
    return rows


def interval(observed: float, draws: np.ndarray, level: float = 0.95) -> dict:
    """The observed difference, the percentile interval of its resampled values at `level` and the share of
    resamples above zero (`p_better`)."""
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return {"difference": round(float(observed), 6), "low": round(float(low), 6), "high": round(float(high), 6),
            "p_better": round(float((draws > 0).mean()), 4)}


def paired_bootstrap(tasks: list[TaskSpec], gold: dict[str, list], a: dict[str, list], b: dict[str, list], *,
                     resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """How sure is "model a beats model b" on the same examples? A paired bootstrap of the primary metric.

    Each task's examples are resampled with replacement (the same rows for both models, `bootstrap_rows`); the
    difference a - b of each task's primary metric and of their mean over tasks (the tables' `mean`) is computed on
    every resample. Returns the observed differences, their percentile interval at `level` and the share of
    resamples where a is better (> 0), per task and for the mean.
    """
    per_task, observed = {}, {}
    rows = bootstrap_rows(tasks, gold, resamples=resamples, seed=seed)
    for task in tasks:
        identity, indices = rows[task.name]
        observed[task.name] = float(resampled_primary(task, gold[task.name], a[task.name], identity)[0]
                                    - resampled_primary(task, gold[task.name], b[task.name], identity)[0])
        per_task[task.name] = (resampled_primary(task, gold[task.name], a[task.name], indices)
                               - resampled_primary(task, gold[task.name], b[task.name], indices))
    result = {"mean": interval(float(np.mean(list(observed.values()))), np.mean(list(per_task.values()), axis=0),
                               level)}
    result["tasks"] = {name: interval(observed[name], draws, level) for name, draws in per_task.items()}
    return {**result, "resamples": resamples, "level": level, "seed": seed}
