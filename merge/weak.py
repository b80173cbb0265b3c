"""The weak-label set: which examples every candidate is scored on, and the weak labellers that label them.

Sampling rule: per task, `weak.per_task` rows drawn with the run's seed (salt `<task>/weak`) from `weak.split`
(train by default, never dev). From the train split, the rows the task's expert trained on are excluded: the ids in
stage 1's schedule log (`<run>/experts/<task>/schedule.jsonl`, the `ids` of every step), or, for an expert made
elsewhere, the list in `<run>/experts/<task>/train_ids.json`. The weak set's summary records whether that check was
possible. The held-out selection set (`search.select`) is drawn the same way from the rows the weak set left.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.data import sample_examples
from pipeline.errors import SentimergeError
from pipeline.prepare import load_prepared
from pipeline.registry import Registry
from pipeline.rundir import RunDir, read_jsonl
from pipeline.tasks import TaskSpec

log = logging.getLogger("sentimerge.search")

ExpertPredict = Callable[[TaskSpec, list[dict]], list]


@dataclass(frozen=True)
class Labeller:
    """`label(task, examples, expert_predict, polarity)` gives one weak label per example; `problem(task, polarity)`
    says if it cannot. `polarity` is `search.weak.label_polarity` (label -> polarity in [-1, 1], for the lexicon)."""

    name: str
    label: Callable[[TaskSpec, list[dict], ExpertPredict, dict[str, float]], list]
    problem: Callable[[TaskSpec, dict[str, float]], str | None] = lambda task, polarity: None
    needs_experts: bool = False


LABELLERS: Registry[Labeller] = Registry("weak labeller")


def get_labeller(name: str) -> Labeller:
    return LABELLERS.get(name)


def _expert_labels(task: TaskSpec, examples: list[dict], expert_predict: ExpertPredict, polarity) -> list:
    return expert_predict(task, examples)


def _gold_labels(task: TaskSpec, examples: list[dict], expert_predict: ExpertPredict, polarity) -> list:
    return [example["label"] for example in examples]


def _placed(task: TaskSpec, polarity: dict[str, float]) -> dict[str, float]:
    """The task's labels that have a polarity (`polarity`, else VADER's score of the label word), with it."""
    from curriculum.signals import label_polarities

    return {label: value for label, value in label_polarities(task, polarity).items() if not math.isnan(value)}


def _lexicon_problem(task: TaskSpec, polarity: dict[str, float]) -> str | None:
    if "aspect" in task.input_fields:
        return "lexicon cannot label aspect-based tasks (VADER ignores the aspect)"
    if task.kind == "regression":
        return None
    polarities = _placed(task, polarity)
    if not (any(value > 0 for value in polarities.values()) and any(value < 0 for value in polarities.values())):
        return (f"lexicon needs a positive and a negative label (labels: {task.labels}; polarities: {polarities}); "
                "give them in search.weak.label_polarity")
    groups: dict[float, list[str]] = {}
    for label, value in polarities.items():
        groups.setdefault(value, []).append(label)
    shared = "; ".join(f"{', '.join(labels)}: {value:g}" for value, labels in groups.items() if len(labels) > 1)
    if shared:
        return (f"lexicon cannot tell apart labels of equal polarity ({shared}); give them distinct ones in "
                "search.weak.label_polarity")
    return None


def _lexicon_labels(task: TaskSpec, examples: list[dict], expert_predict: ExpertPredict,
                    polarity: dict[str, float]) -> list:
    """VADER's compound score c: for classification, |c| < 0.05 is the neutral label (polarity 0) where the task has
    one, otherwise the label of c's sign whose polarity is nearest to c (labels' polarities: `polarity`, else VADER's
    score of the label words, as the curriculum's lexicon signal reads them); for regression, c linearly onto the
    range."""
    from curriculum.signals import vader

    analyser = vader()
    compounds = [analyser.polarity_scores(example["text"])["compound"] for example in examples]
    if task.kind == "regression":
        low, high = task.range
        return [low + (high - low) * (c + 1) / 2 for c in compounds]
    polarities = _placed(task, polarity)
    neutral = next((label for label, value in polarities.items() if value == 0), None)
    labels = []
    for c in compounds:
        if neutral is not None and abs(c) < 0.05:
            labels.append(neutral)
            continue
        side = [label for label, value in polarities.items() if (value > 0 if c >= 0 else value < 0)]
        labels.append(min(side, key=lambda label: abs(polarities[label] - c)))
    return labels


for _labeller in (Labeller("expert", _expert_labels, needs_experts=True), Labeller("gold", _gold_labels),
                  Labeller("lexicon", _lexicon_labels, _lexicon_problem)):
    LABELLERS.register(_labeller.name)(_labeller)


def labeller_for(weak, task: TaskSpec) -> Labeller:
    return get_labeller(weak.labellers.get(task.name, weak.labeller))


def check_labellers(weak, tasks: list[TaskSpec]) -> list[str]:
    """Problems with the configured labellers and weights for these tasks (checked before models load)."""
    names = {task.name for task in tasks}
    issues = [f"search.weak.labellers: no task named {name!r}" for name in weak.labellers if name not in names]
    issues += [f"search.weak.weights: no task named {name!r}" for name in weak.weights if name not in names]
    for task in tasks:
        problem = labeller_for(weak, task).problem(task, weak.label_polarity)
        if problem:
            issues.append(f"task {task.name}: {problem}")
    return issues


def trained_ids(run: RunDir, task: str) -> set[str] | None:
    """Ids of the train rows the task's expert trained on; None when the expert does not say."""
    schedule, listed = run.expert_schedule(task), run.expert(task) / "train_ids.json"
    if schedule.is_file():
        return {identifier for row in read_jsonl(schedule) for identifier in row.get("ids", [])}
    if listed.is_file():
        return set(json.loads(listed.read_text(encoding="utf-8")))
    return None


