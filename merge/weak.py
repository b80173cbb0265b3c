"""The weak-label set: which examples every candidate is scored on (the labellers that label them:
`sentimerge.merge.labellers`).

Sampling rule: per task, `weak.per_task` rows drawn with the run's seed (salt `<task>/weak`) from `weak.split`
(train by default, never dev). From the train split, the rows the task's expert trained on are excluded: the ids in
stage 1's schedule log (`<run>/experts/<task>/schedule.jsonl`, the `ids` of every step), or, for an expert made
elsewhere, the list in `<run>/experts/<task>/train_ids.json`; so are the rows shown as the task's demonstrations. The weak set's summary records whether that check was
possible. The held-out selection set (`search.select`) is drawn the same way from the rows the weak set left.
"""

from __future__ import annotations

import json
import logging

from sentimerge.pipeline.core.data import sample_examples
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl
from sentimerge.pipeline.core.tasks import TaskSpec
from sentimerge.pipeline.core.upstream import load_prepared

log = logging.getLogger("sentimerge.search")

def trained_ids(run: RunDir, task: str) -> set[str] | None:
    """Ids of the task's train rows that an expert trained on: its own expert's, and those other experts replayed
    (`experts.replay`); None when the task's expert does not say."""
    schedule, listed = run.expert_schedule(task), run.expert(task) / "train_ids.json"
    if schedule.is_file():
        own = {identifier for row in read_jsonl(schedule) for identifier in row.get("ids", [])}
    elif listed.is_file():
        own = set(json.loads(listed.read_text(encoding="utf-8")))
    else:
        return None
    return own | replayed_ids(run, task)


def replayed_ids(run: RunDir, task: str) -> set[str]:
    """Ids of the task's train rows that the other tasks' experts replayed (their schedules' `replay` entries)."""
    replayed = set()
    for schedule in sorted(run.experts.glob("*/schedule.jsonl")):
        if schedule.parent.name == task:
            continue
        for row in read_jsonl(schedule):
            if row.get("replay", {}).get("task") == task:
                replayed.update(row["replay"]["ids"])
    return replayed


def _pool(run: RunDir, weak, task: TaskSpec) -> tuple[list[dict], dict]:
    """The rows a weak set may draw from (the expert's training rows excluded when known) and how they were found."""
    pool = load_prepared(run, task.name, weak.split)
    excluded, checked = 0, weak.split != "train"
    trained = trained_ids(run, task.name) if weak.split == "train" else None
    if trained is not None:
        kept = [example for example in pool if example["id"] not in trained]
        excluded, checked, pool = len(pool) - len(kept), True, kept
    shown = {(demo.text.strip(), demo.aspect or None) for demo in task.demonstrations}
    kept = [example for example in pool if (example["text"].strip(), example.get("aspect") or None) not in shown]
    summary = {"split": weak.split, "pool": len(kept), "excluded_expert_rows": excluded,
               "expert_rows_checked": checked}
    return kept, ({**summary, "excluded_demonstrations": len(pool) - len(kept)} if shown else summary)


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
