"""Stage 3 loss weightings x regression losses x stage 3 seeds, all from one finished run's merged model: DAO's claim
(Ding et al., arXiv 2408.11856) measured where it was made.

    python benchmarks/weighting_grid.py runs/financial --name financial \\
        [--weightings dao,static,uncertainty,dwa,famo,famo:floor=0.1] [--losses level_ce,expected_mse] [--seeds 3]
        [--record fin]

RUN is a run directory whose stages 1-2 are finished (its `config.yaml` is the resolved config). Every cell trains
stage 3 from the run's merged model with the same steps, examples per step and dev sample; only
`finetune.weighting` (the run's own strategy keeps its options, the others run with their defaults, as in
`sentimerge report`, or with the options a spec `name:option=value` gives), `finetune.regression_loss` and the
stage 3 seed (`finetune.seed` = run seed + 0, 1, ...) change.
Cells train into `RUN/report/ablation-<weighting>-<loss>-seed<s>/` (resumable, kept) and are scored on the run's
final-table examples of every split (`report.evaluate_variant`, cached): dev chose the settings, test chose nothing.

Per cell: accuracy and macro-F1 of each classification task, MSE and Pearson of each regression task, the mean
primary metric. Against `static` with the same loss and seed, a paired bootstrap 95% interval over the same
examples (`core.metrics.resampled_metric`) of: the mean primary metric, each regression task's MSE change in % of
static's (negative = lower MSE), and the accuracy of the classification tasks in points (their mean). Over seeds:
mean, sd and the seeds where the cell is ahead. `expected_mse` against `level_ce` the same way, per weighting.
Writes benchmarks/results/weighting_grid_<name>.{md,json} after every cell; `--record PREFIX` records, for the
config's regression loss on the test split, `PREFIX_dao_vs_static_mse_pct`, `PREFIX_dao_vs_static_accuracy_points`
and `PREFIX_stage3_seeds` in summary.json (means over seeds; `_dev` keys for dev).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stage3_ablation import finetune_variant, predictions_of  # noqa: E402
from benchmarks.summary import record  # noqa: E402
from sentimerge.pipeline import finetune, report  # noqa: E402
from sentimerge.pipeline.api import session  # noqa: E402
from sentimerge.pipeline.core.config import RunConfig, load_config  # noqa: E402
from sentimerge.pipeline.core.evaluation import evaluation_splits, final_examples, markdown_table  # noqa: E402
from sentimerge.pipeline.core.metrics import bootstrap_rows, interval, resampled_metric  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, is_done  # noqa: E402
from sentimerge.pipeline.core.runtime import setup_logging  # noqa: E402
from sentimerge.pipeline.core.tasks import TaskSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = "static"
LOSS_REFERENCE = "level_ce"


def parse_weighting(spec: str) -> tuple[str, str, dict[str, float]]:
    """`name` or `name:option=value[:option=value]` (e.g. `famo:floor=0.1`) -> (label, name, options); the label
    (`famo-floor0.1`) names the cell in the tables and its folder. Raises SystemExit on a malformed option."""
    name, *pairs = spec.strip().split(":")
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--weightings {spec}: options are key=number, got {pair!r}") from None
    label = "-".join([name, *(f"{key}{value:g}" for key, value in options.items())])
    return label, name, options


def cell_variant(cfg: RunConfig, run: RunDir, weighting: str, loss: str, seed: int) -> report.Variant:
    """Stage 3 with `weighting` (a `parse_weighting` spec), regression loss `loss` and stage 3 seed `seed`, from
    the run's merged model."""
    label, name, options = parse_weighting(weighting)
    own = cfg.finetune.weighting
    if name == own.name and not options:
        settings = own.model_dump(mode="json", exclude_unset=True)
    else:
        settings = {"name": name, "grad_norm_every": own.grad_norm_every, **({"options": options} if options else {})}
    return finetune_variant(cfg, run, f"{label}-{loss}-seed{seed}",
                            {"weighting": settings, "regression_loss": loss, "seed": seed})


