"""`sentimerge run`: running every stage in order; not implemented yet (issue #6)."""

from __future__ import annotations

import argparse

from pipeline.config import RunConfig
from pipeline.errors import StageNotImplemented


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true")


def run_from_args(args: argparse.Namespace, cfg: RunConfig | None) -> None:
    raise StageNotImplemented("Running every stage in order is not implemented yet (issue #6)")


if __name__ == "__main__":
    from pipeline.cli import run_module

    run_module("run")
