"""Fitness on weak labels: the mean over tasks of each task's chance-normalised primary metric.

Normalisation puts tasks on one scale where 0 is chance and 1 is perfect agreement with the weak labels: accuracy
and macro-F1 become (m - 1/K) / (1 - 1/K) for K classes; Pearson correlation is already 0 at chance.
Scoring is the shared scorer (`sentimerge.pipeline.core.scoring.score_prompts`) on prompts tokenised once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from sentimerge.pipeline.core.metrics import compute_metrics
from sentimerge.pipeline.core.prompts import answer_tokens, prompt_ids
from sentimerge.pipeline.core.scoring import TaskScores, score_prompts
from sentimerge.pipeline.core.tasks import TaskSpec


class ScoringFailed(RuntimeError):
    """A candidate whose scores are not finite."""


@dataclass
class ScoredSet:
    """One task's examples, tokenised once, with the labels they are scored against."""

    task: TaskSpec
    examples: list[dict]
    prompts: list[list[int]]
    answers: tuple[tuple[int, ...], ...]
    labels: list
    weight: float = 1.0


def encode_set(tokenizer, task: TaskSpec, examples: list[dict], labels: list, weight: float = 1.0) -> ScoredSet:
    prompts = [prompt_ids(tokenizer, task, example) for example in examples]
    return ScoredSet(task, examples, prompts, answer_tokens(tokenizer, task).answers, list(labels), weight)


def predict(model, tokenizer, scored: ScoredSet, batch_size: int) -> list:
    logprobs = score_prompts(model, scored.prompts, scored.answers, pad_id=tokenizer.pad_token_id,
                             batch_size=batch_size)
    if not torch.isfinite(logprobs).all():
        raise ScoringFailed(f"task {scored.task.name}: scores are not finite")
    return TaskScores(scored.task, logprobs).predictions


def normalised(task: TaskSpec, value: float) -> float:
    if task.kind == "classification" and task.primary in ("accuracy", "macro_f1"):
        chance = 1.0 / len(task.labels)
        return (value - chance) / (1.0 - chance)
    return value


def evaluate(model, tokenizer, sets: list[ScoredSet], batch_size: int) -> dict:
    """Score every set: the weighted fitness, each task's metric and normalised metric, examples, seconds and the
    predictions (per task, in the sets' example order)."""
    started = time.perf_counter()
    tasks, predictions = {}, {}
    for scored in sets:
        predicted = predictions[scored.task.name] = predict(model, tokenizer, scored, batch_size)
        metric = compute_metrics(scored.task, scored.labels, predicted)["primary"]
        if not math.isfinite(metric):
            raise ScoringFailed(f"task {scored.task.name}: metric is not finite")
        tasks[scored.task.name] = {"metric": round(metric, 6), "normalised": round(normalised(scored.task, metric), 6)}
    total = sum(s.weight for s in sets)
    fitness = sum(s.weight * tasks[s.task.name]["normalised"] for s in sets) / total
    return {"fitness": round(fitness, 6), "tasks": tasks, "examples": sum(len(s.examples) for s in sets),
            "seconds": time.perf_counter() - started, "predictions": predictions}
