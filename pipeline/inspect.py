"""`sentimerge inspect`: inspection of a search; not implemented yet (issue #5)."""

from __future__ import annotations

import argparse

from pipeline.config import RunConfig
from pipeline.errors import StageNotImplemented


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory")


def run_from_args(args: argparse.Namespace, cfg: RunConfig | None) -> None:
    raise StageNotImplemented("Inspection of a search is not implemented yet (issue #5)")


if __name__ == "__main__":
    from pipeline.cli import run_module

    run_module("inspect")
