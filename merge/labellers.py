"""The weak labellers: each labels a task's examples without gold labels (the experts' own answers, a sentiment
lexicon), or with them (`gold`, an oracle for studies). Registered by name; `search.weak.labeller` picks one."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from sentimerge.pipeline.core.registry import Registry
from sentimerge.pipeline.core.tasks import TaskSpec

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
    from sentimerge.curriculum.signals import label_polarities

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
    from sentimerge.curriculum.signals import vader

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


for _labeller in (Labeller("expert", _expert_labels, needs_experts=True), Labeller("gold", _gold_labels),
                  Labeller("lexicon", _lexicon_labels, _lexicon_problem)):
    LABELLERS.register(_labeller.name)(_labeller)
