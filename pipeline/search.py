"""Stage 2, `sentimerge search CONFIG`: merge the experts into the base model with CMA-ES over layer-wise coefficients.

Reads the prepared data and base model and every task's finished expert; writes `<run>/search/`: the weak-label set,
the baselines, an append-only log of every candidate (`candidates.jsonl`), a per-generation table, the best candidate
so far, each generation's best scored on a gold dev sample, the evolved merge (the best few candidates re-scored on a
held-out weak set pick it: `selected.json`), the final gold dev table, the mergekit recipe of the evolved
merge and (through mergekit) the merged model. Running the same command again resumes from what is on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sentimerge.experts.hybrid import genome_coefficients
from sentimerge.merge.cmaes import Strategy, one_by_one, read_log, run_cma
from sentimerge.merge.engine import InMemoryMerge
from sentimerge.merge.fitness import ScoredSet, encode_set, evaluate, predict
from sentimerge.merge.genome import Genome
from sentimerge.merge.labellers import check_labellers, labeller_for
from sentimerge.merge.methods import get_method
from sentimerge.merge.recipe import build_recipe, recipe_yaml, run_mergekit
from sentimerge.merge.stages import GroupPlan, group_plan, level_one, level_two, restrict
from sentimerge.merge.weak import sample_selection_set, sample_weak_set
from sentimerge.pipeline.core.candidates import (
    load_search_inputs,
    load_weak_sets,
    score_candidate,
    scoring_threads,
)
from sentimerge.pipeline.core.config import RunConfig, dump_config, positive_int
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.evaluation import (
    evaluation_splits,
    final_examples,
    gold_examples,
    markdown_table,
    missing_test_splits,
    split_heading,
    weak_gold_spearman,
)
from sentimerge.pipeline.core.metrics import paired_bootstrap, spearman
from sentimerge.pipeline.core.models import DTYPES
from sentimerge.pipeline.core.rundir import (
    RunDir,
    append_jsonl,
    digest,
    fresh_dir,
    is_done,
    read_jsonl,
    read_manifest,
    write_csv_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_manifest,
    write_text_atomic,
)
from sentimerge.pipeline.core.upstream import expert_reference, merge_base_path, prepared_key, search_key

log = logging.getLogger("sentimerge.search")
BASELINE_METHODS = ("task_arithmetic", "ties")


class Timer:
    """Seconds spent per phase, for `inspect`'s "where the time went"."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds = dict(seconds or {})

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + seconds, 3)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        clock = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - clock)


