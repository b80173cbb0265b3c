"""Flat against multi-stage merging (MEM-MCL, Inoshita, Zhou and Kawai, arXiv 2601.06780) on the same experts, at
the same number of candidate evaluations.

    python benchmarks/multistage.py runs/sharing_suite/shared_bs2/seed0 ... --name suite \\
        --runs-root runs/multistage_suite \\
        --groups "sentiment=sst5,fpb,fin_tweets; aspect=absa,fin_headlines; subjectivity=tweet_emotion,tweet_irony,subjectivity" \\
        --group-generations 2 --generations 2 [--record suite] [--level-spearman]

Each RUN is a finished flat search (its `config.yaml` is the resolved config). The multi-stage search runs in
`<runs-root>/seed<s>`, on RUN's prepared data, shared adapter and experts (hard links: the same files), with
`search.stages: groups`, the groups given (default: the tasks' `group` field), `search.group_generations` and
`search.generations` as given; everything else, the final tables' examples included, is RUN's. The number of
candidates each search scored (level 1 + level 2 against the flat log) is in the table: choose the generations so
that they match (flat: population x generations).

Per run and split (dev chose the settings, test chose nothing): the multi-stage evolved merge minus the flat one,
and each minus TIES and uniform task arithmetic, with paired bootstrap 95% intervals on the same examples; the
retention of each evolved merge (its mean primary metric / the mean of each expert on its own task); the weak
fitness against gold Spearman over the final table of each search; the search's seconds. Over runs: means, sd and
the runs ahead. Writes benchmarks/results/multistage_<name>.{md,json} after every run; `--record PREFIX` records
`PREFIX_multistage_minus_flat` (test split, mean over runs), `PREFIX_multistage_minus_flat_dev` and
`PREFIX_retention_multistage` (test) in summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sharing import variant_config  # noqa: E402
from benchmarks.summary import record  # noqa: E402
from sentimerge.pipeline import report, search  # noqa: E402
from sentimerge.pipeline.api import session  # noqa: E402
from sentimerge.pipeline.core.config import RunConfig, load_config  # noqa: E402
from sentimerge.pipeline.core.evaluation import evaluation_splits, final_examples, markdown_table  # noqa: E402
from sentimerge.merge.engine import InMemoryMerge  # noqa: E402
from sentimerge.merge.methods import get_method  # noqa: E402
from sentimerge.pipeline.core.candidates import load_search_inputs  # noqa: E402
from sentimerge.pipeline.core.metrics import paired_bootstrap, spearman  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl  # noqa: E402
from sentimerge.pipeline.core.runtime import setup_logging  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_groups(text: str) -> dict[str, list[str]]:
    """`a=x,y; b=z` -> {"a": ["x", "y"], "b": ["z"]}."""
    groups = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, members = item.partition("=")
        if not sep:
            raise SystemExit(f"--groups: {item!r} is not NAME=TASK,TASK")
        groups[name.strip()] = [task.strip() for task in members.split(",") if task.strip()]
    return groups


def multistage_run(cfg: RunConfig, flat: RunDir, root: Path, overrides: dict) -> RunConfig:
    """The multi-stage search's config in `root`, with the flat run's stage 1 (prepared data, shared adapter,
    experts) linked in; nothing is linked over a folder that exists."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("prepare", "shared", "hybrid", "experts"):
        source, target = flat.root / folder, root / folder
        if source.is_dir() and not target.exists():
            shutil.copytree(source, target, copy_function=os.link)
    return variant_config(cfg, overrides, cfg.seed, root)


def evaluations(run: RunDir) -> int:
    """Candidates the search scored: the flat log, plus every level-1 group log of a multi-stage search."""
    return len(read_jsonl(run.search_candidates)) + sum(len(read_jsonl(path))
                                                         for path in run.search_level_logs().values())


def predictions(run: RunDir, split: str) -> dict[str, dict[str, list]]:
    """model -> task -> predictions of the search's final table on `split`."""
    return {row["model"]: row["predictions"] for row in read_jsonl(run.search_final_predictions_of(split))}


def retention(table: pd.DataFrame, model: str) -> float:
    """The model's mean primary metric over the tasks / the mean of each expert on its own task."""
    indexed = table.set_index("model")
    tasks = [column for column in indexed.columns if f"expert:{column}" in indexed.index]
    experts = np.mean([indexed.loc[f"expert:{task}", task] for task in tasks])
    return float(indexed.loc[model, tasks].mean() / experts)