def _pool(run: RunDir, weak, task: TaskSpec) -> tuple[list[dict], dict]:
    """The rows a weak set may draw from (the expert's training rows excluded when known) and how they were found."""
    pool = load_prepared(run, task.name, weak.split)
    excluded, checked = 0, weak.split != "train"
    trained = trained_ids(run, task.name) if weak.split == "train" else None
    if trained is not None:
        kept = [example for example in pool if example["id"] not in trained]
        excluded, checked, pool = len(pool) - len(kept), True, kept
    return pool, {"split": weak.split, "pool": len(pool), "excluded_expert_rows": excluded,
                  "expert_rows_checked": checked}


def sample_weak_set(run: RunDir, weak, task: TaskSpec, seed: int) -> tuple[list[dict], dict]:
    """The task's weak-set examples (still with their gold labels) and a summary of how they were drawn."""
    pool, summary = _pool(run, weak, task)
    if not pool:
        raise SentimergeError(f"task {task.name}: no {weak.split} rows left for the weak set after excluding the "
                              "expert's training rows")
    if weak.split == "train" and not summary["expert_rows_checked"]:
        log.warning("task %s: the expert does not list its training rows (schedule.jsonl or train_ids.json); "
                    "the weak set may overlap them", task.name)
    count = min(weak.per_task, len(pool))
    examples = sample_examples(pool, count, seed, f"{task.name}/weak") if count < len(pool) else list(pool)
    return examples, {**summary, "drawn": count}


def sample_selection_set(run: RunDir, weak, task: TaskSpec, seed: int, per_task: int,
                         weak_set: list[dict]) -> list[dict]:
    """The held-out weak set that picks the evolved merge: `per_task` rows from the same pool as the weak set
    (salt `<task>/weak-select`), none of them in it; empty when the weak set took every row."""
    taken = {example["id"] for example in weak_set}
    pool = [example for example in _pool(run, weak, task)[0] if example["id"] not in taken]
    if not pool:
        return []
    count = min(per_task, len(pool))
    return sample_examples(pool, count, seed, f"{task.name}/weak-select") if count < len(pool) else list(pool)