def main(cfg: RunConfig, *, force: bool = False, max_evaluations: int | None = None,
         backend: str | None = None) -> Path:
    run = RunDir(cfg.resolved_run_dir)
    settings = cfg.search
    tasks = list(cfg.tasks)
    _check_inputs(cfg, run)
    if is_done(run.search) and not force:
        if search_key(run) != _fingerprint(cfg, run):
            raise SentimergeError(f"{run.search}: finished with other experts, other prepared data or another "
                                  "config; run `sentimerge search --force` to search again")
        log.info("search: already done in %s", run.search)
        _complete_final_tables(run, cfg)
        return run.search
    if force:
        shutil.rmtree(run.search, ignore_errors=True)
    _check_state(cfg, run, scoring_threads(cfg, backend or cfg.backend))
    seed = cfg.seed if settings.seed is None else settings.seed
    started = time.perf_counter()
    weak_examples = {task.name: _weak_examples(run, settings, task, seed) for task in tasks}
    select_examples = {task.name: sample_selection_set(run, settings.weak, task, seed, settings.select.per_task,
                                                       weak_examples[task.name])
                       for task in tasks} if settings.select.top else {}
    empty = [name for name, rows in select_examples.items() if not rows]
    if empty:  # small data: every row left went into the weak set
        log.warning("search.select: no %s rows left for a held-out set of %s; the evolved merge is the best on the "
                    "weak set", settings.weak.split, ", ".join(empty))
        select_examples = {}

    timer = Timer(json.loads((run.search / "timing.json").read_text())["seconds"]
                  if (run.search / "timing.json").is_file() else None)
    with timer.phase("load"):
        base_path = merge_base_path(run, bool(cfg.experts.shared.examples))
        model, tokenizer, adapters, genome = load_search_inputs(cfg, run)
    with timer.phase("precompute"):
        # a baseline's method is merged only a few times: its dense deltas are recomputed then, not kept resident
        mergers = {name: InMemoryMerge(model, adapters, genome, get_method(name), density=settings.density,
                                       seed=seed, keep_deltas=name == settings.method,
                                       compile=settings.compile and name == settings.method)
                   for name in dict.fromkeys([*BASELINE_METHODS, settings.method])}
    log.info("search: %d experts, %d layers in groups of %d -> genome of %d coefficients (%s)", len(adapters),
             genome.num_layers, genome.group_size, genome.size, settings.method)

    with timer.phase("weak_labels"):
        weak_sets = _label_weak_sets(run, cfg, model, tokenizer, mergers["task_arithmetic"], genome, weak_examples)
        select_sets = _label_weak_sets(run, cfg, model, tokenizer, mergers["task_arithmetic"], genome,
                                       select_examples, run.search_select_weak) if select_examples else []
    with timer.phase("baselines"):
        baselines = _baselines(run, cfg, model, tokenizer, mergers, genome, weak_sets)
    merger = mergers[settings.method]
    gold_sample = _gold_sets(run, cfg, tokenizer, settings.gold.per_generation, "gold-sample")
    write_json_atomic(run.search / "genome.json", {"experts": list(genome.experts), "layers": genome.num_layers,
                                                    "group_size": genome.group_size, "parts": list(genome.parts),
                                                    "labels": genome.labels()})

    def score_logged(generation: int, index: int, candidate: np.ndarray) -> dict:
        row = score_candidate(merger, model, tokenizer, weak_sets, candidate, settings)
        return after_scoring({"generation": generation, "index": index, **row})

    def after_scoring(row: dict) -> dict:
        generation, index = row["generation"], row["index"]
        timer.add("search_merge", row["merge_seconds"])
        timer.add("search_scoring", row["score_seconds"])
        _keep_best(run, row)
        log.info("gen %d cand %d: %s fitness %.4f (%s) merge %.0f ms, scoring %.1f s", generation, index,
                 row["status"], row["fitness"], " ".join(f"{t}={v['metric']:.3f}" for t, v in
                                                         row.get("tasks", {}).items()) or row.get("error"),
                 row["merge_seconds"] * 1000, row["score_seconds"])
        return row

    generations: list[dict] = []

    def finish_generation(generation: int, rows: list[dict], sigma: float) -> None:
        with timer.phase("gold_per_generation"):
            generations.append(_generation_row(run, generation, rows, sigma, generations, merger, model, tokenizer,
                                               gold_sample, settings))
        write_csv_atomic(run.search_generations, pd.DataFrame(generations))
        write_json_atomic(run.search / "timing.json", {"seconds": timer.seconds})

    start = start_point(baselines, genome)
    strategy, decode, levels = Strategy(start, settings.sigma0, settings.bounds, settings.population, seed), None, {}
    pool = None
    if (backend or cfg.backend) == "ray":  # the actors score level 1's group searches and the flat or level 2 one
        from sentimerge.pipeline.core.ray_backend import RayScorerPool

        pool = RayScorerPool(cfg, seed)
    try:
        if settings.stages == "groups":
            plan = group_plan_of(cfg, run, genome)
            with timer.phase("search_level_one"):
                levels, used = _level_one(run, cfg, plan, genome, merger, model, tokenizer, weak_sets, select_sets,
                                          start, seed, max_evaluations, pool)
            write_json_atomic(run.search / "timing.json", {"seconds": timer.seconds})
            if levels is None:
                log.info("search: stopped after %d new candidates; run the same command again to continue", used)
                return run.search
            max_evaluations = None if max_evaluations is None else max_evaluations - used
            size, decode = level_two(genome, plan, {name: np.asarray(level["coefficients"]) for name, level in
                                                    levels.items()})
            strategy = Strategy(np.ones(size), settings.sigma0, settings.bounds, settings.population, seed)
            log.info("search: level 2 over the groups %s (%d coefficients)", " < ".join(plan.names), size)
        evaluate = pool.evaluator(after_scoring) if pool is not None else one_by_one(score_logged)
        finished = run_cma(strategy, settings.generations, evaluate, run.search_candidates,
                           on_generation=finish_generation, max_evaluations=max_evaluations, decode=decode)
    finally:
        if pool is not None:
            pool.close()
    write_json_atomic(run.search / "timing.json", {"seconds": timer.seconds})
    if not finished:
        log.info("search: stopped after %d new candidates; run the same command again to continue",
                 max_evaluations)
        return run.search

    if not run.search_best.is_file():
        raise SentimergeError(f"{run.search_candidates}: every candidate failed (see their `error`); "
                              "check the experts and the bounds")
    with timer.phase("selection"):
        best = _select(run, cfg, merger, model, tokenizer, weak_sets, select_sets, start,
                       start_baseline(baselines, cfg.search.method))
    with timer.phase("final_gold"):
        for split in evaluation_splits(run, cfg):
            _final_table(run, cfg, model, tokenizer, mergers, best, baselines, split)
        write_text_atomic(run.search / "final.md", final_report_markdown(run, cfg))
        # the first split's table (dev unless `search.gold.splits` left it out): the export's record and the
        # weak-vs-gold Spearman of report.json
        final = pd.read_csv(run.search_final_table(evaluation_splits(run, cfg)[0]))
    method = get_method(settings.method)
    recipe = build_recipe(base_path, {t: expert_reference(run, t, base_path) for t in genome.experts}, genome,
                          np.asarray(best["coefficients"]), method, density=settings.density,
                          out_dtype=settings.dtype)
    write_text_atomic(run.search_recipe, recipe_yaml(recipe))
    export = None
    if settings.export:
        with timer.phase("export"):
            export = _export(run, cfg, recipe, merger, np.asarray(best["coefficients"]), best, final, base_path)
    report = _report(run, cfg, best, baselines, final, generations, export, timer)
    if levels:
        report["levels"] = levels
    write_json_atomic(run.search_report, report)
    write_json_atomic(run.search / "timing.json", {"seconds": timer.seconds})
    write_manifest(run.search, stage="search", method=settings.method, best_fitness=best["fitness"],
                   seconds=round(time.perf_counter() - started, 1))
    print(f"\nsearch: gold labels ({run.search / 'final.md'}):\n")
    print((run.search / "final.md").read_text(encoding="utf-8"))
    return run.search


def group_plan_of(cfg: RunConfig, run: RunDir, genome: Genome) -> GroupPlan:
    """The task groups of a multi-stage search (`search.groups`, else each task's `group`), ordered by the mean task
    difficulty their experts' manifests record (a given expert records none: 0)."""
    group_of = {task: group for group, tasks in cfg.search.groups.items() for task in tasks} or \
        {task.name: task.group for task in cfg.tasks}
    difficulty = {name: read_manifest(run.expert(name)).get("task_difficulty", {}).get("difficulty", 0.0)
                  for name in genome.experts}
    return group_plan(list(genome.experts), group_of, difficulty)


