"""`sentimerge predict`: prediction with an exported model; not implemented yet (issue #6)."""

from __future__ import annotations

import argparse

from pipeline.config import RunConfig
from pipeline.errors import StageNotImplemented


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("texts", nargs="*")


def run_from_args(args: argparse.Namespace, cfg: RunConfig | None) -> None:
    raise StageNotImplemented("Prediction with an exported model is not implemented yet (issue #6)")


if __name__ == "__main__":
    from pipeline.cli import run_module

    run_module("predict")
