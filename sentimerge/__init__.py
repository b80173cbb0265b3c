"""sentimerge: turn a small language model into one sentiment specialist.

Stage 1 trains a LoRA expert per sentiment task with a difficulty curriculum, stage 2 searches layer-wise merge
coefficients with CMA-ES on weakly-labelled data, stage 3 fine-tunes the merged model on all tasks with a dynamic
task weighting, and the export is one checkpoint that plain `transformers` loads.

The Python API (the CLI, `sentimerge <command>`, calls the same functions):

- `load_config(path)`, `validate(config)`: a typed, validated run config (`RunConfig`);
- `run(config)`, `run_stage(stage, config)`: every stage, or one, resuming what was interrupted;
- `search_log(run)`: stage 2's candidates as a pandas DataFrame;
- `export_dir(run)`, `load_model(folder)` -> `SentimentModel` with `.predict(texts, task=...)`;
- errors: `SentimergeError` and its kinds `ConfigError`, `DataError`, `ModelError`.

Subpackages: `sentimerge.pipeline` (stage scripts, CLI, API), `sentimerge.pipeline.core` (their building blocks),
`sentimerge.experts`, `sentimerge.merge`, `sentimerge.curriculum` (the methods). Importing `sentimerge` is light:
each name loads its module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sentimerge.pipeline.core import __version__

_API = {
    "load_config": "sentimerge.pipeline.core.config",
    "RunConfig": "sentimerge.pipeline.core.config",
    "SentimergeError": "sentimerge.pipeline.core.errors",
    "ConfigError": "sentimerge.pipeline.core.errors",
    "DataError": "sentimerge.pipeline.core.errors",
    "ModelError": "sentimerge.pipeline.core.errors",
    "STAGES": "sentimerge.pipeline.api",
    "validate": "sentimerge.pipeline.api",
    "run": "sentimerge.pipeline.api",
    "run_stage": "sentimerge.pipeline.api",
    "search_log": "sentimerge.pipeline.api",
    "export_dir": "sentimerge.pipeline.api",
    "load_model": "sentimerge.pipeline.predict",
    "SentimentModel": "sentimerge.pipeline.predict",
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from sentimerge.pipeline.api import STAGES, export_dir, run, run_stage, search_log, validate  # noqa: F401
    from sentimerge.pipeline.core.config import RunConfig, load_config  # noqa: F401
    from sentimerge.pipeline.core.errors import ConfigError, DataError, ModelError, SentimergeError  # noqa: F401
    from sentimerge.pipeline.predict import SentimentModel, load_model  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sentimerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
