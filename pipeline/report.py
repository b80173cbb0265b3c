"""`sentimerge report CONFIG`: run the pipeline, then compare every merge and fine-tuning strategy on the dev splits.

One Markdown report answers: per task and on average, how do the zero-shot base model, each expert on its own task,
uniform task arithmetic, TIES and the evolved merge (stage 2's final table), the final model fine-tuned with each
task-weighting strategy, and a multi-task LoRA trained directly on the base model compare? Every fine-tuned variant
has the run's stage 3 settings and seed; only the weighting differs (the run's own `finetune/` is reused for its
weighting, the others train into `<run>/report/`). The multi-task LoRA trains from scratch like an expert (the
experts' LoRA and learning rate, static weights) on as many examples as the experts and stage 3 together.

With `--seeds K` every fine-tuned variant is trained K times, with stage 3 seeds run seed, +1, ... (the start model
and dev examples stay), and a table across seeds gives each one's mean, sd and seed-by-seed difference to static.

Every variant is scored on exactly the dev examples of stage 2's final table, in the export's dtype. Trained variants
and their scores are kept, so a killed report resumes and a second one only rewrites the tables. Writes
`<run>/report/report.{md,csv,json}`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sentimerge.experts.multitask import multitask_lora_config
from sentimerge.pipeline import finetune
from sentimerge.pipeline.core.config import RunConfig, WeightingSettings, positive_int
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.evaluation import (
    evaluate_model,
    evaluation_splits,
    final_examples,
    markdown_table,
    merge_labels,
)
from sentimerge.pipeline.core.metrics import paired_bootstrap
from sentimerge.pipeline.core.rundir import (
    RunDir,
    digest,
    is_done,
    read_jsonl,
    read_manifest,
    write_csv_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from sentimerge.pipeline.run import main as run_pipeline

log = logging.getLogger("sentimerge.report")

WEIGHTINGS = ("dao", "static", "uncertainty", "dwa", "famo")
EXPERTS = "each expert on its own task"
MULTITASK = "multi-task LoRA on base"
# bumped when the way a variant is scored changes, so that cached scores are scored again (2: the in-memory model
# keeps RoPE's inv_freq in float32, as the reloaded export does)
SCORING = 2
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "mse": "MSE", "pearson": "Pearson"}


@dataclass(frozen=True)
class Variant:
    """One fine-tuned model of the report: its row, its cache name, where it trains and the config it trains with."""

    label: str
    key: str
    folder: Path
    cfg: RunConfig


def check_weightings(names: Sequence[str]) -> tuple[str, ...]:
    """The strategies asked for, in order without repeats; unknown ones fail at once, naming each."""
    from sentimerge.pipeline.core.weighting import WEIGHTINGS as REGISTRY

    problems = [f"--weightings: {problem}" for problem in map(REGISTRY.problem, names) if problem]
    if problems:
        raise SentimergeError("\n".join(problems))
    if not names:
        raise SentimergeError("--weightings: give at least one strategy")
    return tuple(dict.fromkeys(names))


def main(cfg: RunConfig, *, weightings: Sequence[str] = WEIGHTINGS, multitask: bool = True, force: bool = False,
         seeds: int = 1, command: str | None = None) -> pd.DataFrame:
    """Run every stage (finished ones are skipped), train and score the variants, write and print the report.

    `seeds` > 1 trains every fine-tuned variant again with stage 3 seeds run seed + 1, ... (`finetune.seed`: LoRA
    init, batch order, dropout; same start model and dev examples) and adds a table across seeds: one seed does not
    rank weightings whose means lie a few points apart."""
    weightings = check_weightings(weightings)
    if seeds < 1:
        raise SentimergeError(f"--seeds must be at least 1 (got {seeds})")
    if "dev" not in (cfg.search.gold.splits or ("dev",)):
        raise SentimergeError(f"sentimerge report compares its variants on dev: search.gold.splits "
                              f"{list(cfg.search.gold.splits)} leaves it out; add dev")
    run_pipeline(cfg)
    run = RunDir(cfg.resolved_run_dir)
    budget = budgets(cfg)
    rounds = []  # the fine-tuned variants once per stage 3 seed, the run's own seed first
    for offset in range(seeds):
        rounds.append([weighting_variant(cfg, run, name, offset) for name in weightings]
                      + ([multitask_variant(cfg, run, budget["multitask_steps"], offset)] if multitask else []))
    variants = [variant for round_ in rounds for variant in round_]
    splits = evaluation_splits(run, cfg)
    examples = {split: final_examples(run, cfg, split) for split in splits}  # stage 2's final tables' examples
    data = examples["dev"]
    scored, trained = {}, {}
    for variant in variants:
        trained[variant.label] = train(variant, run)
        for split in splits:
            scored[variant.label, split] = evaluate_variant(variant, run, examples[split], force=force, split=split)
    scores = {label: tables for (label, split), (tables, _) in scored.items() if split == "dev"}
    by_split = {split: quality_table(cfg, run, {v.label: scored[v.label, split][0] for v in rounds[0]}, split)
                for split in splits}
    versus_multitask = final_minus_multitask(cfg, rounds, scored, examples)

    table = quality_table(cfg, run, {variant.label: scores[variant.label] for variant in rounds[0]})
    strategies = strategy_table(cfg, {name: scores[f"final ({name})"] for name in weightings})
    across = seed_table(cfg, {same[0].label: [scores[variant.label] for variant in same] for same in zip(*rounds)}
                        ) if seeds > 1 else None
    searched = json.loads(run.search_report.read_text(encoding="utf-8"))
    spearman = searched["weak_vs_gold_spearman"]
    leads = searched.get("gold_dev_comparison")  # stage 2's evolved merge against uniform and TIES, as it wrote them
    command = command or (f"sentimerge.pipeline.report.main({cfg.name}, weightings={list(weightings)}, "
                          f"multitask={multitask}, seeds={seeds})")
    facts = {"config": cfg.name, "resolved_config": str(run.config), "run_dir": str(run.root), "seed": cfg.seed,
             "date": time.strftime("%Y-%m-%d %H:%M:%S%z"), "command": command, "budgets": budget,
             "dev_examples": {name: len(rows) for name, rows in data.items()}, "stage3_seeds": seeds}
    write_csv_atomic(run.report / "report.csv", table)
    write_json_atomic(run.report / "report.json", {
        **facts, "table": records(table), "retention": retention_by_task(cfg, table),
        "strategies": records(strategies), "versus_static": versus_static(cfg, strategies),
        "seeds": {"count": seeds, "table": records(across)} if across is not None else {"count": 1},
        "weak_vs_gold_spearman": spearman, "evolved_vs_baselines": leads,
        "tables_by_split": {split: records(frame) for split, frame in by_split.items()},
        "final_minus_multitask": versus_multitask,
        "variants": {v.label: {"folder": str(v.folder), **{k: trained[v.label].get(k) for k in
                                                           ("start", "weighting", "steps", "examples",
                                                            "train_seconds")}}
                     for v in variants}})
    write_text_atomic(run.report / "report.md", markdown(cfg, facts, table, strategies, spearman, leads, across)
                      + splits_markdown(by_split, versus_multitask, {s: len(r) for s, r in examples.items()}))
    print(f"\nQuality of {cfg.name} (primary dev metric per task; {run.report / 'report.md'}):\n")
    print(markdown_table(table))
    return table


def budgets(cfg: RunConfig) -> dict:
    """The training budget of each part in examples, with its optimizer steps: the experts (steps x batch size per
    trained task; a given expert costs nothing), the shared adapter (`experts.shared`) and stage 3 (steps x per_task x
    tasks). The multi-task LoRA gets all of them together, in whole steps of stage 3's batch (so at least as many
    examples, never fewer)."""
    tasks, per_task = len(cfg.tasks), cfg.finetune.per_task
    expert = cfg.experts.examples_per_task  # separate: steps x batch size; hybrid: steps x per_task
    shared = cfg.experts.shared
    shared_examples = shared.total_steps(tasks) * shared.per_task * tasks
    stage3 = cfg.finetune.steps * per_task * tasks
    trained = tasks - len(cfg.experts.given)  # a given expert costs this run no examples
    pipeline_examples = expert * trained + shared_examples + stage3
    steps = math.ceil(pipeline_examples / (per_task * tasks))
    return {"tasks": tasks, "experts_examples_per_task": expert, "experts_steps_per_task": cfg.experts.total_steps,
            "experts_examples": expert * trained, "given_experts": sorted(cfg.experts.given),
            "shared_examples": shared_examples, "shared_steps": shared.total_steps(tasks),
            "search_population": cfg.search.population, "search_generations": cfg.search.generations,
            "search_weak_examples_per_task": cfg.search.weak.per_task,
            "finetune_steps": cfg.finetune.steps, "finetune_per_task": per_task, "finetune_examples": stage3,
            "pipeline_examples": pipeline_examples,
            "expert_share": round(expert * trained / pipeline_examples, 4) if pipeline_examples else 0.0,
            "multitask_steps": steps, "multitask_examples": steps * per_task * tasks}


def _seeded(run: RunDir, label: str, key: str, folder: Path, cfg: RunConfig, offset: int) -> Variant:
    """The variant as is (offset 0), or trained with stage 3 seed `run seed + offset` into `report/<key>-seed<s>`."""
    if offset == 0:
        return Variant(label, key, folder, cfg)
    seed = cfg.seed + offset
    settings = cfg.finetune.model_copy(update={"seed": seed})
    return Variant(f"{label} seed {seed}", f"{key}-seed{seed}", run.report / f"{key}-seed{seed}",
                   cfg.model_copy(update={"finetune": settings}))


def weighting_variant(cfg: RunConfig, run: RunDir, name: str, offset: int = 0) -> Variant:
    """Stage 3 with weighting `name`: the run's own `finetune/` for its weighting, else a copy under `report/`;
    with `offset` > 0, under `report/` with stage 3 seed run seed + offset."""
    label = f"final ({name})"
    if name == cfg.finetune.weighting.name:
        return _seeded(run, label, f"finetune-{name}", run.finetune, cfg, offset)
    # the run's options belong to its own strategy; the others run with their defaults
    weighting = WeightingSettings(name=name, grad_norm_every=cfg.finetune.weighting.grad_norm_every)
    settings = cfg.finetune.model_copy(update={"weighting": weighting})
    return _seeded(run, label, f"finetune-{name}", run.report_finetune(name),
                   cfg.model_copy(update={"finetune": settings}), offset)


def multitask_variant(cfg: RunConfig, run: RunDir, steps: int, offset: int = 0) -> Variant:
    """A multi-task LoRA on the base model, trained like an expert (its LoRA and learning rate), equal task weights."""
    return _seeded(run, MULTITASK, "multitask-base", run.report_multitask, multitask_lora_config(cfg, steps), offset)


def train(variant: Variant, run: RunDir) -> dict:
    """Train the variant, or skip it when finished (finetune resumes an interrupted one); its manifest."""
    start = finetune.start_model_path(variant.cfg, run)
    if is_done(variant.folder) and not finetune.finished_with(read_manifest(variant.folder), variant.cfg, start,
                                                               finetune.task_order(variant.cfg, run)):
        raise SentimergeError(f"{variant.folder}: trained with another config; delete it to train it again")
    log.info("report: %s in %s", variant.label, variant.folder)
    return finetune.main(variant.cfg, folder=variant.folder)


def evaluate_variant(variant: Variant, run: RunDir, data: dict[str, list[dict]], *, force: bool = False,
                     split: str = "dev") -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """The variant's metrics table (`evaluate_model`'s) on `split`'s examples and its predictions per task, from the
    cache unless it was retrained or the examples moved."""
    cfg = variant.cfg
    path = run.report_eval(variant.key if split == "dev" else f"{variant.key}-{split}")
    kept = path.with_suffix(".predictions.jsonl")
    key = _score_key(variant, data)
    if path.is_file() and kept.is_file() and not force:
        cached = pd.read_csv(path, dtype={"fingerprint": str})
        if "fingerprint" in cached and cached["fingerprint"].iloc[0] == key:
            return cached, {row["task"]: row["predictions"] for row in read_jsonl(kept)}
    model, tokenizer = load_finetuned(variant)
    log.info("report: scoring %s on %s %s examples", variant.label, sum(map(len, data.values())), split)
    table, predictions = evaluate_model(model, tokenizer, list(cfg.tasks), data, batch_size=cfg.evaluate.batch_size)
    table["fingerprint"] = key
    write_jsonl_atomic(kept, [{"task": name, "predictions": rows} for name, rows in predictions.items()])
    write_csv_atomic(path, table)  # after the predictions: its presence with the key means both are current
    return table, predictions


def _score_key(variant: Variant, data: dict[str, list[dict]]) -> str:
    """What decides a variant's scores: the training it finished, the examples and the dtype it is scored in."""
    decisive = {"scoring": SCORING, "trained": read_manifest(variant.folder)["finished_at"],
                "dtype": variant.cfg.export.dtype,
                "examples": {name: [row["id"] for row in rows] for name, rows in data.items()}}
    return digest(decisive)