def paired_changes(tasks: list[TaskSpec], gold: dict[str, list], a: dict[str, list], b: dict[str, list], *,
                   seed: int, resamples: int = 2000, level: float = 0.95) -> dict[str, dict]:
    """Model a against model b on the same examples, each with a paired bootstrap interval (the same resampled rows
    of each task for both): `primary` the difference of the mean primary metric over tasks; `mse_pct:<task>` each
    regression task's MSE change in % of b's (negative = a has the lower MSE); `accuracy_points` and
    `macro_f1_points` the mean over classification tasks of the difference, in points (x 100)."""
    rows = bootstrap_rows(tasks, gold, resamples=resamples, seed=seed)

    def values(task: TaskSpec, metric: str, predicted: dict[str, list]) -> tuple[float, np.ndarray]:
        identity, draws = rows[task.name]
        return (float(resampled_metric(task, metric, gold[task.name], predicted[task.name], identity)[0]),
                resampled_metric(task, metric, gold[task.name], predicted[task.name], draws))

    def difference(task: TaskSpec, metric: str) -> tuple[float, np.ndarray]:
        (observed_a, drawn_a), (observed_b, drawn_b) = values(task, metric, a), values(task, metric, b)
        return observed_a - observed_b, drawn_a - drawn_b

    parts = [difference(task, task.primary) for task in tasks]
    result = {"primary": interval(np.mean([p[0] for p in parts]), np.mean([p[1] for p in parts], axis=0), level)}
    for task in tasks:
        if task.kind == "regression":
            (observed_a, drawn_a), (observed_b, drawn_b) = values(task, "mse", a), values(task, "mse", b)
            result[f"mse_pct:{task.name}"] = interval(100 * (observed_a / observed_b - 1),
                                                      100 * (drawn_a / np.maximum(drawn_b, 1e-12) - 1), level)
    classification = [task for task in tasks if task.kind == "classification"]
    for metric in ("accuracy", "macro_f1") if classification else ():
        parts = [difference(task, metric) for task in classification]
        result[f"{metric}_points"] = interval(100 * np.mean([p[0] for p in parts]),
                                              100 * np.mean([p[1] for p in parts], axis=0), level)
    return result


def cell_metrics(table: pd.DataFrame) -> dict[str, float]:
    """`task:metric` -> value for every metric the evaluation table holds, and `mean:primary`."""
    indexed = table.set_index("task")
    values = {"mean:primary": float(indexed.loc["mean", "primary"])}
    for task, row in indexed.drop(index="mean").iterrows():
        for metric in ("accuracy", "macro_f1", "mse", "pearson"):
            if metric in row and pd.notna(row[metric]):
                values[f"{task}:{metric}"] = float(row[metric])
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--name", required=True, help="the results file's name: weighting_grid_<name>")
    parser.add_argument("--weightings", default=",".join(report.WEIGHTINGS))
    parser.add_argument("--losses", default="level_ce,expected_mse")
    parser.add_argument("--seeds", type=int, default=3, help="stage 3 seeds per cell: run seed, +1, ...")
    parser.add_argument("--record", metavar="PREFIX", help="record the headline keys under PREFIX_ in summary.json")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.run / "config.yaml", run_dir=str(args.run))
    run = RunDir(cfg.resolved_run_dir)
    if not is_done(run.search):
        raise SystemExit(f"{run.search}: no finished search; run `sentimerge search` on {args.run} first")
    specs = [spec.strip() for spec in args.weightings.split(",") if spec.strip()]
    report.check_weightings([parse_weighting(spec)[1] for spec in specs])
    weightings = list(dict.fromkeys(specs))
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    seeds = [cfg.seed + offset for offset in range(args.seeds)]
    command = "python " + shlex.join(["benchmarks/weighting_grid.py", *sys.argv[1:]])
    splits = evaluation_splits(run, cfg)
    examples = {split: final_examples(run, cfg, split) for split in splits}
    tasks = list(cfg.tasks)
    cells, scored = [], {}
    with session(cfg):
        for seed, loss, weighting in product(seeds, losses, weightings):  # a whole seed first: usable tables early
            variant = cell_variant(cfg, run, weighting, loss, seed)
            finetune.main(variant.cfg, folder=variant.folder)
            label = parse_weighting(weighting)[0]
            for split in splits:
                scored[label, loss, seed, split] = report.evaluate_variant(variant, run, examples[split], split=split)
                cells.append({"weighting": label, "loss": loss, "seed": seed, "split": split,
                              **cell_metrics(scored[label, loss, seed, split][0])})
            write_results(args.name, command, cfg, tasks, examples, scored, pd.DataFrame(cells))
    result = json.loads((RESULTS / f"weighting_grid_{args.name}.json").read_text(encoding="utf-8"))
    if args.record:
        record(headline(result, cfg.finetune.regression_loss, args.record), command=command,
               notes=f"stage 3 from {args.run}'s merged model, {args.seeds} seeds, loss {cfg.finetune.regression_loss}; "
                     "test = the split that chose nothing; _dev keys on dev")