def _level_one(run: RunDir, cfg: RunConfig, plan: GroupPlan, genome: Genome, merger: InMemoryMerge, model, tokenizer,
               weak_sets: list[ScoredSet], select_sets: list[ScoredSet], start: np.ndarray, seed: int,
               max_evaluations: int | None, pool=None) -> tuple[dict[str, dict] | None, int]:
    """Level 1 of a multi-stage search: one CMA-ES per group of two experts or more, from the start point's
    coefficients of its experts, scored on the group's weak sets, logged in `search/levels/<group>.jsonl` (resumed
    like the flat log). Each group keeps what the flat search keeps: its baselines (the start point and each of its
    experts alone, on the group's weak sets, `levels/baselines/<group>.json`) and a held-out choice of its group
    model (the best of the top candidates and the start on the group's held-out weak sets,
    `levels/selection/<group>.jsonl`; the best weak fitness when selection is off). The plan (groups in the order
    they enter) is written to `levels/plan.json` first.

    The group searches are independent: with a `RayScorerPool` they run at once, one driver thread each, their
    candidates sharing the actors (the local path, and a run capped by `max_evaluations`, searches the groups one
    after the other). Baselines and selection are scored on the driver, before and after the searches. Returns
    ({group: its chosen candidate}, candidates scored now), or (None, scored) when `max_evaluations` stopped it."""
    settings = cfg.search
    run.search_levels.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.search_level_plan, {"groups": [{"name": name, "experts": list(experts)}
                                                         for name, experts in plan.groups],
                                              "order": "ascending mean task difficulty, then name"})
    searched = plan.searched()
    decoders = {name: level_one(genome, experts)[1] for name, experts in searched}
    group_sets = {name: [scored for scored in weak_sets if scored.task.name in experts] for name, experts in searched}
    starts = {name: restrict(genome, start, experts) for name, experts in searched}
    baselines = {name: _level_baselines(run, name, experts, genome, merger, model, tokenizer, group_sets[name],
                                        decoders[name](starts[name]), settings) for name, experts in searched}

    def search_group(name: str, experts: tuple[str, ...], left: int | None) -> tuple[bool, int]:
        """Run (or resume) one group's CMA-ES; (finished, candidates scored now)."""
        path = run.search_level_log(name)

        def logged(row: dict) -> dict:
            log.info("level 1 %s gen %d cand %d: %s fitness %.4f", name, row["generation"], row["index"],
                     row["status"], row["fitness"])
            return {"level": name, **row}

        def score(generation: int, index: int, candidate: np.ndarray) -> dict:
            row = score_candidate(merger, model, tokenizer, group_sets[name], candidate, settings)
            return logged({"generation": generation, "index": index, **row})

        before = len(read_log(path))
        evaluate = pool.evaluator(logged, tasks=experts) if pool is not None else one_by_one(score)
        strategy = Strategy(starts[name], settings.sigma0, settings.bounds, settings.population, seed)
        finished = run_cma(strategy, settings.group_generations, evaluate, path, max_evaluations=left,
                           decode=decoders[name])
        return finished, len(read_log(path)) - before

    used = 0
    if pool is not None and max_evaluations is None and len(searched) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(searched), thread_name_prefix="level1") as threads:
            futures = [threads.submit(search_group, name, experts, None) for name, experts in searched]
            used = sum(future.result()[1] for future in futures)
    else:
        for name, experts in searched:
            left = None if max_evaluations is None else max_evaluations - used
            if left is not None and left <= 0:
                return None, used
            finished, scored = search_group(name, experts, left)
            used += scored
            if not finished:
                return None, used

    best: dict[str, dict] = {}
    for name, experts in searched:
        path = run.search_level_log(name)
        rows = [row for row in read_log(path) if row["status"] == "ok"]
        if not rows:
            raise SentimergeError(f"{path}: every candidate of group {name} failed (see their `error`)")
        held_out = [scored for scored in select_sets if scored.task.name in experts]
        if held_out:
            chosen = held_out_choice(rows, run.search_level_selection(name), settings, merger, model, tokenizer,
                                     group_sets[name], held_out, decoders[name](starts[name]),
                                     label=f"level 1 {name} selection", start_scores=baselines[name]["uniform"])
        else:
            chosen = {**max(rows, key=lambda row: row["fitness"]), "selected_by": "weak fitness"}  # first of equal
        best[name] = {"experts": list(experts), "fitness": chosen["fitness"], "coefficients": chosen["coefficients"],
                      "generation": chosen["generation"], "index": chosen["index"], "evaluations": len(rows),
                      "selected_by": chosen["selected_by"], "select_fitness": chosen.get("select_fitness")}
        write_json_atomic(run.search_level_models, best)
        log.info("level 1 %s (%s): group model %s, weak fitness %.4f", name, ", ".join(experts),
                 "the start" if chosen["generation"] is None else
                 f"gen {chosen['generation']} cand {chosen['index']}", chosen["fitness"])
    return best, used


def _level_baselines(run: RunDir, group: str, experts: tuple[str, ...], genome: Genome, merger: InMemoryMerge, model,
                     tokenizer, sets: list[ScoredSet], start: np.ndarray, settings) -> dict[str, dict]:
    """A level-1 group's baselines on its weak sets, scored once and kept: the start point (`uniform`) and each of
    its experts alone (`expert:<name>`)."""
    path = run.search_level_baselines(group)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    candidates = [("uniform", start)] + [(f"expert:{expert}", genome.one_hot(expert)) for expert in experts]
    baselines = {}
    for name, candidate in candidates:
        row = score_candidate(merger, model, tokenizer, sets, np.asarray(candidate, dtype=float), settings)
        baselines[name] = {"method": "task_arithmetic", **row}
        log.info("level 1 %s baseline %-20s fitness %.4f", group, name, row["fitness"])
    write_json_atomic(path, baselines)
    return baselines


