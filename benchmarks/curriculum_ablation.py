"""Does the curriculum help? Each task's expert trained with the config's curriculum against random order.

Both arms use the same config, budget, seed, LoRA initialisation, pool and dev sample; only the pacing differs (the
random arm uses `none`: batches drawn uniformly from the whole pool). The curriculum arm is the run's own experts (its
finished experts are reused); the random arm trains in a second run directory. The table compares the primary dev
metric on each expert's dev sample, the one its manifest reports.

    python benchmarks/curriculum_ablation.py configs/suite.yaml --run-dir /tmp/r-suite --random-run-dir /tmp/r-suite-random

Which signal or pacing helps: each `--arm NAME=JSON` trains the experts once more with the curriculum settings in
JSON replacing the config's (e.g. `--arm length_only='{"signals": {"length": 1}}'`), in `--arms-dir/NAME`, and adds a
column. The base model's per-example loss is copied from the curriculum arm (the same pool and model give the same).

Writes benchmarks/results/curriculum_ablation.{csv,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from sentimerge.pipeline import experts, prepare
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.evaluation import markdown_table
from sentimerge.pipeline.core.rundir import RunDir, read_manifest, run_lock
from sentimerge.pipeline.core.runtime import seed_everything, set_threads, setup_logging

RESULTS = Path(__file__).parent / "results"


def arm(cfg, run_dir: str, pacing: str | None, overrides: dict | None = None):
    """The config of one arm: the same run config, in its own run dir, with `pacing` and curriculum `overrides`."""
    updates = {"run_dir": run_dir}
    changes = {**({"pacing": pacing} if pacing is not None else {}), **(overrides or {})}
    if changes:
        # validated like a config file: a misspelt signal or pacing fails here, before any training
        curriculum = type(cfg.experts.curriculum).model_validate({**cfg.experts.curriculum.model_dump(), **changes})
        updates["experts"] = cfg.experts.model_copy(update={"curriculum": curriculum})
    return cfg.model_copy(update=updates)


def parse_arm(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition("=")
    try:
        parsed = json.loads(overrides)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--arm {name}: the curriculum overrides are not JSON ({error})") from None
    if not name.isidentifier() or not isinstance(parsed, dict):
        raise SystemExit(f"--arm {text!r}: expected NAME='{{\"signals\": {{...}}}}'")
    return name, parsed


def copy_base_loss(source: RunDir, target: RunDir, tasks) -> None:
    for task in tasks:
        cache = source.base_loss_cache(task.name)
        if cache.is_file() and not target.base_loss_cache(task.name).is_file():
            target.base_loss_cache(task.name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache, target.base_loss_cache(task.name))


def train(cfg, tasks: list[str] | None) -> None:
    seed_everything(cfg.seed)
    prepare.main(cfg)
    with run_lock(RunDir(cfg.resolved_run_dir)):
        experts.main(cfg, tasks=tasks)


def row(task, curriculum: dict, random: dict) -> dict:
    return {"task": task.name, "metric": task.primary, "dev_n": curriculum["dev_examples"],
            "examples": curriculum["examples"], "zero_shot": curriculum["zero_shot"]["primary"],
            "random_order": random["dev"]["primary"], "curriculum": curriculum["dev"]["primary"],
            "difference": curriculum["dev"]["primary"] - random["dev"]["primary"],
            "task_difficulty": curriculum["task_difficulty"]["difficulty"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True, help="run dir of the curriculum arm (the run's experts)")
    parser.add_argument("--random-run-dir", required=True, help="run dir of the random-order arm")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task)")
    parser.add_argument("--out", default=str(RESULTS / "curriculum_ablation"), help="path stem of the tables")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=JSON",
                        help="another curriculum arm: curriculum settings replacing the config's (repeatable)")
    parser.add_argument("--arms-dir", help="parent of the extra arms' run dirs (required with --arm)")
    args = parser.parse_args()
    arms = dict(parse_arm(text) for text in args.arm)
    if arms and not args.arms_dir:
        raise SystemExit("--arm needs --arms-dir")
    setup_logging()
    cfg = load_config(args.config, run_dir=args.run_dir)
    set_threads(cfg.threads)
    if cfg.experts.curriculum.pacing == "none":
        raise SystemExit("the config's pacing is `none`: there is no curriculum to compare with")
    tasks = args.tasks.split(",") if args.tasks else None
    curriculum_cfg, random_cfg = arm(cfg, args.run_dir, None), arm(cfg, args.random_run_dir, "none")
    arm_cfgs = {name: arm(cfg, str(Path(args.arms_dir) / name), None, overrides) for name, overrides in arms.items()}
    train(curriculum_cfg, tasks)
    train(random_cfg, tasks)
    for arm_cfg in arm_cfgs.values():
        copy_base_loss(RunDir(args.run_dir), RunDir(arm_cfg.resolved_run_dir),
                       experts.select_tasks(cfg, tasks))
        train(arm_cfg, tasks)

    rows = []
    for task in experts.select_tasks(cfg, tasks):
        rows.append(row(task, read_manifest(RunDir(args.run_dir).expert(task.name)),
                        read_manifest(RunDir(args.random_run_dir).expert(task.name))))
        for name, arm_cfg in arm_cfgs.items():
            rows[-1][name] = read_manifest(RunDir(arm_cfg.resolved_run_dir).expert(task.name))["dev"]["primary"]
    table = pd.DataFrame(rows)
    wins = int((table["difference"] > 0).sum())
    summary = {"task": "mean", "metric": "", "dev_n": int(table["dev_n"].sum()),
               "examples": int(table["examples"].iloc[0]),
               "zero_shot": table["zero_shot"].mean(), "random_order": table["random_order"].mean(),
               "curriculum": table["curriculum"].mean(), "difference": table["difference"].mean(),
               "task_difficulty": table["task_difficulty"].mean(), **{name: table[name].mean() for name in arms}}
    table = pd.concat([table, pd.DataFrame([summary])], ignore_index=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False, float_format="%.4f")
    settings = cfg.experts
    header = (f"# Curriculum ({settings.curriculum.pacing} pacing, start {settings.curriculum.start}, full at "
              f"{settings.curriculum.full_at} of the budget) against random order\n\n"
              f"Config `{args.config}`, seed {cfg.seed}, {settings.total_steps} steps of {settings.batch_size} "
              f"examples per expert, pool {settings.curriculum.pool}, dev sample {settings.dev_examples}, "
              f"signals {settings.curriculum.signals}. Primary dev metric of each expert (the kept adapter: "
              f"{settings.keep}). The curriculum wins on {wins} of {len(rows)} tasks.\n\n")
    if arms:
        header += "Extra arms (curriculum settings replacing the config's):\n\n" + "".join(
            f"- `{name}`: `{json.dumps(overrides)}`; beats random order on "
            f"{int((table[name].iloc[:-1] > table['random_order'].iloc[:-1]).sum())} of {len(rows)} tasks\n"
            for name, overrides in arms.items()) + "\n"
    out.with_suffix(".md").write_text(header + markdown_table(table), encoding="utf-8")
    print(header + markdown_table(table))


if __name__ == "__main__":
    main()
