"""Two sets of finished runs that differ in one setting before stage 3 (the search's start, the experts' loss...):
their final models on the same examples, run by run, with a paired bootstrap interval.

    python benchmarks/paired_runs.py --name demo_search_auto --a runs/auto0 runs/auto1 runs/auto2 \\
        --b runs/demo0 runs/demo1 runs/demo2 [--label-a "search.init auto"] [--label-b "search.init 1.0"]

The i-th run of `--a` is paired with the i-th of `--b`: same seed, same data, so the same final-table examples
(checked by id). Each run's final model is read from the predictions `sentimerge report` (or
benchmarks/stage3_ablation.py) cached in RUN/report/eval-finetune-<weighting>[-<split>].predictions.jsonl; a run
without them is named in a one-line error. Per pair and split: both means, a - b with its paired bootstrap 95%
interval (2000 resamples, seeded by the run's seed); over the pairs: the mean and sd of the differences and the pairs
where a is ahead. `--merges evolved,uniform,ties` pairs those rows of stage 2's final tables too (their predictions in
RUN/search/final_predictions[_<split>].jsonl, on the same examples as the final model). Writes
benchmarks/results/paired_runs_<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sentimerge.pipeline import report  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.evaluation import evaluation_splits, markdown_table  # noqa: E402
from sentimerge.pipeline.core.metrics import compute_metrics, paired_bootstrap  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def final_predictions(folder: Path, split: str, key: str | None = None) -> tuple[dict[str, list[dict]], float]:
    """({task: [{"id", "label", "prediction", ...}]}, mean primary metric over tasks) of the run's own final model on
    `split`'s final-table examples; `key`: another scored model of the run instead (`ablation-<name>`, a stage 3
    variant of benchmarks/stage3_ablation.py or weighting_grid.py)."""
    cfg = load_config(folder / "config.yaml", run_dir=str(folder))
    run = RunDir(cfg.resolved_run_dir)
    key = key or report.weighting_variant(cfg, run, cfg.finetune.weighting.name).key  # the report's, for its own
    path = run.report_eval(key if split == "dev" else f"{key}-{split}")
    kept = path.with_suffix(".predictions.jsonl")
    if not kept.is_file():
        raise SystemExit(f"{kept}: no scored final model; run `sentimerge report` or benchmarks/stage3_ablation.py "
                         "on this run first")
    return {row["task"]: row["predictions"] for row in read_jsonl(kept)}, float(pd.read_csv(path)["primary"].mean())


def merge_predictions(folder: Path, split: str, model: str) -> dict[str, list]:
    """{task: predictions} of stage 2's final-table row `model` (evolved, uniform, ties, base...) on `split`."""
    path = RunDir(folder).search / ("final_predictions.jsonl" if split == "dev" else f"final_predictions_{split}.jsonl")
    rows = {row["model"]: row["predictions"] for row in read_jsonl(path)} if path.is_file() else {}
    if model not in rows:
        raise SystemExit(f"{path}: no final-table row {model!r} (rows: {', '.join(rows) or 'none'})")
    return rows[model]


def mean_primary(tasks: list, gold: dict[str, list], predicted: dict[str, list]) -> float:
    """The final tables' `mean`: each task's primary metric (`compute_metrics`), averaged over the tasks."""
    return float(np.mean([compute_metrics(task, gold[task.name], predicted[task.name])["primary"] for task in tasks]))


def compare(a: Path, b: Path, merges: tuple[str, ...] = (), keys: tuple[str | None, str | None] = (None, None)
            ) -> list[dict]:
    """One pair of runs: a row per split and model (the final model, or the models `keys` name, then each of
    `merges`)."""
    cfg = load_config(a / "config.yaml", run_dir=str(a))
    rows = []
    for split in evaluation_splits(RunDir(cfg.resolved_run_dir), cfg):
        (first, mean_a), (second, mean_b) = final_predictions(a, split, keys[0]), final_predictions(b, split, keys[1])
        for task in cfg.tasks:
            if [row["id"] for row in first[task.name]] != [row["id"] for row in second[task.name]]:
                raise SystemExit(f"{a} and {b}: task {task.name} was scored on other {split} examples; pair runs "
                                 "with the same seed and data")
        gold = {name: [row["label"] for row in rows_] for name, rows_ in first.items()}
        pairs = [("final", {name: [row["prediction"] for row in rows_] for name, rows_ in first.items()},
                  {name: [row["prediction"] for row in rows_] for name, rows_ in second.items()})]
        pairs += [(model, merge_predictions(a, split, model), merge_predictions(b, split, model)) for model in merges]
        for model, predicted_a, predicted_b in pairs:
            result = paired_bootstrap(list(cfg.tasks), gold, predicted_a, predicted_b, seed=cfg.seed)
            versus = result["mean"]
            means = (mean_a, mean_b) if model == "final" else (mean_primary(cfg.tasks, gold, predicted_a),
                                                               mean_primary(cfg.tasks, gold, predicted_b))
            rows.append({"a": str(a), "b": str(b), "model": model, "seed": cfg.seed, "split": split,
                         "a_mean": means[0], "b_mean": means[1], "difference": versus["difference"],
                         "low": versus["low"], "high": versus["high"], "p_better": versus["p_better"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--a", nargs="+", type=Path, required=True)
    parser.add_argument("--b", nargs="+", type=Path, required=True)
    parser.add_argument("--label-a", default="a")
    parser.add_argument("--label-b", default="b")
    parser.add_argument("--key-a", help="score runs of a by this scored model instead of their own final model "
                                         "(e.g. ablation-dao-level_ce-seed0, a weighting grid cell)")
    parser.add_argument("--key-b", help="the same for the runs of b")
    parser.add_argument("--merges", default="", help="stage 2 rows to pair too, comma-separated: evolved,uniform,ties")
    args = parser.parse_args()
    merges = tuple(filter(None, (name.strip() for name in args.merges.split(","))))
    if len(args.a) != len(args.b):
        raise SystemExit(f"--a has {len(args.a)} runs and --b {len(args.b)}: pair them one to one")
    command = "python " + shlex.join(["benchmarks/paired_runs.py", *sys.argv[1:]])
    keys = (args.key_a, args.key_b)
    rows = pd.DataFrame([row for a, b in zip(args.a, args.b) for row in compare(a, b, merges, keys)])
    summary = pd.DataFrame([{"model": model, "split": split, "pairs": len(group), "a_mean": group["a_mean"].mean(),
                             "b_mean": group["b_mean"].mean(), "difference": group["difference"].mean(),
                             "sd": group["difference"].std(ddof=1) if len(group) > 1 else None,
                             "a ahead": f"{int((group['difference'] > 0).sum())} of {len(group)}"}
                            for (model, split), group in rows.groupby(["model", "split"], sort=False)])
    text = (f"# Paired runs: {args.name}\n\n`{command}`\n\nThe final model (and the stage 2 rows asked for) of a "
            f"({args.label_a}) minus b ({args.label_b}), mean primary metric over tasks, paired bootstrap 95% interval "
            "over the same examples:\n\n"
            + markdown_table(rows) + "\nOver the pairs:\n\n" + markdown_table(summary))
    (RESULTS / f"paired_runs_{args.name}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"paired_runs_{args.name}.json").write_text(json.dumps(
        {"command": command, "a": args.label_a, "b": args.label_b, "rows": report.records(rows),
         "summary": report.records(summary)}, indent=2) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
