"""Does the curriculum help? Each task's expert trained with the config's curriculum against random order.

Both arms use the same config, budget, seed, LoRA initialisation, pool and dev sample; only the pacing differs (the
random arm uses `none`: batches drawn uniformly from the whole pool). The curriculum arm is the run's own experts (its
finished experts are reused); the random arm trains in a second run directory. The table compares the primary dev
metric on each expert's dev sample, the one its manifest reports.

    python benchmarks/curriculum_ablation.py configs/suite.yaml --run-dir /tmp/r-suite --random-run-dir /tmp/r-suite-random

Writes benchmarks/results/curriculum_ablation.{csv,md} (or --out).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pipeline import experts, prepare
from pipeline.config import load_config
from pipeline.evaluate import markdown_table
from pipeline.rundir import RunDir, read_manifest, run_lock
from pipeline.runtime import seed_everything, set_threads, setup_logging

RESULTS = Path(__file__).parent / "results"


def arm(cfg, run_dir: str, pacing: str | None):
    """The config of one arm: the same run config, in its own run dir, with `pacing` if given."""
    updates = {"run_dir": run_dir}
    if pacing is not None:
        curriculum = cfg.experts.curriculum.model_copy(update={"pacing": pacing})
        updates["experts"] = cfg.experts.model_copy(update={"curriculum": curriculum})
    return cfg.model_copy(update=updates)


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
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config, run_dir=args.run_dir)
    set_threads(cfg.threads)
    if cfg.experts.curriculum.pacing == "none":
        raise SystemExit("the config's pacing is `none`: there is no curriculum to compare with")
    tasks = args.tasks.split(",") if args.tasks else None
    curriculum_cfg, random_cfg = arm(cfg, args.run_dir, None), arm(cfg, args.random_run_dir, "none")
    train(curriculum_cfg, tasks)
    train(random_cfg, tasks)

    rows = []
    for task in experts.select_tasks(cfg, tasks):
        rows.append(row(task, read_manifest(RunDir(args.run_dir).expert(task.name)),
                        read_manifest(RunDir(args.random_run_dir).expert(task.name))))
    table = pd.DataFrame(rows)
    wins = int((table["difference"] > 0).sum())
    summary = {"task": "mean", "metric": "", "dev_n": int(table["dev_n"].sum()),
               "examples": int(table["examples"].iloc[0]),
               "zero_shot": table["zero_shot"].mean(), "random_order": table["random_order"].mean(),
               "curriculum": table["curriculum"].mean(), "difference": table["difference"].mean(),
               "task_difficulty": table["task_difficulty"].mean()}
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
    out.with_suffix(".md").write_text(header + markdown_table(table), encoding="utf-8")
    print(header + markdown_table(table))


if __name__ == "__main__":
    main()
