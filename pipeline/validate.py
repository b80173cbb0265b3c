"""`sentimerge validate CONFIG`: check a config, its tasks and their data without loading any model."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.data import load_task_splits
from pipeline.models import check_model_dir


def main(cfg: RunConfig, *, check_data: bool = True) -> None:
    if cfg.base_model.path is not None:
        check_model_dir(Path(cfg.base_model.path))
    lines = [f"config ok: run {cfg.name!r}, {len(cfg.tasks)} task(s), run dir {cfg.resolved_run_dir}"]
    for task in cfg.tasks:
        summary = f"{task.kind}, {len(task.labels)} labels" if task.labels else f"{task.kind} in {list(task.range)}"
        if check_data:
            splits = load_task_splits(task, data_root=cfg.data_root, cache_dir=cfg.resolved_cache_dir, seed=cfg.seed)
            summary += "; " + ", ".join(f"{split} {len(rows)}" for split, rows in splits.items())
        lines.append(f"  {task.name}: {summary}")
    print("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-data", action="store_true", help="check the config only, not the data files")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, check_data=not args.no_data)


if __name__ == "__main__":
    from pipeline.cli import run_module

    run_module("validate")