def _check_inputs(cfg: RunConfig, run: RunDir) -> None:
    """Every user-input problem at once, before any model loads."""
    issues = check_labellers(cfg.search.weak, list(cfg.tasks))
    read_manifest(run.prepare)
    for task in cfg.tasks:
        if not is_done(run.expert(task.name)):
            issues.append(f"task {task.name}: no finished expert in {run.expert(task.name)}; run `sentimerge experts`")
    if cfg.search.weak.split == "test":
        issues += [f"task {task.name}: no prepared test split for the weak set" for task in cfg.tasks
                   if not run.data(task.name, "test").is_file()]
    issues += missing_test_splits(run, cfg)
    if issues:
        raise SentimergeError("\n".join(issues))


def _fingerprint(cfg: RunConfig, run: RunDir) -> str:
    """What decides the search's log: a resumed search must have the same."""
    # the number of generations, the final table and the export (and its writer) do not change the candidates logged
    # left out too: `compile` (the same weights bit for bit) and the lexicon's label polarities unless a task is
    # labelled by the lexicon, so that settings which do not change a candidate's score never block a resume
    weak = cfg.search.weak
    search = cfg.search.decisive()
    for name in ("export", "writer", "generations", "select", "compile"):
        search.pop(name, None)
    search["weak"].pop("references", None)  # which baselines are scored on the weak set: no candidate changes
    for name in ("final", "experts", "splits"):
        search["gold"].pop(name, None)
    if "lexicon" not in {weak.labeller, *weak.labellers.values()}:
        del search["weak"]["label_polarity"]
    decisive = {"search": search,
                "seed": cfg.seed,
                "tasks": [task.name for task in cfg.tasks],
                "experts": {task.name: read_manifest(run.expert(task.name)).get("finished_at") for task in cfg.tasks},
                "prepare": prepared_key(run)}
    return digest(decisive)


def _check_state(cfg: RunConfig, run: RunDir, threads: int) -> None:
    """Start the search's state, or check that a resumed one has the same fingerprint (else raise). A bf16 search
    resumed with another scoring thread count goes on with a warning: its new candidates may score a few answers
    differently from an uninterrupted run's (`candidates.scoring_threads`)."""
    fingerprint = _fingerprint(cfg, run)
    if run.search_state.is_file():
        state = json.loads(run.search_state.read_text(encoding="utf-8"))
        if state["fingerprint"] != fingerprint:
            raise SentimergeError(f"{run.search}: a search with another config or other experts is in progress; "
                                  "use --force to start over, or another --run-dir")
        log.info("search: resuming from %s", run.search)
        before = state.get("scoring_threads")
        if before is not None and before != threads and cfg.search.dtype != "float32":
            log.warning("search: resumed with %d scoring thread(s) where it started with %d; in %s, oneDNN rounds "
                        "some matmul outputs differently with the thread count, so candidates scored from now on "
                        "may differ slightly from an uninterrupted run's (set `threads: %d` to match it)", threads,
                        before, cfg.search.dtype, before)
    else:
        run.search.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.search_state, {"fingerprint": fingerprint, "scoring_threads": threads})
    if not (run.search / "config.yaml").is_file():  # also when a crash came between the two writes
        write_text_atomic(run.search / "config.yaml", dump_config(cfg))


def _weak_examples(run: RunDir, settings, task, seed: int) -> list[dict]:
    examples, summary = sample_weak_set(run, settings.weak, task, seed)
    log.info("weak set %-12s %d examples from %s (pool %d, expert rows excluded: %s)", task.name, len(examples),
             summary["split"], summary["pool"],
             summary["excluded_expert_rows"] if summary["expert_rows_checked"] else "unknown")
    return examples


def _label_weak_sets(run: RunDir, cfg: RunConfig, model, tokenizer, arithmetic: InMemoryMerge, genome: Genome,
                     weak_examples: dict[str, list[dict]], path_for=None) -> list[ScoredSet]:
    """Label each task's weak examples (cached on disk at `path_for(task)`) and tokenise them once."""
    path_for = path_for or run.search_weak
    settings = cfg.search

    def expert_predict(task, examples):
        arithmetic.apply(genome.one_hot(task.name))
        return predict(model, tokenizer, encode_set(tokenizer, task, examples, [None] * len(examples)),
                       settings.batch_size)

    for task in cfg.tasks:
        path = path_for(task.name)
        if path.is_file():
            rows = read_jsonl(path)
        else:
            examples = weak_examples[task.name]
            labeller = labeller_for(settings.weak, task)
            labels = labeller.label(task, examples, expert_predict, settings.weak.label_polarity)
            rows = [{**example, "gold": example["label"], "label": label, "labeller": labeller.name}
                    for example, label in zip(examples, labels)]
            write_jsonl_atomic(path, rows)
        if task.kind == "classification" and rows[0]["gold"] is not None:  # unlabelled pools have no gold
            agreement = np.mean([row["label"] == row["gold"] for row in rows])
            log.info("weak labels %-12s %s: agreement with gold %.3f (%s)", task.name, rows[0]["labeller"],
                     agreement, path.parent.name)
    return load_weak_sets(run, cfg, tokenizer, path_for)


