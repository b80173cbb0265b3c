"""`sentimerge experts`: stage 1 (per-task lora experts); not implemented yet (issue #4)."""

from __future__ import annotations

import argparse

from pipeline.config import RunConfig
from pipeline.errors import StageNotImplemented


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true")


def run_from_args(args: argparse.Namespace, cfg: RunConfig | None) -> None:
    raise StageNotImplemented("Stage 1 (per-task LoRA experts) is not implemented yet (issue #4)")


if __name__ == "__main__":
    from pipeline.cli import run_module

    run_module("experts")
