"""Difficulty from metadata: per-example signals and per-task signals, registered by name and combined by weights.

An example signal returns one raw "hardness" per example (higher is harder; NaN where it does not apply to that
example), or None when it does not apply to the task at all (no agreement metadata, labels without a polarity).
Each applicable signal is rank-normalised to [0, 1] within the task, so signals on different scales (agreement
percentages, crowd confidences, token counts, losses) combine by their configured weights.

A task signal maps a task's metadata (label count, kind, average length, the base model's zero-shot score) to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.stats import rankdata

from sentimerge.pipeline.core.registry import Registry
from sentimerge.pipeline.core.tasks import TaskSpec


@dataclass
class SignalInputs:
    """What an example signal may look at: the task, its examples, their token lengths, and lazy model losses."""

    task: TaskSpec
    examples: list[dict]
    lengths: list[int]
    base_loss: Callable[[], np.ndarray] | None = None
    label_polarity: dict[str, float] = field(default_factory=dict)


ExampleSignal = Callable[[SignalInputs], "np.ndarray | None"]
SIGNALS: Registry[ExampleSignal] = Registry("difficulty signal")


@SIGNALS.register("agreement")
def agreement(inputs: SignalInputs) -> np.ndarray | None:
    """Low annotator agreement (`meta.agreement`: percentages or a 0..1 confidence) is hard."""
    values = np.array([_number(example.get("meta", {}).get("agreement")) for example in inputs.examples])
    if np.all(np.isnan(values)):
        return None
    return -values


@SIGNALS.register("length")
def length(inputs: SignalInputs) -> np.ndarray:
    """Long inputs are hard (token count of the training input)."""
    return np.asarray(inputs.lengths, dtype=float)


@SIGNALS.register("rarity")
def rarity(inputs: SignalInputs) -> np.ndarray:
    """Examples of rare labels (or rare score levels) are hard: -log of the answer's share in the pool."""
    answers = np.array([inputs.task.answer_index(example["label"]) for example in inputs.examples])
    counts = np.bincount(answers, minlength=len(inputs.task.answers))
    return -np.log(counts[answers] / len(answers))


@SIGNALS.register("lexicon")
def lexicon(inputs: SignalInputs) -> np.ndarray | None:
    """Disagreement between VADER's compound score of the text and the gold label's polarity, in [0, 1]."""
    gold = gold_polarities(inputs.task, inputs.examples, inputs.label_polarity)
    if np.all(np.isnan(gold)):
        return None
    analyzer = vader()
    compound = np.array([analyzer.polarity_scores(example["text"])["compound"] for example in inputs.examples])
    return np.abs(compound - gold) / 2.0


@SIGNALS.register("base_loss")
def base_loss(inputs: SignalInputs) -> np.ndarray | None:
    """The base model's loss on the gold answer (cross-entropy over the task's answers); computed once, cached."""
    return None if inputs.base_loss is None else np.asarray(inputs.base_loss(), dtype=float)


def gold_polarities(task: TaskSpec, examples: list[dict], overrides: dict[str, float]) -> np.ndarray:
    """Each example's gold polarity in [-1, 1] (NaN where its label has none)."""
    if task.kind == "regression":
        low, high = task.range
        return np.array([2.0 * (float(example["label"]) - low) / (high - low) - 1.0 for example in examples])
    polarity = label_polarities(task, overrides)
    return np.array([polarity[example["label"]] for example in examples], dtype=float)


def label_polarities(task: TaskSpec, overrides: dict[str, float]) -> dict[str, float]:
    """A label's polarity: the override for it, else the sign of VADER's score of its answer words.

    A label VADER scores about zero is neutral (0) when the task has both a positive and a negative label, and has no
    polarity (NaN) otherwise: `objective`, `ironic` say nothing about sentiment.
    """
    analyzer = vader()
    scores = {label: analyzer.polarity_scores(task.verbalizers.get(label, label))["compound"] for label in task.labels}
    signs = {label: (math.copysign(1.0, score) if abs(score) >= 0.3 else 0.0) for label, score in scores.items()}
    both = {1.0, -1.0} <= set(signs.values())
    result = {}
    for label in task.labels:
        if label in overrides:
            result[label] = float(overrides[label])
        elif signs[label] != 0.0:
            result[label] = signs[label]
        else:
            result[label] = 0.0 if both and abs(scores[label]) < 0.05 else math.nan
    return result