def _baseline_candidates(cfg: RunConfig, genome: Genome, run: RunDir) -> list[tuple[str, str, np.ndarray]]:
    """(name, method, genome) of the fixed baselines every run scores (with `init: hybrid`, also the Hybrid LoRA
    attention's coefficients, `hybrid`, where CMA-ES starts)."""
    candidates = [("base", "task_arithmetic", genome.filled(0.0))]
    candidates += [(f"expert:{name}", "task_arithmetic", genome.one_hot(name)) for name in genome.experts]
    if cfg.search.init in ("auto", "hybrid"):
        candidates += [(f"uniform@{value:g}", "task_arithmetic", genome.filled(value))
                       for value in cfg.search.init_grid]
    else:
        candidates.append(("uniform", "task_arithmetic", genome.filled(cfg.search.init)))
    candidates.append(("ties", "ties", genome.filled(1.0)))
    if cfg.search.init == "hybrid":
        saved = json.loads(run.hybrid_coefficients.read_text(encoding="utf-8"))
        candidates.append(("hybrid", "task_arithmetic", genome_coefficients(
            np.asarray(saved["coefficients"], dtype=float), genome, cfg.search.bounds)))
    return candidates


def _choose_uniform(baselines: dict[str, dict]) -> dict[str, dict]:
    """With `init: auto`, the uniform baseline is the scanned coefficient with the best weak fitness (the first of
    equal ones); it is also where CMA-ES starts. Kept in the baselines file, so a resumed search starts there too."""
    scan = [name for name in baselines if name.startswith("uniform@")]
    if not scan:
        return baselines
    chosen = max(scan, key=lambda name: baselines[name]["fitness"])
    ordered = {}
    for name, row in baselines.items():
        ordered[name] = row
        if name == scan[-1]:
            ordered["uniform"] = {**baselines[chosen], "chosen_from": scan}
    return ordered


def _start_row(baselines: dict[str, dict]) -> dict:
    """The baseline CMA-ES starts from: Hybrid LoRA's (`init: hybrid`), else the uniform one (`init`, or the one
    `init: auto` chose)."""
    return baselines["hybrid"] if "hybrid" in baselines else baselines["uniform"]


def start_point(baselines: dict[str, dict], genome: Genome) -> np.ndarray:
    """CMA-ES's start: the coefficients of `_start_row`."""
    return np.asarray(_start_row(baselines)["coefficients"], dtype=float).reshape(genome.size)


def _baselines(run: RunDir, cfg: RunConfig, model, tokenizer, mergers, genome: Genome,
               weak_sets: list[ScoredSet]) -> dict[str, dict]:
    if run.search_baselines.is_file():
        return json.loads(run.search_baselines.read_text(encoding="utf-8"))
    baselines = {}
    for name, method, candidate in _baseline_candidates(cfg, genome, run):
        if not cfg.search.weak.references and (name == "base" or name.startswith("expert:")):
            baselines[name] = {"method": method, "coefficients": candidate.tolist(), "fitness": None,
                               "status": "unscored (search.weak.references off)"}
            continue
        row = score_candidate(mergers[method], model, tokenizer, weak_sets, candidate, cfg.search)
        baselines[name] = {"method": method, "coefficients": candidate.tolist(), **row}
        log.info("baseline %-20s fitness %.4f (%s)", name, row["fitness"],
                 " ".join(f"{t}={v['metric']:.3f}" for t, v in row.get("tasks", {}).items()))
    baselines = _choose_uniform(baselines)
    if "chosen_from" in baselines["uniform"]:
        log.info("init auto: CMA-ES starts from the uniform coefficient %g", baselines["uniform"]["coefficients"][0])
    write_json_atomic(run.search_baselines, baselines)
    return baselines


def _keep_best(run: RunDir, row: dict) -> None:
    """Keep the best candidate so far on disk (the first of equal ones)."""
    if row["status"] != "ok":
        return
    if run.search_best.is_file():
        best = json.loads(run.search_best.read_text(encoding="utf-8"))
        if best["fitness"] >= row["fitness"]:
            return
    write_json_atomic(run.search_best, row)


def start_baseline(baselines: dict[str, dict], method: str) -> dict | None:
    """The baseline row the start point is (`start_point`'s), when it was scored with the searched `method`: its
    weak fitness is then the start's, and the selection need not score it again."""
    row = _start_row(baselines)
    return row if row["method"] == method and row.get("status") == "ok" else None


def _select(run: RunDir, cfg: RunConfig, merger: InMemoryMerge, model, tokenizer, weak_sets: list[ScoredSet],
            select_sets: list[ScoredSet], start: np.ndarray, start_scores: dict | None = None) -> dict:
    """The evolved merge (merge.config.SelectConfig): the best of the top candidates and the start point on the
    held-out weak set, or the best on the weak set when selection is off. Each re-scored candidate is logged as it is
    scored, so a killed selection resumes; the choice is written to `selected.json`. `start_scores`: the start's
    row on the weak sets when a baseline already scored it (`start_baseline`)."""
    if run.search_selected.is_file():
        return json.loads(run.search_selected.read_text(encoding="utf-8"))
    if not select_sets:
        chosen = {**json.loads(run.search_best.read_text(encoding="utf-8")), "selected_by": "weak fitness"}
    else:
        chosen = held_out_choice(read_log(run.search_candidates), run.search_selection, cfg.search, merger, model,
                                 tokenizer, weak_sets, select_sets, start, start_scores=start_scores)
    write_json_atomic(run.search_selected, chosen)
    return chosen


