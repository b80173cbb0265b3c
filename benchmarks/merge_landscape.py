"""Is there anything for the search to find, and which weak labels rank candidates like gold dev does?

    python benchmarks/merge_landscape.py configs/demo.yaml --run-dir R

On a finished search (R), scores on the gold dev sample of the final table: the baselines, every logged candidate,
and probes of the search space around the start point (each coefficient group of each expert set to 0; each expert
scaled by 0.75 and 1.25, the others kept; all experts scaled together by 1/3, 1/2, 2/3 and 4/5) and of TIES's
density (0.2 and 0.8 at TIES's coefficients); plus every candidate on the weak and held-out weak sets. Per-example
answer log-probabilities are cached in `R/search/landscape/` (a killed run resumes; a second run only re-analyses).

It reports (1) the spread of gold dev means over the logged candidates and probes against TIES and uniform task
arithmetic: if no point of the space clears TIES by more than noise, no fitness can make the search clear it;
(2) per task, the Spearman correlation over the logged candidates between gold dev and the candidates' metric
against each labelling of the weak + held-out examples: the run's labeller, the VADER lexicon where it applies, and
the rows' own gold labels (an upper bound for any labeller on that many examples).
(3) the weak fitness the search saw against the gold dev mean, Spearman over the logged candidates of each level:
a multi-stage search's level-1 groups (their fitness and gold over the group's tasks; their candidates are scored
too) and level 2, or the flat search.
Writes benchmarks/results/merge_landscape_<config name, or --name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import finished_search, machine  # noqa: E402
from sentimerge.merge.engine import InMemoryMerge  # noqa: E402
from sentimerge.merge.labellers import get_labeller  # noqa: E402
from sentimerge.merge.methods import get_method  # noqa: E402
from sentimerge.pipeline.core.candidates import load_search_inputs, load_weak_sets
from sentimerge.pipeline.core.evaluation import gold_examples, markdown_table
from sentimerge.pipeline.core.metrics import compute_metrics, spearman  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl, read_manifest  # noqa: E402
from sentimerge.pipeline.core.scoring import TaskScores, score_prompts  # noqa: E402
from sentimerge.pipeline.search import _gold_sets

RESULTS = ROOT / "benchmarks" / "results"


SCALES = (1 / 3, 1 / 2, 2 / 3, 4 / 5)  # all experts together, around the start point
DENSITIES = (0.2, 0.8)  # TIES's trimming, at TIES's coefficients


def candidates(run: RunDir, genome, density: float, *, every: int = 1,
               probes: bool = True) -> list[tuple[str, str, float, list[float]]]:
    """(name, method, density, coefficients): the baselines, the logged candidates (every `every`-th in log order),
    then the probes around the start. `density` is the run's (ties and dare)."""
    baselines = json.loads(run.search_baselines.read_text(encoding="utf-8"))
    method = read_manifest(run.search)["method"]  # what the logged candidates were merged with
    found = [(name, b["method"], density, b["coefficients"]) for name, b in baselines.items()]
    logged = [row for row in read_jsonl(run.search_candidates) if row["status"] == "ok"]
    found += [(logged_name(row), method, density, row["coefficients"]) for row in logged[::every]]
    for group, rows in level_logs(run).items():  # a multi-stage search's level-1 candidates (full genomes)
        found += [(logged_name(row, f"level {group}: "), method, density, row["coefficients"]) for row in rows[::every]]
    if not probes:
        return found
    start = np.asarray(baselines["uniform"]["coefficients"], dtype=float).reshape(genome.size)
    labels = genome.labels()
    for i, label in enumerate(labels):
        probe = start.copy()
        probe[i] = 0.0
        found.append((f"probe: {label} = 0", method, density, probe.tolist()))
    for expert in genome.experts:
        for scale in (0.75, 1.25):
            probe = start.copy()
            probe[[i for i, label in enumerate(labels) if label.split("/")[0] == expert]] *= scale
            found.append((f"probe: {expert} x {scale:g}", method, density, probe.tolist()))
    found += [(f"probe: all x {scale:.2g}", method, density, (start * scale).tolist()) for scale in SCALES]
    if "ties" in baselines:
        found += [(f"probe: ties density {value:g}", "ties", value, baselines["ties"]["coefficients"])
                  for value in DENSITIES]
    return found


def logged_name(row: dict, prefix: str = "") -> str:
    """A logged candidate's name in the landscape: `gen G cand I`, after `level <group>: ` for level 1."""
    return f"{prefix}gen {row['generation']} cand {row['index']}"


