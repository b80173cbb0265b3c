"""`sentimerge evaluate`: score a model on tasks and write a table (CSV and Markdown) of their metrics.

The model is a prepared run's base model (`--model base`), a checkpoint directory, a hub id, a peft adapter folder, or
an exported checkpoint. Tasks come from the run config, or from any tasks file (`--tasks FILE`). All data is loaded
and validated before the model is.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from sentimerge.pipeline.core.config import EvaluateConfig, RunConfig, load_tasks_file, positive_int
from sentimerge.pipeline.core.data import load_task_splits, sample_examples
from sentimerge.pipeline.core.errors import ModelError, SentimergeError
from sentimerge.pipeline.core.evaluation import evaluate_model, markdown_table
from sentimerge.pipeline.core.models import check_model_dir, load_model, pick_device
from sentimerge.pipeline.core.rundir import (
    RunDir,
    fresh_dir,
    write_csv_atomic,
    write_jsonl_atomic,
    write_manifest,
    write_text_atomic,
)
from sentimerge.pipeline.core.upstream import prepared_model_path

log = logging.getLogger("sentimerge.evaluate")


def main(cfg: RunConfig | None, *, model: str = "base", tasks_file: str | None = None, split: str | None = None,
         name: str | None = None, limit: int | None = None, batch_size: int | None = None,
         data_root: str | None = None, run_dir: str | None = None, force: bool = False) -> pd.DataFrame:
    """Evaluate `model`; with no run config, `tasks_file` and a model other than `base` are required."""
    if cfg is None and (tasks_file is None or model == "base"):
        raise SentimergeError("evaluate: without a run config, give --tasks FILE and --model M")
    settings = cfg.evaluate if cfg else EvaluateConfig()
    seed = cfg.resolved_data_seed if cfg else 0
    cache_dir = cfg.resolved_cache_dir if cfg else RunConfig.default_cache_dir()
    run = RunDir(run_dir or (cfg.resolved_run_dir if cfg else "runs/evaluate"))
    split, limit = split or settings.split, limit or settings.limit
    tasks, root = (list(cfg.tasks), cfg.data_root) if cfg else ([], None)
    if tasks_file is not None:
        task_list = load_tasks_file(tasks_file)
        tasks, root = list(task_list.tasks), task_list.data_root or root
    root = data_root or root
    data = {}
    for task in tasks:
        examples = load_task_splits(task, data_root=root, cache_dir=cache_dir, seed=seed, splits=(split,))[split]
        if limit and len(examples) > limit:
            examples = sample_examples(examples, limit, seed, f"{task.name}/{split}/eval")
        data[task.name] = examples
    model_ref = prepared_model_path(run) if model == "base" else model
    if Path(model_ref).exists():
        check_model_dir(Path(model_ref))
    out = run.evaluation(name or f"{_model_label(model)}-{split}")
    if out.exists() and not force:
        raise SentimergeError(f"{out}: an evaluation with this name exists; pass --name or --force")

    base = cfg.base_model if cfg else None
    loaded, tokenizer = load_model(model_ref, dtype=base.dtype if base else "bfloat16",
                                   device=pick_device(cfg.device if cfg else "auto"),
                                   trust_remote_code=bool(base and base.trust_remote_code))
    log.info("evaluating %s on %d task(s), %s split", model_ref, len(tasks), split)
    try:
        table, predictions = evaluate_model(loaded, tokenizer, tasks, data,
                                            batch_size=batch_size or settings.batch_size)
    except ModelError as error:
        raise ModelError(f"{model_ref}: {error}") from None
    with fresh_dir(out, overwrite=True) as folder:
        write_csv_atomic(folder / "metrics.csv", table)
        write_text_atomic(folder / "metrics.md", markdown_table(table))
        for task_name, rows in predictions.items():
            write_jsonl_atomic(folder / "predictions" / f"{task_name}.jsonl", rows)
        write_manifest(folder, stage="evaluate", model=model_ref, split=split, limit=limit,
                       tasks=[task.name for task in tasks])
    print(f"\n{model} on {split} ({out / 'metrics.md'}):\n")
    print(markdown_table(table))
    return table


def _model_label(model: str) -> str:
    return "base" if model == "base" else Path(model.rstrip("/")).name.replace("/", "_") or "model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="base",
                        help="`base` (the run's prepared base model), a checkpoint or adapter folder, or a hub id")
    parser.add_argument("--tasks", dest="tasks_file", help="a tasks file (default: the config's tasks)")
    parser.add_argument("--split", choices=["train", "dev", "test"], help="default: evaluate.split of the config")
    parser.add_argument("--name", help="name of the evaluation folder under <run>/eval/")
    parser.add_argument("--limit", type=positive_int, help="at most this many examples per task (seeded sample)")
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--force", action="store_true", help="replace an evaluation of the same name")


def run_from_args(args: argparse.Namespace, cfg: RunConfig | None) -> None:
    main(cfg, model=args.model, tasks_file=args.tasks_file, split=args.split, name=args.name, limit=args.limit,
         batch_size=args.batch_size, data_root=args.data_root, run_dir=args.run_dir, force=args.force)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("evaluate")