def held_out_choice(candidates: list[dict], selection_log: Path, settings, merger: InMemoryMerge, model, tokenizer,
                    weak_sets: list[ScoredSet], select_sets: list[ScoredSet], start: np.ndarray,
                    label: str = "selection", start_scores: dict | None = None) -> dict:
    """The best of the `settings.select.top` candidates with the highest weak fitness and the start point, by their
    fitness on the held-out weak sets `select_sets` (the first of equal ones). The start's weak fitness is scored
    here unless `start_scores` (a row of `score_candidate` on `weak_sets` with the searched method) gives it. Each
    re-scored entry is appended to `selection_log` as it is scored, so a killed selection resumes where it stopped."""
    ranked = sorted((row for row in candidates if row["status"] == "ok"),
                    key=lambda row: -row["fitness"])[:settings.select.top]  # stable: the first of equal ones
    entries = [(f"gen {row['generation']} cand {row['index']}", row) for row in ranked]
    known = {} if start_scores is None else {key: start_scores[key] for key in ("status", "fitness", "tasks")}
    entries.append(("start", {"generation": None, "index": None, "coefficients": start.tolist(), **known}))
    done = {row["name"]: row for row in read_log(selection_log)}
    for name, row in entries:
        if name in done:
            continue
        if "fitness" not in row:  # the start point: its weak fitness too, with the searched method
            row = {**row, **score_candidate(merger, model, tokenizer, weak_sets, start, settings)}
        held_out = score_candidate(merger, model, tokenizer, select_sets, np.asarray(row["coefficients"]), settings)
        done[name] = {"name": name, **{k: row.get(k) for k in ("generation", "index", "coefficients", "status",
                                                                  "fitness", "tasks")},
                      "select_fitness": held_out["fitness"], "select_tasks": held_out.get("tasks")}
        append_jsonl(selection_log, done[name])
        log.info("%s: %-16s weak %.4f held-out %.4f", label, name, row["fitness"], held_out["fitness"])
    name = max((name for name, _ in entries), key=lambda name: done[name]["select_fitness"])
    log.info("%s: chose %s (held-out %.4f)", label, name, done[name]["select_fitness"])
    return {**done[name], "selected_by": "held-out weak set"}


def _gold_sets(run: RunDir, cfg: RunConfig, tokenizer, limit: int | None, salt: str,
               split: str = "dev") -> list[ScoredSet]:
    """Each task's examples (`gold_examples`) with their gold labels, tokenised."""
    if limit == 0:
        return []
    data = gold_examples(run, cfg, limit, salt, split)
    return [encode_set(tokenizer, task, data[task.name], [e["label"] for e in data[task.name]]) for task in cfg.tasks]


def _gold_score(merger: InMemoryMerge, model, tokenizer, sets: list[ScoredSet], candidate, batch_size: int) -> dict:
    merger.apply(np.asarray(candidate, dtype=float))
    result = evaluate(model, tokenizer, sets, batch_size)
    return {"mean": float(np.mean([v["metric"] for v in result["tasks"].values()])),
            "tasks": {task: v["metric"] for task, v in result["tasks"].items()}, "predictions": result["predictions"]}


def _generation_row(run: RunDir, generation: int, rows: list[dict], sigma: float, previous: list[dict],
                    merger, model, tokenizer, gold_sample: list[ScoredSet], settings) -> dict:
    ok = [row for row in rows if row["status"] == "ok"]
    fitness = [row["fitness"] for row in rows]
    best = max(ok, key=lambda row: row["fitness"]) if ok else None
    entry = {"generation": generation, "evaluations": len(rows) + (previous[-1]["evaluations"] if previous else 0),
             "best": best["fitness"] if best else None, "mean": float(np.mean(fitness)),
             "worst": float(np.min(fitness)), "sigma": sigma, "failed": len(rows) - len(ok),
             "best_so_far": max([best["fitness"] if best else -np.inf,
                                 *(p["best_so_far"] for p in previous)])}
    if gold_sample and best is not None:
        done = {row["generation"]: row for row in read_jsonl(run.search_gold)} if run.search_gold.is_file() else {}
        if generation not in done:
            gold = _gold_score(merger, model, tokenizer, gold_sample, best["coefficients"], settings.batch_size)
            done[generation] = {"generation": generation, "index": best["index"], "fitness": best["fitness"],
                                "gold": gold["mean"], "tasks": gold["tasks"]}
            append_jsonl(run.search_gold, done[generation])
        entry["gold_best"] = done[generation]["gold"]
    return entry


def _final_table(run: RunDir, cfg: RunConfig, model, tokenizer, mergers, best: dict, baselines: dict,
                 split: str = "dev") -> pd.DataFrame:
    """Gold scores on `split` (`final_examples`) of the base model, each expert, uniform task arithmetic, TIES and
    the evolved merge; each model's predictions are kept (`final_predictions*.jsonl`) for `compare_final`."""
    path = run.search_final_table(split)
    if path.is_file():
        return pd.read_csv(path)
    sets = _gold_sets(run, cfg, tokenizer, cfg.search.gold.final, "eval", split)  # = final_examples(run, cfg, split)
    rows, predictions = [], []
    entries = [(name, b["method"], b["coefficients"], b["fitness"]) for name, b in baselines.items()
               if not name.startswith("uniform@")]  # the scan of `init: auto`: its chosen one is `uniform`
    entries.append(("evolved", cfg.search.method, best["coefficients"], best["fitness"]))
    own_only = cfg.search.gold.experts == "own"
    done: dict[tuple, dict] = {}  # the same merge on the same sets (the evolved merge kept its start): scored once
    for name, method, candidate, weak_fitness in entries:
        scored = [s for s in sets if s.task.name == name.removeprefix("expert:")] \
            if own_only and name.startswith("expert:") else sets
        key = (method, tuple(float(c) for c in candidate), tuple(s.task.name for s in scored))
        if key not in done:
            done[key] = _gold_score(mergers[method], model, tokenizer, scored, candidate, cfg.search.batch_size)
        gold = done[key]
        mean = gold["mean"] if len(scored) == len(sets) else float("nan")
        rows.append({"model": name, **gold["tasks"], "mean": mean, "weak_fitness": weak_fitness})
        predictions.append({"model": name, "predictions": gold["predictions"]})
        log.info("gold %s %-20s mean %.4f (%s)", split, name, gold["mean"],
                 " ".join(f"{t}={v:.3f}" for t, v in gold["tasks"].items()))
    table = pd.DataFrame(rows)
    write_jsonl_atomic(run.search_final_predictions_of(split), predictions)  # before the CSV: its presence = done
    write_csv_atomic(path, table)
    return table