def compare(cfg: RunConfig, flat: RunDir, staged: RunDir) -> list[dict]:
    """Rows per split: the multi-stage evolved merge against the flat one, TIES and uniform, and the flat one
    against TIES and uniform (paired bootstrap on the same examples); then each search's evolved merge."""
    rows = []
    reports = {label: json.loads(run.search_report.read_text(encoding="utf-8")) for label, run in
               (("flat", flat), ("multistage", staged))}
    for split in evaluation_splits(flat, cfg):
        examples = final_examples(flat, cfg, split)
        gold = {name: [row["label"] for row in data] for name, data in examples.items()}
        mine, theirs = predictions(staged, split), predictions(flat, split)
        tables = {"flat": pd.read_csv(flat.search_final_table(split)),
                  "multistage": pd.read_csv(staged.search_final_table(split))}
        for comparison, a, b in (("multistage - flat", mine["evolved"], theirs["evolved"]),
                                 ("multistage - ties", mine["evolved"], mine["ties"]),
                                 ("multistage - uniform", mine["evolved"], mine["uniform"]),
                                 ("flat - ties", theirs["evolved"], theirs["ties"]),
                                 ("flat - uniform", theirs["evolved"], theirs["uniform"])):
            versus = paired_bootstrap(list(cfg.tasks), gold, a, b, seed=cfg.seed)["mean"]
            rows.append({"run": str(flat.root), "seed": cfg.seed, "split": split, "comparison": comparison,
                         "difference": versus["difference"], "low": versus["low"], "high": versus["high"],
                         "p_better": versus["p_better"]})
        for label, run in (("flat", flat), ("multistage", staged)):
            indexed = tables[label].set_index("model")
            rows.append({"run": str(flat.root), "seed": cfg.seed, "split": split, "comparison": f"{label} evolved",
                         "mean": float(indexed.loc["evolved", "mean"]), "retention": retention(tables[label], "evolved"),
                         "spearman": reports[label]["weak_vs_gold_spearman"]["final_table"],
                         "evaluations": evaluations(run), "search_seconds": _seconds(run),
                         **{f"gold:{task.name}": float(indexed.loc["evolved", task.name]) for task in cfg.tasks}})
    return rows


def level_one_spearman(cfg: RunConfig, staged: RunDir, split: str = "dev") -> list[dict]:
    """Per level-1 group of a finished multi-stage search: the weak-vs-gold Spearman over the group's models that have
    a weak fitness (its baselines: the start and each expert alone; and every candidate its CMA-ES logged), gold being
    the mean primary metric over the group's tasks on the final table's `split` examples. Gold scores are kept in
    `search/levels/gold_<split>.json` (a rerun scores nothing twice). Level 2's Spearman is the final table's."""
    plan = json.loads(staged.search_level_plan.read_text(encoding="utf-8"))["groups"]
    cache_path = staged.search_levels / f"gold_{split}.json"
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    loaded = None
    rows = []
    for group in plan:
        name, experts = group["name"], group["experts"]
        if len(experts) < 2:
            continue  # a group of one goes straight to level 2
        points = [(key, row["fitness"], row["coefficients"]) for key, row in
                  json.loads(staged.search_level_baselines(name).read_text(encoding="utf-8")).items()]
        points += [(f"gen {row['generation']} cand {row['index']}", row["fitness"], row["coefficients"])
                   for row in read_jsonl(staged.search_level_log(name)) if row["status"] == "ok"]
        gold = cache.setdefault(name, {})
        for key, _, coefficients in points:
            if key in gold:
                continue
            if loaded is None:
                model, tokenizer, adapters, genome = load_search_inputs(cfg, staged)
                merger = InMemoryMerge(model, adapters, genome, get_method("task_arithmetic"))
                sets = search._gold_sets(staged, cfg, tokenizer, cfg.search.gold.final, "eval", split)
                loaded = (model, tokenizer, merger, sets)
            model, tokenizer, merger, sets = loaded
            scored = search._gold_score(merger, model, tokenizer, [s for s in sets if s.task.name in experts],
                                        coefficients, cfg.search.batch_size)
            gold[key] = scored["mean"]
            cache_path.write_text(json.dumps(cache, indent=2) + "\n", encoding="utf-8")
        weak = [fitness for _, fitness, _ in points]
        rows.append({"group": name, "tasks": ",".join(experts), "models": len(points),
                     "spearman": spearman(weak, [gold[key] for key, _, _ in points])})
    return rows