@lru_cache(maxsize=1)
def vader():
    """The VADER analyser (its lexicon loads once)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their mean rank); missing values take the median's place."""
    values = np.asarray(values, dtype=float).copy()
    missing = np.isnan(values)
    if missing.any():
        values[missing] = np.nanmedian(values)
    if len(values) < 2:
        return np.zeros(len(values))
    return (rankdata(values, method="average") - 1.0) / (len(values) - 1.0)


@dataclass
class Difficulty:
    """Per-example difficulty in [0, 1], the normalised signals it combines, and which signals applied."""

    scores: np.ndarray
    signals: dict[str, np.ndarray]
    weights: dict[str, float]
    skipped: list[str]

    def order(self) -> np.ndarray:
        """Example indices from easiest to hardest (ties keep pool order)."""
        return np.argsort(self.scores, kind="stable")

    def rows(self, examples: list[dict]) -> list[dict]:
        """One JSON row per example, easiest first: id, label, combined difficulty and each signal."""
        rows = []
        for rank, index in enumerate(self.order()):
            signals = {name: round(float(values[index]), 4) for name, values in self.signals.items()}
            rows.append({"rank": rank, "id": examples[index]["id"], "label": examples[index]["label"],
                         "difficulty": round(float(self.scores[index]), 4), **signals})
        return rows


def example_difficulty(weights: dict[str, float], inputs: SignalInputs) -> Difficulty:
    """Combine the signals with positive weight; those that do not apply to the task are skipped (and reported)."""
    signals, used, skipped = {}, {}, []
    for name, weight in weights.items():
        if weight <= 0:
            continue
        raw = SIGNALS.get(name)(inputs)
        if raw is None or np.all(np.isnan(raw)):
            skipped.append(name)
            continue
        signals[name] = rank_normalise(raw)
        used[name] = weight
    if not used:
        return Difficulty(np.zeros(len(inputs.examples)), {}, {}, skipped)
    total = sum(used.values())
    scores = sum(weight * signals[name] for name, weight in used.items()) / total
    return Difficulty(np.asarray(scores, dtype=float), signals, used, skipped)


@dataclass(frozen=True)
class TaskFacts:
    """Task-level metadata: the spec, the average input length in tokens and the base model's zero-shot score."""

    task: TaskSpec
    average_length: float
    zero_shot: float | None


TaskSignal = Callable[[TaskFacts], "float | None"]
TASK_SIGNALS: Registry[TaskSignal] = Registry("task difficulty signal")


def _choices(task: TaskSpec) -> int:
    return len(task.answers)


@TASK_SIGNALS.register("labels")
def label_count(facts: TaskFacts) -> float:
    """More answers to choose from is harder: 1 - 1/k (chance error rate)."""
    return 1.0 - 1.0 / _choices(facts.task)


@TASK_SIGNALS.register("regression")
def is_regression(facts: TaskFacts) -> float:
    return 1.0 if facts.task.kind == "regression" else 0.0


@TASK_SIGNALS.register("length")
def average_length(facts: TaskFacts) -> float:
    """Average text tokens, as a share of the task's truncation length."""
    return min(1.0, facts.average_length / facts.task.max_text_tokens)


@TASK_SIGNALS.register("zero_shot")
def zero_shot(facts: TaskFacts) -> float | None:
    """1 - the base model's zero-shot score above chance (accuracy rescaled so chance is 0; pearson clipped at 0)."""
    if facts.zero_shot is None:
        return None
    score = facts.zero_shot
    if facts.task.primary == "accuracy":
        chance = 1.0 / _choices(facts.task)
        score = (score - chance) / (1.0 - chance)
    return 1.0 - min(1.0, max(0.0, score))


def task_difficulty(weights: dict[str, float], facts: TaskFacts) -> dict:
    """{"difficulty": weighted mean in [0, 1], "signals": each applicable signal's value}."""
    values = {}
    for name, weight in weights.items():
        if weight > 0:
            value = TASK_SIGNALS.get(name)(facts)
            if value is not None:
                values[name] = float(value)
    total = sum(weights[name] for name in values)
    combined = sum(weights[name] * value for name, value in values.items()) / total if total else 0.0
    return {"difficulty": round(combined, 4), "signals": {k: round(v, 4) for k, v in values.items()}}