def _complete_final_tables(run: RunDir, cfg: RunConfig) -> None:
    """A search finished before a split's final table existed (a test split prepared since, or a run of an earlier
    version): score the same models on it, and rewrite `final.md`. Nothing else of the search changes."""
    missing = [split for split in evaluation_splits(run, cfg) if not run.search_final_table(split).is_file()]
    if not missing and (run.search / "final.md").is_file():
        return
    if missing:
        log.info("search: scoring the finished search's models on %s", ", ".join(missing))
        model, tokenizer, adapters, genome = load_search_inputs(cfg, run)
        baselines = json.loads(run.search_baselines.read_text(encoding="utf-8"))
        best = json.loads(run.search_selected.read_text(encoding="utf-8"))
        methods = dict.fromkeys([*(b["method"] for b in baselines.values()), cfg.search.method])
        seed = cfg.seed if cfg.search.seed is None else cfg.search.seed
        mergers = {name: InMemoryMerge(model, adapters, genome, get_method(name), density=cfg.search.density,
                                       seed=seed, keep_deltas=False) for name in methods}
        for split in missing:
            _final_table(run, cfg, model, tokenizer, mergers, best, baselines, split)
        if run.search_report.is_file():
            report = json.loads(run.search_report.read_text(encoding="utf-8"))
            for split in missing:
                report.update(_split_report(run, cfg, split))
            write_json_atomic(run.search_report, report)
    write_text_atomic(run.search / "final.md", final_report_markdown(run, cfg))


def _split_report(run: RunDir, cfg: RunConfig, split: str) -> dict:
    """report.json's entries of `split`: its final table (`gold_<split>`) and the evolved merge's paired comparisons
    (`gold_<split>_comparison`), when that table was scored (`search.gold.splits`)."""
    if not run.search_final_table(split).is_file():
        return {}
    return {f"gold_{split}": pd.read_csv(run.search_final_table(split)).to_dict(orient="records"),
            f"gold_{split}_comparison": compare_final(run, cfg, split)}


COMPARED = ("uniform", "ties")  # the baselines the evolved merge must beat


def compare_final(run: RunDir, cfg: RunConfig, split: str = "dev") -> dict[str, dict] | None:
    """Evolved merge minus each of `COMPARED` on the final table's gold `split` examples: the difference of the
    primary metric per task and of the mean, with a paired bootstrap interval (`core.metrics.paired_bootstrap`;
    seeded by the run's seed) and the share of resamples where the evolved merge is better. None for a run that kept
    no predictions (made before they were kept)."""
    if not run.search_final_predictions_of(split).is_file():
        return None
    predictions = {row["model"]: row["predictions"] for row in read_jsonl(run.search_final_predictions_of(split))}
    data = final_examples(run, cfg, split)
    gold = {name: [example["label"] for example in examples] for name, examples in data.items()}
    return {name: paired_bootstrap(list(cfg.tasks), gold, predictions["evolved"], predictions[name], seed=cfg.seed)
            for name in COMPARED if name in predictions}


