"""Task metrics (scikit-learn and scipy do the arithmetic) and the cross-task aggregate."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error

from pipeline.tasks import TaskSpec


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