def level_logs(run: RunDir) -> dict[str, list[dict]]:
    """A multi-stage search's level-1 logs: group -> its scored candidates (status ok), in log order; {} for a flat
    search."""
    return {group: [row for row in read_jsonl(path) if row["status"] == "ok"]
            for group, path in run.search_level_logs().items()}


def level_spearman(run: RunDir, gold: dict[str, dict[str, float]], every: int = 1) -> list[dict]:
    """Weak fitness against gold at each level of the search: per level-1 group, the Spearman over its logged
    candidates between the fitness the search saw (on the group's weak sets) and the gold dev mean over the group's
    tasks; then the flat search's (or level 2's) candidates against the gold mean over every task. `gold` holds each
    scored model's gold dev metric per task (`analyse`)."""
    rows = []
    logs = {f"level 1: {group}": (f"level {group}: ", entries) for group, entries in level_logs(run).items()}
    flat = [row for row in read_jsonl(run.search_candidates) if row["status"] == "ok"]
    logs["level 2" if logs else "flat"] = ("", flat)
    for level, (prefix, entries) in logs.items():
        entries = [row for row in entries[::every] if logged_name(row, prefix) in gold]
        if not entries:
            continue
        tasks = list(entries[0]["tasks"])  # the tasks this level's fitness was scored on
        golds = [float(np.mean([gold[logged_name(row, prefix)][task] for task in tasks])) for row in entries]
        rows.append({"level": level, "tasks": ", ".join(tasks), "candidates": len(entries),
                     "spearman": spearman([row["fitness"] for row in entries], golds)})
    return rows


def score_all(cfg, run: RunDir, cache: Path, batch_size: int, **which) -> dict[str, dict]:
    model, tokenizer, adapters, genome = load_search_inputs(cfg, run)
    wanted = candidates(run, genome, cfg.search.density, **which)
    sets = {"weak": load_weak_sets(run, cfg, tokenizer),
            "held": load_weak_sets(run, cfg, tokenizer, run.search_select_weak)
            if run.search_select_weak(cfg.tasks[0].name).is_file() else [],
            "gold": _gold_sets(run, cfg, tokenizer, cfg.search.gold.final, "eval")}
    cache.mkdir(parents=True, exist_ok=True)

    def cached(number: int, name: str, coefficients: list[float]) -> dict | None:
        path = cache / f"{number:04d}.pt"
        kept = torch.load(path) if path.is_file() else None
        return kept if kept and kept["name"] == name and kept["coefficients"] == coefficients else None

    scored = {name: kept for number, (name, _, _, coefficients) in enumerate(wanted)
              if (kept := cached(number, name, coefficients)) is not None}
    # one merger at a time (a dense one holds experts x the adapted weights), each built on the restored base
    merger = None
    for key in dict.fromkeys((method, density) for name, method, density, _ in wanted if name not in scored):
        if merger is not None:
            merger.restore()
            del merger  # frees its deltas before the next one is built
        merger = InMemoryMerge(model, adapters, genome, get_method(key[0]), density=key[1], seed=cfg.seed)
        for number, (name, method, density, coefficients) in enumerate(wanted):
            if (method, density) != key or name in scored:
                continue
            clock = time.perf_counter()
            merger.apply(np.asarray(coefficients, dtype=float))
            kept = {"name": name, "method": method, "density": density, "coefficients": coefficients}
            for part, part_sets in sets.items():
                kept[part] = {s.task.name: score_prompts(model, s.prompts, s.answers, pad_id=tokenizer.pad_token_id,
                                                         batch_size=batch_size) for s in part_sets}
            torch.save(kept, cache / f"{number:04d}.pt")
            scored[name] = kept
            print(f"[{number + 1}/{len(wanted)}] {name}: {time.perf_counter() - clock:.1f} s", flush=True)
    return {name: scored[name] for name, _, _, _ in wanted}