def final_markdown(table: pd.DataFrame, comparison: dict[str, dict] | None, examples: str = "dev") -> str:
    """The final table, and under it how sure the evolved merge's lead (or lag) over each baseline is (`examples`:
    which split's examples both were scored on)."""
    text = markdown_table(table)
    if not comparison:
        return text
    first = next(iter(comparison.values()))
    tasks = list(first["tasks"])
    lines = ["", f"Evolved merge minus baseline (primary metric; {first['level']:.0%} paired bootstrap interval over "
             f"the same {examples} examples, {first['resamples']} resamples; P = share of resamples where the evolved merge "
             "is better):", "", "| vs | " + " | ".join(tasks) + " | mean | P(evolved better) |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for name, result in comparison.items():
        cells = [_interval(result["tasks"][task]) for task in tasks] + [_interval(result["mean"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['mean']['p_better']:.2f} |")
    return text + "\n".join(lines) + "\n"


def final_report_markdown(run: RunDir, cfg: RunConfig) -> str:
    """`final.md`: for each evaluation split, the final table and the evolved merge's paired comparisons."""
    parts = []
    for split in evaluation_splits(run, cfg):
        if run.search_final_table(split).is_file():
            parts.append(split_heading(split, final_examples(run, cfg, split)) + "\n\n" + final_markdown(
                pd.read_csv(run.search_final_table(split)), compare_final(run, cfg, split), split))
    return "\n".join(parts)


def _interval(summary: dict) -> str:
    return f"{summary['difference']:+.3f} [{summary['low']:+.3f}, {summary['high']:+.3f}]"


def _export(run: RunDir, cfg: RunConfig, recipe: dict, merger: InMemoryMerge, candidate: np.ndarray, best: dict,
            final: pd.DataFrame, base_path: str) -> dict:
    """Write the best merge to `search/merged`: through mergekit, measuring how far it is from the in-memory merge,
    or (`search.writer: in_memory`) from the in-memory merge itself."""
    writer = cfg.search.writer
    with fresh_dir(run.search_merged, overwrite=True) as folder:
        clock = time.perf_counter()
        if writer == "mergekit":
            difference = _write_with_mergekit(run, cfg, recipe, merger, candidate, folder)
        else:
            difference = _write_in_memory(run, cfg, merger, candidate, folder, base_path)
        seconds = time.perf_counter() - clock
        write_json_atomic(folder / "sentimerge_search.json", {
            "best": {k: best[k] for k in ("generation", "index", "fitness", "coefficients", "tasks")},
            f"gold_{evaluation_splits(run, cfg)[0]}": final.to_dict(orient="records"),
            "max_abs_difference_vs_in_memory": difference})
        write_manifest(folder, stage="search-export", tool="mergekit" if writer == "mergekit" else
                       "sentimerge (in memory)", seconds=round(seconds, 2))
    if writer == "mergekit":
        shutil.rmtree(run.search / ".mergekit_cache", ignore_errors=True)
        log.info("export: mergekit wrote %s in %.1fs; max |mergekit - in-memory| = %.3g", run.search_merged, seconds,
                 difference)
        return {"path": str(run.search_merged), "writer": writer, "mergekit_seconds": seconds,
                "max_abs_difference": difference}
    log.info("export: wrote the in-memory merge to %s in %.1fs", run.search_merged, seconds)
    return {"path": str(run.search_merged), "writer": writer, "seconds": seconds, "max_abs_difference": difference}


def _write_with_mergekit(run: RunDir, cfg: RunConfig, recipe: dict, merger: InMemoryMerge, candidate: np.ndarray,
                         folder: Path) -> float:
    """mergekit's run of `recipe` into `folder`; the largest |mergekit - in-memory| over the adapted weights."""
    from safetensors.torch import load_file

    run_mergekit(recipe, folder, cache=run.search / ".mergekit_cache")
    _normalise_card(folder / "README.md", folder.name, run.search_merged.name)
    merged = {}
    for shard in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(str(shard)))
    dtype = DTYPES[cfg.search.dtype]
    return max(float((merged[name].float() - value.to(dtype).float()).abs().max())
               for name, value in merger.iter_merged(candidate))


def _write_in_memory(run: RunDir, cfg: RunConfig, merger: InMemoryMerge, candidate: np.ndarray, folder: Path,
                     base_path: str) -> float:
    """The in-memory merge saved with transformers into `folder`: the base checkpoint with each adapted weight
    replaced by its float32 merge cast to `search.dtype`, as mergekit writes the recipe (`recipe.yml` reproduces it
    with `mergekit-yaml`), and the tokenizer. One weight at a time: the peak is the base model plus one weight.
    Returns 0.0, the distance of the written merge to the in-memory one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[cfg.search.dtype]
    trust = cfg.base_model.trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in merger.iter_merged(candidate):
            params[name].copy_(value.to(dtype))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust).save_pretrained(folder)
    (folder / "README.md").write_text(
        f"# {run.search_merged.name}\n\nThe evolved merge of the experts {', '.join(merger.genome.experts)} "
        f"({cfg.search.method}), written by sentimerge from its in-memory merge. `mergekit-yaml "
        f"{run.search_recipe.name} OUT` reproduces it.\n", encoding="utf-8")
    return 0.0


def _normalise_card(readme: Path, written_as: str, name: str) -> None:
    """Make mergekit's model card the same for the same merge: it is titled after the folder it was written to (our
    temporary name) and lists the merged models in `set` order, which changes with each process's hash seed."""
    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8").replace(written_as, name)
    lines, out, bullets = text.split("\n"), [], []
    for line in [*lines, None]:
        if line is not None and line.startswith("* "):
            bullets.append(line)
            continue
        out += sorted(bullets)
        bullets = []
        if line is not None:
            out.append(line)
    write_text_atomic(readme, "\n".join(out))


def _report(run: RunDir, cfg: RunConfig, best: dict, baselines: dict, final: pd.DataFrame, generations: list[dict],
            export: dict | None, timer: Timer) -> dict:
    rows = [row for row in read_log(run.search_candidates) if row["status"] == "ok"]
    # medians: one candidate slowed down by a busy machine should not move the figure
    merge_ms = 1000 * float(np.median([row["merge_seconds"] for row in rows])) if rows else None
    score_s = float(np.median([row["score_seconds"] for row in rows])) if rows else None
    examples = sum(row["examples"] for row in rows)
    gold = [row for row in generations if row.get("gold_best") is not None]
    return {
        "best": {k: best[k] for k in ("generation", "index", "fitness", "tasks")},
        "selection": {"selected_by": best["selected_by"], "held_out_fitness": best.get("select_fitness"),
                      "candidates": [{k: row[k] for k in ("name", "fitness", "select_fitness")}
                                     for row in read_log(run.search_selection)]},
        "baselines": {name: b["fitness"] for name, b in baselines.items()},
        **_split_report(run, cfg, "dev"),
        **_split_report(run, cfg, "test"),
        "weak_vs_gold_spearman": {
            "generation_bests": spearman([g["best"] for g in gold], [g["gold_best"] for g in gold]) if gold else None,
            "final_table": weak_gold_spearman(final),
        },
        "throughput": {"merge_ms_per_candidate": merge_ms, "scoring_s_per_candidate": score_s,
                       "examples_per_s": examples / len(rows) / score_s if rows else None,
                       "candidates": len(rows)},
        "export": export,
        "seconds": timer.seconds,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="discard an unfinished or finished search and start over")
    parser.add_argument("--max-evaluations", type=positive_int, metavar="N",
                        help="score at most N new candidates, then stop (the next run continues)")
    parser.add_argument("--backend", choices=["local", "ray"], help="score candidates here or on Ray actors "
                                                                   "(default: the config's `backend`)")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, force=args.force, max_evaluations=args.max_evaluations, backend=args.backend)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("search")
