"""`sentimerge search`: stage 2 (cma-es merge search); not implemented yet (issue #5)."""

from __future__ import annotations

import argparse

from pipeline.config import RunConfig
from pipeline.errors import StageNotImplemented


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true")


def run_from_args(args: argparse.Namespace, cfg: RunConfig | None) -> None:
    raise StageNotImplemented("Stage 2 (CMA-ES merge search) is not implemented yet (issue #5)")


if __name__ == "__main__":
    from pipeline.cli import run_module

    run_module("search")