def analyse(cfg, run: RunDir, scored: dict[str, dict], every: int = 1) -> dict:
    tasks = {task.name: task for task in cfg.tasks}
    dev = gold_examples(run, cfg, cfg.search.gold.final, "eval")
    rows = {task: read_jsonl(run.search_weak(task)) + (read_jsonl(run.search_select_weak(task))
                                                       if run.search_select_weak(task).is_file() else [])
            for task in tasks}
    labellings = {task: {"run's labeller": [row["label"] for row in rows[task]],
                         "gold labels of these rows": [row["gold"] for row in rows[task]]} for task in tasks}
    lexicon = get_labeller("lexicon")
    for name, task in tasks.items():
        if lexicon.problem(task, cfg.search.weak.label_polarity) is None:
            labellings[name]["lexicon (VADER)"] = lexicon.label(task, rows[name], None, cfg.search.weak.label_polarity)

    def metric(task, labels, logprobs) -> float:
        return compute_metrics(task, labels, TaskScores(task, logprobs).predictions)["primary"]

    gold = {name: {task: metric(tasks[task], [e["label"] for e in dev[task]], kept["gold"][task]) for task in tasks}
            for name, kept in scored.items()}
    means = {name: float(np.mean(list(values.values()))) for name, values in gold.items()}
    logged = [name for name in scored if name.startswith("gen ")]  # the flat search's, or level 2's
    probes = [name for name in scored if name.startswith("probe: ")]
    weak_logprobs = {name: {task: torch.cat([kept["weak"][task], *([kept["held"][task]] if kept["held"] else [])])
                            for task in tasks} for name, kept in scored.items()}
    trust = []
    for task in tasks:
        row = {"task": task, "examples": len(rows[task]),
               "gold dev sd over candidates": float(np.std([gold[n][task] for n in logged]))}
        for labelling, labels in labellings[task].items():
            against = [metric(tasks[task], labels, weak_logprobs[n][task]) for n in logged]
            row[labelling] = spearman(against, [gold[n][task] for n in logged])
        trust.append(row)
    spread = {"logged candidates": [means[n] for n in logged], "probes": [means[n] for n in probes]}
    best_probe = max(probes, key=means.get) if probes else None
    return {
        "gold_dev": {name: {**values, "mean": means[name]} for name, values in gold.items()},
        "spread": {part: {"n": len(values), "min": float(np.min(values)), "median": float(np.median(values)),
                          "max": float(np.max(values))} for part, values in spread.items() if values},
        "ties": means.get("ties"), "uniform": means.get("uniform"),
        "best_logged": max(logged, key=means.get), "best_probe": best_probe,
        "labeller_trust": trust,
        "level_spearman": level_spearman(run, gold, every),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=16, help="scoring batch (bf16 scores move with it)")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="score every K-th logged candidate (a large search: the suite's 80 take about 40 s each)")
    parser.add_argument("--no-probes", action="store_true", help="skip the probes around the start point")
    parser.add_argument("--name", help="the results file's name: merge_landscape_<name> (default: the config's)")
    args = parser.parse_args()
    cfg, run = finished_search(args.config, args.run_dir)
    started = time.time()
    scored = score_all(cfg, run, run.search / "landscape", args.batch_size, every=args.every,
                       probes=not args.no_probes)
    result = analyse(cfg, run, scored, args.every)
    command = "python " + shlex.join(["benchmarks/merge_landscape.py", *sys.argv[1:]])
    spread = pd.DataFrame([{"models": part, **values} for part, values in result["spread"].items()]
                          + [{"models": "TIES", "n": 1, "max": result["ties"]},
                             {"models": "uniform task arithmetic", "n": 1, "max": result["uniform"]}])
    global_probes = pd.DataFrame([{"model": name, **result["gold_dev"][name]} for name in
                                  ["uniform", "ties", *(n for n in result["gold_dev"]
                                                        if n.startswith(("probe: all", "probe: ties")))]])
    text = (f"# The merge landscape of a finished search ({cfg.name})\n\n"
            f"{time.strftime('%Y-%m-%d')}, {machine()}, seed {cfg.seed}, bf16 model with the float32 LM head of "
            f"every score, scoring batch {args.batch_size}; "
            f"`{command}` ({time.time() - started:.0f} s, cached scores reused).\n\n"
            "## Gold dev mean (primary metric) over the search space\n\n" + markdown_table(spread) +
            f"\nBest logged candidate: {result['best_logged']} "
            f"({result['gold_dev'][result['best_logged']]['mean']:.4f})" +
            (f"; best probe: {result['best_probe']} ({result['gold_dev'][result['best_probe']]['mean']:.4f})"
             if result["best_probe"] else "") + ".\n\n"
            + (f"## Scaling every expert together, and TIES's density\n\n{markdown_table(global_probes)}\n"
               if len(global_probes) > 2 else "") +
            "## Which labels rank candidates like gold dev? (Spearman over the logged candidates, per task)\n\n"
            + markdown_table(pd.DataFrame(result["labeller_trust"]))
            + "\n## Weak fitness against gold dev at each level (Spearman over the level's logged candidates)\n\n"
            + markdown_table(pd.DataFrame(result["level_spearman"])))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"merge_landscape_{args.name or cfg.name}"
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n",
                                         encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