def _seconds(run: RunDir) -> float:
    timing = json.loads((run.search / "timing.json").read_text(encoding="utf-8"))["seconds"]
    return round(sum(timing.values()), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--name", required=True, help="the results file's name: multistage_<name>")
    parser.add_argument("--runs-root", type=Path, required=True, help="the multi-stage runs go to <root>/seed<s>")
    parser.add_argument("--groups", help="NAME=TASK,TASK; ... (default: the tasks' `group` field)")
    parser.add_argument("--group-generations", type=int, required=True, help="level 1 CMA-ES generations per group")
    parser.add_argument("--generations", type=int, required=True, help="level 2 CMA-ES generations")
    parser.add_argument("--record", metavar="PREFIX")
    parser.add_argument("--level-spearman", action="store_true",
                        help="also score every level-1 group's baselines and candidates on gold dev (their "
                             "weak-vs-gold Spearman; kept in the multi-stage run)")
    args = parser.parse_args()
    setup_logging()
    command = "python " + shlex.join(["benchmarks/multistage.py", *sys.argv[1:]])
    overrides = {"search.stages": "groups", "search.group_generations": args.group_generations,
                 "search.generations": args.generations,
                 **({"search.groups": parse_groups(args.groups)} if args.groups else {})}
    rows = []
    for folder in args.runs:
        cfg = load_config(folder / "config.yaml", run_dir=str(folder))
        flat = RunDir(cfg.resolved_run_dir)
        if not is_done(flat.search):
            raise SystemExit(f"{flat.search}: no finished search")
        staged_cfg = multistage_run(cfg, flat, args.runs_root / f"seed{cfg.seed}", overrides)
        with session(staged_cfg) as staged:
            search.main(staged_cfg)
        rows += compare(cfg, flat, staged)
        if args.level_spearman:
            rows += [{"run": str(flat.root), "seed": cfg.seed, "split": "dev",
                      "comparison": f"level 1 {row['group']} ({row['tasks']})", "spearman": row["spearman"],
                      "models": row["models"]}
                     for row in level_one_spearman(staged_cfg, RunDir(staged_cfg.resolved_run_dir))]
        table = write_results(args.name, command, pd.DataFrame(rows))
    if args.record:
        record(headline(table, args.record), command=command,
               notes=f"{len(args.runs)} runs (seeds of the experts); test = the split that chose nothing")


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    summary = []
    for (comparison, split), group in rows.groupby(["comparison", "split"], sort=False):
        entry = {"comparison": comparison, "split": split, "runs": len(group)}
        if group["difference"].notna().all():
            differences = group["difference"]
            entry.update(difference=differences.mean(), sd=differences.std(ddof=1) if len(group) > 1 else np.nan,
                         ahead=f"{int((differences > 0).sum())} of {len(group)}",
                         clear=f"{int((group['low'] > 0).sum())} of {len(group)}")
        else:
            gold = [key for key in group.columns if key.startswith("gold:") and group[key].notna().all()]
            entry.update({key: group[key].mean() for key in ("mean", "retention", "spearman", "evaluations",
                                                             "search_seconds", "models", *gold) if key in group})
        summary.append(entry)
    return pd.DataFrame(summary)


def write_results(name: str, command: str, rows: pd.DataFrame) -> pd.DataFrame:
    summary = summarize(rows)
    text = (f"# Flat against multi-stage merging: {name}\n\n`{command}`\n\nPer run (the experts' seed) and split "
            "(dev chose the settings, test chose nothing): the multi-stage evolved merge minus the flat one, TIES "
            "and uniform (and the flat one minus TIES), mean primary metric over tasks with a paired bootstrap 95% "
            "interval on the same examples; each search's evolved merge (its mean and, `gold:TASK`, each task's primary "
            "metric), its retention of the experts' mean, the "
            "weak-vs-gold Spearman over its final table (level 2), its candidate evaluations and seconds; with "
            "`--level-spearman`, each level-1 group's weak-vs-gold Spearman over its `models` (its baselines and "
            "logged candidates; gold: the group's tasks on the dev final-table examples).\n\n"
            + markdown_table(rows) + "\nOver the runs (`clear`: runs whose interval lies above zero):\n\n"
            + markdown_table(summary))
    (RESULTS / f"multistage_{name}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"multistage_{name}.json").write_text(json.dumps(
        {"command": command, "rows": report.records(rows), "summary": report.records(summary)}, indent=2) + "\n",
        encoding="utf-8")
    print(text)
    return summary


def headline(summary: pd.DataFrame, prefix: str) -> dict[str, float]:
    indexed = summary.set_index(["comparison", "split"])
    values = {}
    for split, suffix in (("test", ""), ("dev", "_dev")):
        if ("multistage - flat", split) in indexed.index:
            values[f"{prefix}_multistage_minus_flat{suffix}"] = float(indexed.loc[("multistage - flat", split),
                                                                                  "difference"])
    if ("multistage evolved", "test") in indexed.index:
        values[f"{prefix}_retention_multistage"] = float(indexed.loc[("multistage evolved", "test"), "retention"])
    return values


if __name__ == "__main__":
    main()
