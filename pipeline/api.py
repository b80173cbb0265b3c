"""The Python API (`import sentimerge`): what the CLI does, as functions for notebooks and scripts.

    import sentimerge

    cfg = sentimerge.load_config("configs/demo.yaml")
    sentimerge.validate(cfg)                      # config, data and (when local) base model; raises on a problem
    results = sentimerge.run(cfg)                 # every stage, finished ones skipped: the results table
    log = sentimerge.search_log(cfg)              # stage 2's candidates, one row each
    model = sentimerge.load_model(sentimerge.export_dir(cfg))
    model.predict(["a gripping, moving film"], task="polarity")

Every function raises `sentimerge.SentimergeError` (or a subclass: `ConfigError`, `DataError`, `ModelError`) with a
message naming the file, field or line on bad input, before any expensive work, as the CLI does (which prints it as
one line and exits with status 2).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from sentimerge.pipeline.core.config import RunConfig, load_config
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl

STAGES = ("prepare", "experts", "search", "finetune", "export")

__all__ = ["STAGES", "export_dir", "load_config", "run", "run_stage", "search_log", "session", "validate"]

ConfigLike = RunConfig | str | Path


def _config(config: ConfigLike) -> RunConfig:
    return config if isinstance(config, RunConfig) else load_config(config)


@contextlib.contextmanager
def session(cfg: RunConfig, *, writes: bool = True) -> Iterator[RunDir]:
    """What every command runs inside (the CLI's too): the run's seed and thread count set, and, for a command that
    writes, the run directory's lock held (a second writer gets a one-line error instead of a corrupted run)."""
    from sentimerge.pipeline.core.models import set_attention
    from sentimerge.pipeline.core.rundir import run_lock
    from sentimerge.pipeline.core.runtime import limit_kernel_cache, seed_everything, set_threads

    limit_kernel_cache()  # a no-op when the CLI or the user set it first
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    set_attention(cfg.attention)
    run = RunDir(cfg.resolved_run_dir)
    if not writes:
        yield run
        return
    with run_lock(run):
        yield run


def validate(config: ConfigLike, *, check_data: bool = True) -> RunConfig:
    """Check a config, its tasks' data (unless `check_data` is False) and, when the base model is already local, the
    LoRA targets and prompt lengths against it, without training anything. Returns the loaded config.

    Raises: `ConfigError`, `DataError` or `ModelError` listing every problem found."""
    from sentimerge.pipeline import validate as validate_stage

    cfg = _config(config)
    validate_stage.main(cfg, check_data=check_data)
    return cfg


def _stage(name: str) -> Callable[..., Any]:
    if name not in STAGES:
        from sentimerge.pipeline.core.config import suggest

        raise SentimergeError(f"unknown stage {name!r}{suggest(name, list(STAGES))}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"sentimerge.pipeline.{name}").main


def run_stage(stage: str, config: ConfigLike, **options: Any) -> Any:
    """Run one stage (`prepare`, `experts`, `search`, `finetune` or `export`), resuming it when it was interrupted
    and skipping it when it finished (`force=True` runs it again). Options are the stage's own (`search`:
    `max_evaluations`; `experts`: `tasks`). Returns what the stage returns: its folder (stage 1: task -> folder;
    stage 3: its state)."""
    main = _stage(stage)
    cfg = _config(config)
    with session(cfg):
        return main(cfg, **options)


def run(config: ConfigLike) -> pd.DataFrame:
    """Every stage in order, finished ones skipped, then the results table (`<run>/results.csv`): one row per model
    (zero-shot base, experts, uniform, TIES, evolved merge, final model) and split, each task's primary metric and
    their mean."""
    from sentimerge.pipeline import run as run_all

    cfg = _config(config)
    with session(cfg):
        return run_all.main(cfg)


def _run_dir(run: ConfigLike | RunDir) -> RunDir:
    if isinstance(run, RunDir):
        return run
    if isinstance(run, RunConfig) or Path(run).suffix in (".yaml", ".yml"):
        return RunDir(_config(run).resolved_run_dir)
    return RunDir(run)


def search_log(run: ConfigLike | RunDir) -> pd.DataFrame:
    """Stage 2's candidates as a DataFrame, one row per scored candidate in the order they were scored (also while
    the search runs): `generation`, `index`, `status` (`ok` or `failed`), `fitness` (the weighted mean of the tasks'
    metrics against weak labels; a failed candidate has the failure penalty), one `weak/<task>` column per task,
    `coefficients` (a list, genome order: layer groups by experts), `seconds`, `merge_seconds`, `score_seconds`, and
    `error` for failed ones. `run` is a run directory, or a config (its run directory).

    Raises: `SentimergeError` when the run has no search log yet."""
    run_dir = _run_dir(run)
    if not run_dir.search_candidates.is_file():
        raise SentimergeError(f"{run_dir.search_candidates}: no search log; run `sentimerge search` first")
    rows = []
    for row in read_jsonl(run_dir.search_candidates):
        flat = {key: value for key, value in row.items() if key != "tasks"}
        flat.update({f"weak/{task}": scores["metric"] for task, scores in (row.get("tasks") or {}).items()})
        rows.append(flat)
    return pd.DataFrame(rows)


def export_dir(run: ConfigLike | RunDir) -> Path:
    """The folder of a run's exported checkpoint (`load_model` takes it). Raises `SentimergeError` before export."""
    from sentimerge.pipeline.core.rundir import is_done

    run_dir = _run_dir(run)
    if not is_done(run_dir.export):
        raise SentimergeError(f"{run_dir.export}: not exported yet; run `sentimerge export` (or `run`) first")
    return run_dir.export
