"""Scoring a model on gold-labelled examples, and which examples every results table of a run is scored on.

`evaluate_model` is what `sentimerge evaluate`, the search's final tables, the export's model card and the report
all call; `final_examples` picks the examples they share, so that every row of a table is scored on the same ones.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.data import sample_examples
from sentimerge.pipeline.core.metrics import compute_metrics, spearman
from sentimerge.pipeline.core.rundir import RunDir
from sentimerge.pipeline.core.scoring import score_task
from sentimerge.pipeline.core.tasks import TaskSpec
from sentimerge.pipeline.core.upstream import load_prepared

log = logging.getLogger("sentimerge.evaluate")


METRIC_COLUMNS = ["accuracy", "macro_f1", "mse", "pearson"]


def evaluate_model(model, tokenizer, tasks: list[TaskSpec], data: dict[str, list[dict]], *,
                   batch_size: int = 16) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """Metrics per task (one row each, plus a `mean` row of the primary metrics) and per-example predictions.

    `ties` counts the classification examples whose two best answers scored exactly the same (the first listed was
    taken; see `core.scoring.TaskScores.ties`)."""
    rows, predictions = [], {}
    for task in tasks:
        examples = data[task.name]
        started = time.time()
        scores = score_task(model, tokenizer, task, examples, batch_size=batch_size)
        seconds = time.time() - started
        predicted = scores.predictions
        metrics = compute_metrics(task, [e["label"] for e in examples], predicted)
        rows.append({"task": task.name, "kind": task.kind, "n": len(examples), **metrics,
                     "ties": int(scores.ties.sum()), "examples_per_s": len(examples) / max(seconds, 1e-9)})
        probs = scores.probs.tolist()
        predictions[task.name] = [{"id": e["id"], "label": e["label"], "prediction": p,
                                   "probs": dict(zip(task.answers, (round(x, 5) for x in q)))}
                                  for e, p, q in zip(examples, predicted, probs)]
        log.info("%-14s n=%-5d %s (%.0f ex/s)", task.name, len(examples),
                 " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), len(examples) / max(seconds, 1e-9))
    table = pd.DataFrame(rows)
    table = table[["task", "kind", "n", *[c for c in METRIC_COLUMNS if c in table], "primary", "ties",
                   "examples_per_s"]]
    mean = {"task": "mean", "kind": "", "n": int(table["n"].sum()), "primary": float(table["primary"].mean()),
            "ties": int(table["ties"].sum()),
            "examples_per_s": float(table["n"].sum() / (table["n"] / table["examples_per_s"]).sum())}
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True), predictions


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """A Markdown table (no tabulate dependency): NaN cells are blank."""
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in table.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append("" if np.isnan(value) else f"{value:.{digits}f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluation_splits(run: RunDir, cfg: RunConfig) -> list[str]:
    """The splits every final table is scored on: `search.gold.splits` when set, else dev (settings were chosen on
    it) and, when every task has a prepared test split, test (which chose nothing)."""
    if cfg.search.gold.splits is not None:
        return list(cfg.search.gold.splits)
    return ["dev"] + (["test"] if all(run.data(task.name, "test").is_file() for task in cfg.tasks) else [])


def missing_test_splits(run: RunDir, cfg: RunConfig) -> list[str]:
    """One problem per task without a prepared test split when `search.gold.splits` asks for test's tables."""
    if "test" not in (cfg.search.gold.splits or ()):
        return []
    return [f"search.gold.splits: task {task.name} has no prepared test split ({run.data(task.name, 'test')})"
            for task in cfg.tasks if not run.data(task.name, "test").is_file()]


def gold_examples(run: RunDir, cfg: RunConfig, limit: int | None, salt: str, split: str = "dev") -> dict[str, list[dict]]:
    """Each task's `split` examples: a seeded sample of `limit` when given (salt `eval`: the final table's, which
    `export` and `report` score too, so every row of a results table is scored on the same examples), else all."""
    data = {}
    for task in cfg.tasks:
        examples = load_prepared(run, task.name, split)
        if limit is not None and len(examples) > limit:
            examples = sample_examples(examples, limit, cfg.resolved_data_seed, f"{task.name}/{split}/{salt}")
        data[task.name] = examples
    return data


def final_examples(run: RunDir, cfg: RunConfig, split: str = "dev") -> dict[str, list[dict]]:
    """The examples of the final tables on `split` (`search.gold.final` per task, or all): the search's, the
    export's and `sentimerge run`'s results table all score these."""
    return gold_examples(run, cfg, cfg.search.gold.final, "eval", split)


SPLIT_ROLES = {"dev": "settings were chosen on it", "test": "it chose nothing"}


def split_heading(split: str, data: dict[str, list]) -> str:
    """A table's heading: the split, its role, and how many examples per task every row is scored on."""
    counts = ", ".join(f"{name} {len(rows)}" for name, rows in data.items())
    return f"## {split} ({SPLIT_ROLES.get(split, 'gold labels')}): every row on the same examples ({counts})"


MERGE_LABELS = {"base": "zero-shot base", "uniform": "uniform task arithmetic", "ties": "TIES",
                "hybrid": "Hybrid LoRA attention coefficients", "evolved": "evolved merge"}


def merge_labels(shared: bool) -> dict[str, str]:
    """The results tables' names of stage 2's rows; with a shared adapter (`shared`), the all-zero merge is base +
    shared adapter, not the zero-shot base model, and is named so."""
    return {**MERGE_LABELS, "base": "base + shared adapter"} if shared else dict(MERGE_LABELS)


def weak_gold_spearman(table: pd.DataFrame) -> float:
    """Spearman correlation of a final table's weak fitness with its gold mean, over the models that have both: scored
    on every task (not an expert on its own task alone, `search.gold.experts: own`) and on the weak set (not a
    reference left unscored, `search.weak.references` off). 0 with fewer than two such models."""
    scored = table.dropna(subset=["weak_fitness", "mean"])
    return spearman(scored["weak_fitness"].tolist(), scored["mean"].tolist())