def comparisons(cfg: RunConfig, tasks: list[TaskSpec], examples: dict, scored: dict) -> pd.DataFrame:
    """Every cell against static (same loss, seed, split) and every expected_mse cell against level_ce (same
    weighting, seed, split): one row per pair and measure, with its interval."""
    rows = []
    for (weighting, loss, seed, split), mine in scored.items():
        gold = {name: [row["label"] for row in data] for name, data in examples[split].items()}
        references = [("vs static", (REFERENCE, loss, seed, split))] if weighting != REFERENCE else []
        if loss != LOSS_REFERENCE:
            references.append((f"vs {LOSS_REFERENCE}", (weighting, LOSS_REFERENCE, seed, split)))
        for against, key in references:
            if key not in scored:
                continue
            changes = paired_changes(tasks, gold, predictions_of(mine), predictions_of(scored[key]), seed=cfg.seed)
            rows += [{"weighting": weighting, "loss": loss, "against": against, "seed": seed, "split": split,
                      "measure": measure, **interval} for measure, interval in changes.items()]
    return pd.DataFrame(rows)


def write_results(name: str, command: str, cfg: RunConfig, tasks: list[TaskSpec], examples: dict, scored: dict,
                  cells: pd.DataFrame) -> None:
    pairs = comparisons(cfg, tasks, examples, scored)
    keys = ["weighting", "loss", "split"]
    measures = [column for column in cells.columns if ":" in column]
    means = cells.groupby(keys, sort=False)[measures].mean().reset_index()
    spread = cells.groupby(keys, sort=False)["mean:primary"].agg(["std", "count"]).reset_index()
    means["sd primary"], means["seeds"] = spread["std"].to_numpy(), spread["count"].to_numpy()
    over_seeds = pd.DataFrame()
    if not pairs.empty:
        over_seeds = (pairs.groupby(["weighting", "loss", "against", "split", "measure"], sort=False)["difference"]
                      .agg(mean="mean", sd="std", seeds="count",
                           ahead=lambda d: int((d > 0).sum()), below=lambda d: int((d < 0).sum()))
                      .reset_index())
    seeds = sorted(int(seed) for seed in cells["seed"].unique())
    counts = ", ".join(f"{split}: " + ", ".join(f"{task} {len(rows)}" for task, rows in data.items())
                       for split, data in examples.items())
    text = (f"# Stage 3 weightings x regression losses: {name}\n\n`{command}`\n\n"
            f"Same start model (`{cfg.resolved_run_dir}`), {cfg.finetune.steps} steps x {cfg.finetune.per_task} "
            f"examples per task x {len(tasks)} tasks for every cell; stage 3 seeds {seeds}. "
            f"Examples scored: {counts} (dev chose the settings, test chose nothing).\n\n"
            "## Mean over seeds, per cell\n\n" + markdown_table(means)
            + "\n## Against the reference, over seeds\n\n`mean` of the seed-by-seed differences (primary: mean "
            "primary metric; mse_pct: MSE change in % of the reference's, negative = lower; *_points: mean over "
            "classification tasks, in points); `ahead`/`below`: seeds with a positive/negative difference.\n\n"
            + (markdown_table(over_seeds) if not over_seeds.empty else "(no pairs yet)\n")
            + "\n## Per seed, with paired bootstrap 95% intervals\n\n"
            + (markdown_table(pairs) if not pairs.empty else "(no pairs yet)\n")
            + "\n## Every cell\n\n" + markdown_table(cells))
    (RESULTS / f"weighting_grid_{name}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"weighting_grid_{name}.json").write_text(json.dumps(
        {"command": command, "run_dir": str(cfg.resolved_run_dir), "cells": report.records(cells),
         "means": report.records(means), "over_seeds": report.records(over_seeds), "pairs": report.records(pairs)},
        indent=2) + "\n",
        encoding="utf-8")


def headline(result: dict, loss: str, prefix: str) -> dict[str, float]:
    """dao minus static for `loss`, means over seeds: MSE change in % (the regression tasks' mean) and accuracy points,
    on test (no suffix) and dev (`_dev`); and the number of seeds."""
    values = {}
    for split, suffix in (("test", ""), ("dev", "_dev")):
        rows = [row for row in result["over_seeds"] if row["weighting"] == "dao" and row["loss"] == loss
                and row["against"] == "vs static" and row["split"] == split]
        mse = [row["mean"] for row in rows if row["measure"].startswith("mse_pct:")]
        accuracy = [row["mean"] for row in rows if row["measure"] == "accuracy_points"]
        if mse:
            values[f"{prefix}_dao_vs_static_mse_pct{suffix}"] = float(np.mean(mse))
        if accuracy:
            values[f"{prefix}_dao_vs_static_accuracy_points{suffix}"] = accuracy[0]
        if rows:
            values[f"{prefix}_stage3_seeds"] = max(row["seeds"] for row in rows)
    return values


if __name__ == "__main__":
    main()