def load_finetuned(variant: Variant):
    """(model, tokenizer): the adapter merged into its start model as `export` writes it (in memory here)."""
    from transformers import AutoTokenizer

    from sentimerge.pipeline.core.models import pick_device
    from sentimerge.pipeline.export import merged_model

    cfg = variant.cfg
    # where the run is now, not the path its manifest recorded: a run made with a relative run_dir (`runs/demo`)
    # and then moved or copied would load another run's model, or none, from the recorded path
    run = RunDir(cfg.resolved_run_dir, finetune=variant.folder)
    start = finetune.start_model_path(cfg, run)
    adapter = run.finetune_adapter
    model = merged_model(start, adapter, cfg)  # frozen, unlike the reloaded export: the scorer takes one path for both
    model.to(pick_device(cfg.device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(start, trust_remote_code=cfg.base_model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def quality_table(cfg: RunConfig, run: RunDir, scores: dict[str, pd.DataFrame], split: str = "dev") -> pd.DataFrame:
    """Table (a): primary metric per task and mean on `split`, per model; `retention` vs each expert on its task."""
    names = [task.name for task in cfg.tasks]
    search = pd.read_csv(run.search_final_table(split)).set_index("model")
    merges = merge_labels(bool(cfg.experts.shared.examples))
    rows = [{"model": merges[key], **{n: float(search.loc[key, n]) for n in names}} for key in merges
            if key in search.index]
    rows.insert(1, {"model": EXPERTS, **{n: float(search.loc[f"expert:{n}", n]) for n in names}})
    for label, scored in scores.items():
        primary = scored.set_index("task")["primary"]
        rows.append({"model": label, **{n: float(primary[n]) for n in names}})
    table = pd.DataFrame(rows)
    table["mean"] = table[names].mean(axis=1)
    # a ratio of means, as benchmarks/demo_report.py: per-task ratios explode where an expert scores near zero
    experts_mean = float(table.set_index("model").loc[EXPERTS, "mean"])
    table["retention"] = (table["mean"] / experts_mean).where(~table["model"].isin([merges["base"], EXPERTS]))
    return table


def retention_by_task(cfg: RunConfig, table: pd.DataFrame) -> dict[str, dict]:
    """Each merged or fine-tuned row's retention: per task (row / expert) and their mean."""
    names = [task.name for task in cfg.tasks]
    expert = table.set_index("model").loc[EXPERTS, names]
    return {row["model"]: {"of_means": float(row["retention"]),
                           "tasks": {n: float(row[n] / expert[n]) for n in names}}
            for _, row in table.iterrows() if not pd.isna(row["retention"])}


def strategy_table(cfg: RunConfig, scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Table (b): per task accuracy and macro-F1 (classification) or MSE and Pearson (regression), and the mean
    primary metric; one column per weighting."""
    indexed = {name: scored.set_index("task") for name, scored in scores.items()}
    rows = []
    for task in cfg.tasks:
        for metric in ("accuracy", "macro_f1") if task.kind == "classification" else ("mse", "pearson"):
            rows.append({"task": task.name, "metric": metric,
                         **{name: float(scored.loc[task.name, metric]) for name, scored in indexed.items()}})
    rows.append({"task": "mean", "metric": "primary",
                 **{name: float(scored.loc["mean", "primary"]) for name, scored in indexed.items()}})
    return pd.DataFrame(rows)


def versus_static(cfg: RunConfig, strategies: pd.DataFrame) -> dict | None:
    """Each strategy's change relative to `static` in %: the mean primary metric, and each regression task's MSE
    (negative is better). None when static was not trained."""
    if "static" not in strategies:
        return None
    names = [column for column in strategies.columns if column not in ("task", "metric")]
    table = strategies.set_index(["task", "metric"])

    def change(row: pd.Series) -> dict[str, float | None]:
        return {name: _percent(row[name], row["static"]) for name in names}

    return {"mean_primary_pct": change(table.loc[("mean", "primary")]),
            "mse_pct": {task.name: change(table.loc[(task.name, "mse")])
                        for task in cfg.tasks if task.kind == "regression"}}


def seed_table(cfg: RunConfig, by_seed: dict[str, list[pd.DataFrame]]) -> pd.DataFrame:
    """Table (c): each fine-tuned variant's mean primary metric per stage 3 seed (`by_seed`: its scores for seeds run
    seed, + 1, ...), their mean and standard deviation, and against `final (static)` seed by seed: the mean difference
    and in how many seeds it is ahead."""
    means = {label: [float(scored.set_index("task").loc["mean", "primary"]) for scored in frames]
             for label, frames in by_seed.items()}
    seeds = len(next(iter(means.values())))
    names = [f"seed {cfg.seed + offset}" for offset in range(seeds)]
    static = means.get("final (static)")
    rows = []
    for label, values in means.items():
        row = {"model": label, **dict(zip(names, values)), "mean": float(np.mean(values)),
               "sd": float(np.std(values, ddof=1))}
        if static is not None:
            gaps = np.subtract(values, static)
            row["minus static"] = float(gaps.mean())
            row["ahead of static"] = f"{int((gaps > 0).sum())} of {seeds}"
        rows.append(row)
    return pd.DataFrame(rows)


def final_minus_multitask(cfg: RunConfig, rounds: list[list[Variant]], scored: dict, examples: dict) -> dict:
    """Per split: the final model (the run's weighting) minus the multi-task LoRA, seed by seed, on the same
    examples: the difference of each task's primary metric and of their mean, with a paired bootstrap interval
    (`core.metrics.paired_bootstrap`, seeded by the run's seed); and the mean and sd of the mean difference over the
    seeds. Empty when the report trained no multi-task LoRA or not the run's weighting."""
    own = f"finetune-{cfg.finetune.weighting.name}"
    result = {}
    for split, data in examples.items():
        gold = {name: [row["label"] for row in rows] for name, rows in data.items()}
        seeds = []
        for offset, round_ in enumerate(rounds):
            final = next((v for v in round_ if v.key.split("-seed")[0] == own), None)
            multitask = next((v for v in round_ if v.key.startswith("multitask-base")), None)
            if final is None or multitask is None:
                continue
            predictions = [{name: [row["prediction"] for row in rows] for name, rows in kept.items()}
                           for kept in (scored[final.label, split][1], scored[multitask.label, split][1])]
            comparison = paired_bootstrap(list(cfg.tasks), gold, predictions[0], predictions[1], seed=cfg.seed)
            seeds.append({**comparison, "stage3_seed": cfg.seed + offset})
        if seeds:
            differences = [row["mean"]["difference"] for row in seeds]
            result[split] = {"seeds": seeds, "mean_difference": round(float(np.mean(differences)), 6),
                             "sd": round(float(np.std(differences, ddof=1)), 6) if len(seeds) > 1 else None,
                             "ahead": f"{sum(d > 0 for d in differences)} of {len(seeds)}"}
    return result


def splits_markdown(tables: dict[str, pd.DataFrame], versus: dict, counts: dict[str, dict]) -> str:
    """The primary-metric table of every split (test: it chose nothing) and the final model minus the multi-task
    LoRA on each, seed by seed."""
    lines = []
    for split, table in tables.items():
        if split != "dev":  # dev's table is above
            lines += ["", f"## Primary metric per task on {split} (it chose nothing)", "", markdown_table(table)]
    if versus:
        names = list(next(iter(versus.values()))["seeds"][0]["tasks"])
        lines += ["", "## Final model minus the multi-task LoRA (same examples, paired bootstrap 95% interval)", "",
                  "| split | seed | " + " | ".join(names) + " | mean | P(final better) |",
                  "|---|---|" + "---|" * (len(names) + 2)]
        for split, entry in versus.items():
            for row in entry["seeds"]:
                cells = [_interval(row["tasks"][name]) for name in names] + [_interval(row["mean"])]
                lines.append(f"| {split} | {row['stage3_seed']} | " + " | ".join(cells)
                             + f" | {row['mean']['p_better']:.2f} |")
        lines += [""] + [f"- {split}: mean over seeds {entry['mean_difference']:+.3f}"
                         + (f" (sd {entry['sd']:.3f})" if entry["sd"] is not None else "")
                         + f", final ahead in {entry['ahead']} seeds" for split, entry in versus.items()]
    return "\n".join(lines) + ("\n" if lines else "")


def _interval(summary: dict) -> str:
    return f"{summary['difference']:+.3f} [{summary['low']:+.3f}, {summary['high']:+.3f}]"


def _percent(value: float, reference: float) -> float | None:
    return None if reference == 0 or not np.isfinite(reference) else 100.0 * (value - reference) / abs(reference)


def markdown(cfg: RunConfig, facts: dict, table: pd.DataFrame, strategies: pd.DataFrame, spearman: dict,
             comparison: dict | None = None, across: pd.DataFrame | None = None) -> str:
    b = facts["budgets"]
    primary = ", ".join(f"{task.name} {task.primary}" for task in cfg.tasks)
    scored = ", ".join(f"{name} {count}" for name, count in facts["dev_examples"].items())
    lines = [
        f"# Quality report: {cfg.name}", "",
        (f"- config: `{cfg.name}` (resolved: `{facts['resolved_config']}`); run dir `{facts['run_dir']}`; "
         f"seed {facts['seed']}"),
        f"- command: `{facts['command']}`; {facts['date']}",
        (f"- experts: {b['experts_steps_per_task']} steps, {b['experts_examples_per_task']} training examples per task "
         f"({b['experts_examples']} in all, {b['expert_share']:.0%} of the pipeline's examples)"),
        *([f"- shared adapter: {b['shared_steps']} steps, {b['shared_examples']} examples"] if b.get("shared_examples")
          else []),
        (f"- search: population {b['search_population']} x {b['search_generations']} generations, "
         f"{b['search_weak_examples_per_task']} weak-labelled examples per task"),
        (f"- stage 3: {b['finetune_steps']} steps x {b['finetune_per_task']} per task x {b['tasks']} tasks = "
         f"{b['finetune_examples']} examples, the same for every weighting"),
        (f"- multi-task LoRA on base: {b['multitask_steps']} steps x {b['finetune_per_task']} per task x "
         f"{b['tasks']} tasks = {b['multitask_examples']} examples (experts + shared adapter + stage 3 = "
         f"{b['pipeline_examples']}, "
         "rounded up to whole steps); the experts' LoRA and learning rate, equal task weights"),
        f"- dev examples scored per task: {scored}", "",
        "## Primary dev metric per task", "",
        (f"Primary metric: {primary}. Retention: the row's mean / the mean of each expert on its own task "
         "(per-task ratios are in report.json)."), "",
        markdown_table(table),
        "## Fine-tuning strategies", "",
        ("Same start model, steps, examples and seed; only `finetune.weighting` differs (the run's own strategy "
         "with the config's options, the others with their defaults)."), "",
        markdown_table(_strategy_display(cfg, strategies)),
        *(["## Across stage 3 seeds", "",
           (f"Mean primary dev metric of each fine-tuned variant trained with {facts['stage3_seeds']} "
            "stage 3 seeds (LoRA init, batch order, dropout; same start model and dev examples); sd over seeds; "
            "`minus static`: the mean of the seed-by-seed differences to static."), "",
           markdown_table(across)] if across is not None else []),
        "## Weak fitness vs gold dev (Spearman)", "",
        "- over stage 2's final table (its models scored on every task and on the weak set): "
        f"{_figure(spearman['final_table'])}",
        f"- over each generation's best candidate: {_figure(spearman['generation_bests'])}", ""]
    if comparison:
        lines += ["## Is the evolved merge's lead more than noise?", "",
                  "Evolved merge minus each baseline on stage 2's final table, mean primary metric over tasks, with a "
                  f"{next(iter(comparison.values()))['level']:.0%} paired bootstrap interval (per task in "
                  "`search/final.md`):", ""]
        lines += [f"- vs {name}: {c['mean']['difference']:+.3f} [{c['mean']['low']:+.3f}, {c['mean']['high']:+.3f}], "
                  f"better in {c['mean']['p_better']:.0%} of resamples" for name, c in comparison.items()]
        lines.append("")
    return "\n".join(lines)


def _strategy_display(cfg: RunConfig, strategies: pd.DataFrame) -> pd.DataFrame:
    """Table (b) for people: readable metric names, plus the changes relative to static as `+1.2%`."""
    shown = strategies.astype(object).copy()
    shown["metric"] = [METRIC_NAMES.get(metric, metric) for metric in shown["metric"]]
    changes = versus_static(cfg, strategies)
    if changes is not None:
        extra = [{"task": "mean", "metric": "primary vs static", **_signed(changes["mean_primary_pct"])}]
        extra += [{"task": task, "metric": "MSE vs static", **_signed(values)}
                  for task, values in changes["mse_pct"].items()]
        shown = pd.concat([shown, pd.DataFrame(extra)], ignore_index=True)
    return shown


def _signed(values: dict[str, float | None]) -> dict[str, str]:
    return {name: "" if value is None else f"{value:+.1f}%" for name, value in values.items()}


def _figure(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def records(table: pd.DataFrame) -> list[dict]:
    """The rows of `table` as JSON-ready dicts (NaN as None)."""
    return json.loads(table.to_json(orient="records"))  # NaN as null


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weightings", default=",".join(WEIGHTINGS),
                        help="comma-separated stage 3 weighting strategies to compare "
                             f"(default: {','.join(WEIGHTINGS)})")
    parser.add_argument("--no-multitask", action="store_true",
                        help="skip the multi-task LoRA trained on the base model")
    parser.add_argument("--force", action="store_true",
                        help="score every variant again and rewrite the report (finished training is kept)")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="train every fine-tuned variant with this many stage 3 seeds (run seed, +1, ...) and "
                             "add a table across them (default 1)")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    words = ["sentimerge", "report", args.config, *(["--run-dir", args.run_dir] if args.run_dir else []),
             *(["--data-root", args.data_root] if args.data_root else []), "--weightings", args.weightings,
             *(["--no-multitask"] if args.no_multitask else []), *(["--force"] if args.force else []),
             *(["--seeds", str(args.seeds)] if args.seeds != 1 else [])]
    main(cfg, weightings=[name.strip() for name in args.weightings.split(",") if name.strip()],
         multitask=not args.no_multitask, force=args.force, seeds=args.seeds, command=shlex.join(words))


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("report")
