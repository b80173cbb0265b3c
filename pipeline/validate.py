"""`sentimerge validate CONFIG`: check a config, its tasks and their data without loading any model's weights.

Where the base model is already local (a `path`, or a GGUF converted earlier), its config and tokenizer are checked
against the config too: LoRA target modules and the prompts' length (`prepare.check_against_base_model`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.data import load_task_splits
from sentimerge.pipeline.core.models import check_against_base_model, check_model_dir, local_model_dir


def main(cfg: RunConfig, *, check_data: bool = True) -> None:
    if cfg.base_model.path is not None:
        check_model_dir(Path(cfg.base_model.path))
    lines = [f"config ok: run {cfg.name!r}, {len(cfg.tasks)} task(s), run dir {cfg.resolved_run_dir}"]
    data = {}
    for task in cfg.tasks:
        summary = f"{task.kind}, {len(task.labels)} labels" if task.labels else f"{task.kind} in {list(task.range)}"
        if check_data:
            data[task.name] = load_task_splits(task, data_root=cfg.data_root, cache_dir=cfg.resolved_cache_dir,
                                               seed=cfg.resolved_data_seed)
            summary += "; " + ", ".join(f"{split} {len(rows)}" for split, rows in data[task.name].items())
        lines.append(f"  {task.name}: {summary}")
    model_dir = local_model_dir(cfg.base_model, cfg.resolved_cache_dir)
    if model_dir is not None:  # its config and tokenizer only: no weights are loaded
        check_against_base_model(cfg, str(model_dir), data if check_data else None)
        lines.append(f"base model {model_dir}: LoRA targets{' and context' if check_data else ''} ok")
    else:
        lines.append("base model not converted or built yet: `prepare` checks the LoRA targets and the context")
    print("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-data", action="store_true", help="check the config only, not the data files")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, check_data=not args.no_data)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("validate")
