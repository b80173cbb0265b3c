"""Which way of sharing knowledge across tasks, at which budget split, beats one multi-task LoRA trained with the
same examples? Every variant of a config, over several training seeds, on the same examples.

    python benchmarks/sharing.py configs/demo.yaml --runs-root runs/sharing --seeds 0,1,2 \\
        --variant separate \\
        --variant "shared25: experts.examples=768, experts.shared.examples=768" \\
        --variant "hybrid: experts.mode=hybrid, search.init=hybrid"

A variant is a name and dotted overrides of the config (values are YAML). Each variant and seed is a run of its own
(`<runs-root>/<variant>/seed<s>`, `seed` = s, `data_seed` = the config's seed, so every run is scored on the same
dev and test examples) followed by `sentimerge report` with the run's weighting and the multi-task LoRA. The
multi-task LoRA depends only on the seed and the total budget: a variant whose budget equals an earlier one's reuses
its trained baseline and scores (copied, then checked by the report's own fingerprints). Likewise a variant whose
stage 0 and stage 1 settings equal an earlier one's (it changes only the search, stage 3 or the export) starts from
that run's prepared data, shared adapter and experts (copied; the stages' fingerprints check them as on a resume).

Writes benchmarks/results/sharing_<name>.{md,json} (the variants of earlier invocations kept, a variant run again
replaced): per variant, seed and split the final model's mean primary
metric, the multi-task LoRA's, their difference with its paired bootstrap interval, the evolved merge's, the
experts' share of the budget and the examples and optimizer steps; then per variant and split the mean and sd over
the seeds and the seeds where the final model is ahead. With `--record VARIANT`, that variant's mean differences go
to summary.json as `<name>_final_minus_multitask_<split>` (`--test-name` renames the test split there), its expert
share as `<name>_expert_budget_share`, and the means over the seeds of the final model and the multi-task LoRA as
`<name>_final_mean_over_seeds` and `<name>_multitask_lora_mean_over_seeds` (dev; `_<test-name>` beside them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import record  # noqa: E402
from sentimerge.pipeline import report  # noqa: E402
from sentimerge.pipeline.api import session  # noqa: E402
from sentimerge.pipeline.core.config import RunConfig, load_config  # noqa: E402
from sentimerge.pipeline.core.errors import ConfigError  # noqa: E402
from sentimerge.pipeline.core.evaluation import markdown_table  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, is_done  # noqa: E402
from sentimerge.pipeline.core.runtime import setup_logging  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """`name: a.b=1, c=x` -> (name, {"a.b": 1, "c": "x"}); a bare name has no overrides."""
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return name.strip(), overrides


def variant_config(cfg: RunConfig, overrides: dict[str, object], seed: int, run_dir: Path) -> RunConfig:
    """`cfg` with the dotted overrides, training seed `seed`, the data of `cfg.seed`, and its own run directory;
    validated as a config file would be. A relative `data_root` override is taken from the working directory, as
    `--data-root` on the command line is (the run's config.yaml then holds the absolute path)."""
    raw = cfg.model_dump(mode="json", exclude_unset=True)  # as written: a default never conflicts with an override
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if isinstance(overrides.get("data_root"), str):
        raw["data_root"] = str(Path(overrides["data_root"]).absolute())
    raw.update(seed=seed, data_seed=cfg.resolved_data_seed, run_dir=str(run_dir))
    try:
        return RunConfig.model_validate(raw)
    except ValueError as error:
        raise ConfigError(f"variant overrides {overrides}: {error}") from None


def reuse_multitask(run: RunDir, done: dict[tuple[int, int], RunDir], seed: int, examples: int) -> None:
    """Copy the multi-task LoRA (and its scores) of an earlier run with the same seed and budget."""
    earlier = done.get((seed, examples))
    if earlier is None or is_done(run.report_multitask) or not is_done(earlier.report_multitask):
        return
    shutil.copytree(earlier.report_multitask, run.report_multitask)
    for path in earlier.report.glob("eval-multitask-base*"):
        shutil.copy2(path, run.report / path.name)


STAGE1_FOLDERS = ("prepare", "shared", "hybrid", "experts")
LATER_SECTIONS = ("search", "finetune", "export", "run_dir")


def stage1_key(cfg: RunConfig) -> str:
    """Everything of `cfg` that stages 0 and 1 may read: two runs with the same key train the same experts. (It leaves
    out only the later stages' sections, so it is stricter than the stages' own fingerprints, never looser.)"""
    raw = {**cfg.model_dump(mode="json"), "data_seed": cfg.resolved_data_seed}
    return json.dumps({key: value for key, value in raw.items() if key not in LATER_SECTIONS}, sort_keys=True)


def reuse_stage1(run: RunDir, cfg: RunConfig, done: dict[str, RunDir]) -> None:
    """Copy stages 0 and 1 of an earlier run with the same `stage1_key` (`done`: key -> run) into `run`, unless
    `run` already has experts of its own. The pipeline then finds them finished and checks their fingerprints."""
    earlier = done.get(stage1_key(cfg))
    if earlier is None or earlier.root == run.root or run.experts.exists() or not is_done(earlier.prepare):
        return
    for folder in STAGE1_FOLDERS:
        source = earlier.root / folder
        if source.is_dir():
            shutil.copytree(source, run.root / folder)


def task_rows_of(name: str, seed: int, result: dict) -> list[dict]:
    """Per task and split: the final model's and the multi-task LoRA's primary metric, and the evolved merge's."""
    rows = []
    for split, table in result["tables_by_split"].items():
        by_model = {row["model"]: row for row in table}
        final = by_model[next(label for label in by_model if label.startswith("final ("))]
        multitask, evolved = by_model.get(report.MULTITASK, {}), by_model.get("evolved merge", {})
        tasks = [key for key in final if key not in ("model", "mean", "retention")]
        rows += [{"variant": name, "seed": seed, "split": split, "task": task, "final": final[task],
                  "multitask": multitask.get(task), "evolved": evolved.get(task)} for task in tasks]
    return rows


def model_rows_of(name: str, seed: int, result: dict) -> list[dict]:
    """Per split, every model of the report's table (zero-shot, experts, uniform, TIES, evolved, final, multi-task
    LoRA): its mean primary metric, all scored on the same examples."""
    return [{"variant": name, "seed": seed, "split": split, "model": row["model"], "mean": row["mean"]}
            for split, table in result["tables_by_split"].items() for row in table]


def model_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per variant, split and model: the mean primary metric's mean and sd over the seeds."""
    summary = rows.groupby(["variant", "split", "model"], sort=False).agg(
        seeds=("seed", "count"), mean=("mean", "mean"), sd=("mean", "std"))
    return summary.reset_index()


def task_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per variant, split and task: means over the seeds and the mean of the seed-by-seed final - multi-task."""
    rows = rows.assign(difference=rows["final"] - rows["multitask"])
    summary = rows.groupby(["variant", "split", "task"], sort=False).agg(
        seeds=("seed", "count"), final=("final", "mean"), multitask=("multitask", "mean"),
        evolved=("evolved", "mean"), difference=("difference", "mean"), sd=("difference", "std"))
    return summary.reset_index().rename(columns={"difference": "final - multitask"})


def rows_of(name: str, seed: int, result: dict) -> list[dict]:
    budgets = result["budgets"]
    rows = []
    for split, table in result["tables_by_split"].items():
        means = {row["model"]: row["mean"] for row in table}
        final = next(label for label in means if label.startswith("final ("))
        versus = result["final_minus_multitask"].get(split, {}).get("seeds", [{}])[0].get("mean", {})
        rows.append({"variant": name, "seed": seed, "split": split, "final": means[final],
                     "multitask": means.get(report.MULTITASK), "difference": versus.get("difference"),
                     "low": versus.get("low"), "high": versus.get("high"), "evolved": means.get("evolved merge"),
                     "experts": means.get(report.EXPERTS), "expert_share": budgets["expert_share"],
                     "examples": budgets["pipeline_examples"], "multitask_steps": budgets["multitask_steps"]})
    return rows


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (name, split), group in rows.groupby(["variant", "split"], sort=False):
        gaps = group["difference"].dropna()
        out.append({"variant": name, "split": split, "seeds": len(group),
                    "final": group["final"].mean(), "final sd": group["final"].std(ddof=1),
                    "multitask": group["multitask"].mean(), "final - multitask": gaps.mean(),
                    "sd": gaps.std(ddof=1), "final ahead": f"{int((gaps > 0).sum())} of {len(gaps)}",
                    "expert share": group["expert_share"].iloc[0], "examples": int(group["examples"].iloc[0])})
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--runs-root", required=True)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--variant", action="append", required=True, help="NAME[: key=value, ...]")
    parser.add_argument("--record", help="a variant whose figures go to summary.json")
    parser.add_argument("--test-name", default="test",
                        help="the test split's name in the recorded keys (for a held-out half of each dev split, "
                             "benchmarks/dev_halves.py: unseen_dev)")
    parser.add_argument("--notes", help="a note recorded with the keys (which examples, how many seeds)")
    parser.add_argument("--finished-only", action="store_true",
                        help="tabulate the reports already written, run nothing (a benchmark cut short)")
    args = parser.parse_args()
    setup_logging()
    base = load_config(args.config)
    variants = [parse_variant(text) for text in args.variant]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    # seed-major, so an interrupted benchmark has every variant at its first seeds; every override is checked
    # before anything trains
    configs = {(name, seed): variant_config(base, overrides, seed, Path(args.runs_root) / name / f"seed{seed}")
               for seed in seeds for name, overrides in variants}
    command = "python " + shlex.join(["benchmarks/sharing.py", *sys.argv[1:]])
    rows, task_rows, model_rows, done, trained = [], [], [], {}, {}
    for (name, seed), cfg in configs.items():
        run = RunDir(cfg.resolved_run_dir)
        if args.finished_only and not (run.report / "report.json").is_file():
            print(f"{name} seed {seed}: no report in {run.report}, left out")
            continue
        examples = report.budgets(cfg)["multitask_examples"]
        if not args.finished_only:
            run.report.mkdir(parents=True, exist_ok=True)
            reuse_multitask(run, done, seed, examples)
            reuse_stage1(run, cfg, trained)
            with session(cfg):
                report.main(cfg, weightings=(cfg.finetune.weighting.name,), multitask=True, command=command)
        done.setdefault((seed, examples), run)
        trained.setdefault(stage1_key(cfg), run)
        result = json.loads((run.report / "report.json").read_text(encoding="utf-8"))
        rows += rows_of(name, seed, result)
        task_rows += task_rows_of(name, seed, result)
        model_rows += model_rows_of(name, seed, result)
        # after every run: nothing finished is lost
        summary = write_results(base.name, command, pd.DataFrame(rows), pd.DataFrame(task_rows),
                                pd.DataFrame(model_rows))
    if args.record:
        chosen = summary[summary["variant"] == args.record]
        names = {"test": args.test_name}
        values = {f"{base.name}_final_minus_multitask_{names.get(row['split'], row['split'])}": row["final - multitask"]
                  for row in chosen.to_dict("records")}
        values[f"{base.name}_expert_budget_share"] = float(chosen["expert share"].iloc[0])
        models = model_summary(pd.DataFrame(model_rows))
        for row in models[models["variant"] == args.record].to_dict("records"):
            suffix = "" if row["split"] == "dev" else f"_{names.get(row['split'], row['split'])}"
            if row["model"] == report.MULTITASK:
                values[f"{base.name}_multitask_lora_mean_over_seeds{suffix}"] = row["mean"]
            elif row["model"].startswith("final ("):
                values[f"{base.name}_final_mean_over_seeds{suffix}"] = row["mean"]
        record(values, command=command, notes=args.notes)


def write_results(name: str, command: str, table: pd.DataFrame, tasks: pd.DataFrame,
                  models: pd.DataFrame) -> pd.DataFrame:
    """Write sharing_<name>.{md,json} from the rows so far, keeping the rows of the variants this invocation does
    not run from the file already there (earlier benchmarks; a variant run again replaces its rows); return the
    summary over seeds."""
    path = RESULTS / f"sharing_{name}.json"
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    ran = set(table["variant"])

    def kept(key: str, new: pd.DataFrame) -> pd.DataFrame:
        old = pd.DataFrame(earlier.get(key, []))
        old = old[~old["variant"].isin(ran)] if len(old) else old
        return pd.concat([old, new], ignore_index=True) if len(old) else new

    table = kept("rows", table)
    summary, by_task, by_model = summary_table(table), kept("tasks", task_summary(tasks)), \
        kept("models", model_summary(models))
    commands = [*(entry for entry in earlier.get("commands", [earlier["command"]] if "command" in earlier else [])
                  if entry != command), command]
    text = (f"# Sharing and budget split: {name}\n\n" + "".join(f"`{entry}`\n\n" for entry in commands)
            + "Per seed (primary metric, mean over tasks; difference: final - multi-task LoRA, paired bootstrap 95% "
              "interval):\n\n" + markdown_table(table)
            + "\nOver the seeds:\n\n" + markdown_table(summary)
            + "\nPer task, over the seeds (primary metric; final - multi-task: mean and sd of the seed-by-seed "
              "differences):\n\n" + markdown_table(by_task)
            + "\nEvery model of the final tables, over the seeds (mean primary metric over tasks, each row of a "
              "split on the same examples):\n\n" + markdown_table(by_model))
    (RESULTS / f"sharing_{name}.md").write_text(text, encoding="utf-8")
    path.write_text(json.dumps(
        {"commands": commands, "rows": report.records(table), "summary": report.records(summary),
         "tasks": report.records(by_task), "models": report.records(by_model)}, indent=2) + "\n", encoding="utf-8")
    print(text)
    return summary


if __name__ == "__main__":
    main()
