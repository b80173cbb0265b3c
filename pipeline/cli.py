"""`sentimerge <command>` (or `python -m sentimerge <command>`): one CLI over the stage scripts; each stage also runs
as `python -m sentimerge.pipeline.<module>`.

User errors (bad config, bad data, missing model) print one line per problem and exit with status 2, before any
model is loaded.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from dataclasses import dataclass
from typing import Literal

from sentimerge.pipeline.core.errors import SentimergeError

# Errors of the machine rather than of the code: reported as one line, exit status 2.
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class Command:
    help: str
    config: Literal["required", "optional", "none"] = "required"
    writes: bool = True  # holds the run directory's lock while it runs


COMMANDS: dict[str, Command] = {
    "prepare": Command("validate and freeze the tasks' data; provision the base model"),
    "experts": Command("stage 1: train one LoRA expert per task with a difficulty curriculum"),
    "search": Command("stage 2: CMA-ES search of layer-wise merge coefficients on weak labels"),
    "finetune": Command("stage 3: multi-task fine-tuning of the merged model with dynamic task weights"),
    "export": Command("write the single merged checkpoint, model card and recipe"),
    "run": Command("run every stage in order, skipping finished ones"),
    "report": Command("run the pipeline, then compare every merge and fine-tuning strategy on the dev splits in one "
                      "Markdown report"),
    "evaluate": Command("score a model on tasks and write a metrics table", config="optional"),
    "inspect": Command("print a run's story and write its plots", config="none"),
    "predict": Command("label texts with an exported model", config="none"),
    "demonstrations": Command("draw in-context demonstrations for every task into a tasks file", writes=False),
    "validate": Command("check a config file (and its tasks and data files) without running anything", writes=False),
}


def build_parser() -> argparse.ArgumentParser:
    from sentimerge.pipeline.core import __version__

    parser = argparse.ArgumentParser(prog="sentimerge", description="Curriculum LoRA experts, evolutionary "
                                     "layer-wise merging and multi-task fine-tuning for sentiment specialists.")
    parser.add_argument("--version", action="version", version=f"sentimerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        if command.config == "required":
            sub.add_argument("config", metavar="CONFIG", help="run config (YAML)")
        elif command.config == "optional":
            sub.add_argument("config", metavar="CONFIG", nargs="?", help="run config (YAML)")
        if command.config != "none":
            sub.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<name>)")
            sub.add_argument("--data-root", help="folder holding <task>/<split>.jsonl for tasks that use {data_root}")
        sub.add_argument("-v", "--verbose", action="store_true")
        _module(name).add_arguments(sub)
    return parser


MODULES = {"inspect": "inspect_run"}  # commands whose module has another name (not the standard library's `inspect`)


def _module(name: str):
    return importlib.import_module(f"sentimerge.pipeline.{MODULES.get(name, name)}")


def entry() -> int:
    """The command line's entry point (`sentimerge`, `python -m sentimerge`): `main` in a process that may fork a
    child per stage (`core.isolation`), since it has run no model math yet."""
    from sentimerge.pipeline.core.isolation import allow_fork

    allow_fork()
    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sentimerge.pipeline.core.runtime import limit_kernel_cache, setup_logging

    limit_kernel_cache()
    setup_logging(args.verbose)
    try:
        cfg = None
        if getattr(args, "config", None):
            from sentimerge.pipeline.core.config import load_config

            cfg = load_config(args.config, data_root=args.data_root, run_dir=args.run_dir)
        command = _module(args.command)
        if cfg is None:
            command.run_from_args(args, cfg)
        else:
            from sentimerge.pipeline.api import session

            with session(cfg, writes=COMMANDS[args.command].writes):
                command.run_from_args(args, cfg)
    except SentimergeError as error:
        print(f"sentimerge {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRORS:
            raise
        print(f"sentimerge {args.command}: error: {error.filename or 'a file'}: {error.strerror}; nothing finished "
              "was lost, free the space or fix the permissions and run the same command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sentimerge {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def run_module(command: str) -> None:
    """Entry point of `python -m sentimerge.pipeline.<module>`."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
