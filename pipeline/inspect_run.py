"""`sentimerge inspect RUN`: print the story of a run's search and write its plots.

Prints the tree of searches of a multi-stage search (level 2 and each group's level-1 search), the per-generation
table, the best coefficients (layer groups by experts), the baselines, the gold tables (dev, test)
with the weak-vs-gold rank correlation, and where the time went. Writes `<run>/search/plots/fitness.png` (fitness over
evaluations, baselines as lines) and `coefficients.png` (a heatmap of the best coefficients).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.evaluation import markdown_table, weak_gold_spearman
from sentimerge.pipeline.core.metrics import spearman
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl, save_figure


def main(run_dir: str | Path) -> dict[str, Path]:
    run = RunDir(run_dir)
    started = run.search_candidates.is_file() or run.search_level_plan.is_file()  # flat, or a multi-stage level 1
    if not started or not (run.search / "genome.json").is_file():
        raise SentimergeError(f"{run.search}: no search to inspect; run `sentimerge search` first")
    genome = json.loads((run.search / "genome.json").read_text(encoding="utf-8"))
    candidates = read_jsonl(run.search_candidates) if run.search_candidates.is_file() else []
    baselines = _read_json(run.search_baselines) or {}
    best = _read_json(run.search_best)
    selected = _read_json(run.search_selected)  # the evolved merge, once the search has chosen it
    status = "finished" if is_done(run.search) else "unfinished (run `sentimerge search` again to resume)"
    print(f"search in {run.search}: {status}; {len(candidates)} candidates, "
          f"{sum(row['status'] != 'ok' for row in candidates)} failed\n")

    tree = search_tree(run, candidates)
    if tree:
        print(tree)
    if run.search_generations.is_file():
        print("generations:\n")
        print(markdown_table(pd.read_csv(run.search_generations), digits=4))
    if best is not None:
        scores = ", ".join(f"{task} {value['metric']:.3f}" for task, value in best["tasks"].items())
        print(f"best on the weak set: generation {best['generation']} candidate {best['index']}, "
              f"fitness {best['fitness']:.4f} "
              f"({scores})\n")
    if run.search_selection.is_file():
        print("held-out selection (the best candidates and the start point re-scored on a second weak set):\n")
        print(markdown_table(pd.DataFrame([{k: row[k] for k in ("name", "fitness", "select_fitness")}
                                           for row in read_jsonl(run.search_selection)]), digits=4))
    shown = selected or best
    if shown is not None:
        which = f"evolved merge ({selected['selected_by']})" if selected else "best so far"
        print(f"{which} coefficients (layer groups by experts):\n")
        print(markdown_table(coefficient_table(genome, shown["coefficients"])))
    if baselines:
        rows = [{"baseline": name, "fitness": b["fitness"], **{t: v["metric"] for t, v in b.get("tasks", {}).items()}}
                for name, b in baselines.items()]
        print("baselines on the weak set (fitness; per-task metric against weak labels):\n")
        print(markdown_table(pd.DataFrame(rows), digits=4))
    finals = {split: pd.read_csv(run.search_final_table(split)) for split in ("dev", "test")
              if run.search_final_table(split).is_file()}  # the splits `search.gold.splits` scored
    if finals:
        print(f"gold {' and '.join(finals)} (primary metric per task; experts' own task is the ceiling):\n")
        markdown = run.search / "final.md"  # the tables and the evolved merge's paired comparisons with the baselines
        print(markdown.read_text(encoding="utf-8") if markdown.is_file() else
              "\n".join(markdown_table(table) for table in finals.values()))
        for split, table in finals.items():
            print(f"weak fitness vs gold {split} mean, Spearman over these models: "
                  f"{weak_gold_spearman(table):.3f}")
    if run.search_gold.is_file():
        gold = read_jsonl(run.search_gold)
        print(f"weak fitness vs gold dev sample of each generation's best, Spearman: "
              f"{spearman([g['fitness'] for g in gold], [g['gold'] for g in gold]):.3f} ({len(gold)} generations)\n")
    _print_time(run, candidates)
    plots = {"fitness": plot_fitness(run, candidates, baselines), "coefficients": None}
    if shown is not None:
        plots["coefficients"] = plot_coefficients(run, genome, shown["coefficients"])
    print("plots: " + ", ".join(str(path) for path in plots.values() if path))
    return plots


def search_tree(run: RunDir, candidates: list[dict]) -> str | None:
    """The tree of a multi-stage search (`search.stages: groups`), None for a flat one: level 2 at the root, one
    branch per task group in the order the groups enter, each with its level-1 search's progress, its baselines on
    the group's weak sets and the group model it chose (a group of one expert enters as that expert)."""
    plan = _read_json(run.search_level_plan)
    if plan is None:
        return None
    group_models = _read_json(run.search_level_models) or {}
    ok = [row for row in candidates if row["status"] == "ok"]
    root = (f"level 2: one CMA-ES over the {len(plan['groups'])} group models' deltas, "
            + (f"{len(candidates)} candidates, best weak fitness {max(r['fitness'] for r in ok):.4f}" if ok
               else "not started"))
    lines = [f"search tree (multi-stage; groups enter by {plan['order']}):", "", root]
    for position, group in enumerate(plan["groups"]):
        name, experts = group["name"], group["experts"]
        branch = "└─" if position == len(plan["groups"]) - 1 else "├─"
        stem = "  " if branch == "└─" else "│ "
        if len(experts) == 1:
            lines.append(f"{branch} {name}: {experts[0]} (one expert: enters level 2 as it is)")
            continue
        rows = read_jsonl(run.search_level_log(name)) if run.search_level_log(name).is_file() else []
        scored = [row for row in rows if row["status"] == "ok"]
        progress = (f"{len(rows)} candidates, best weak fitness {max(r['fitness'] for r in scored):.4f}" if scored
                    else "not started")
        lines.append(f"{branch} {name}: level-1 CMA-ES over {', '.join(experts)}; {progress}")
        baselines = _read_json(run.search_level_baselines(name)) or {}
        if baselines:
            lines.append(f"{stem}   baselines on the group's weak sets: "
                         + ", ".join(f"{key} {value['fitness']:.4f}" for key, value in baselines.items()))
        chosen = group_models.get(name)
        if chosen is not None:
            which = "the start" if chosen["generation"] is None else \
                f"gen {chosen['generation']} cand {chosen['index']}"
            held = "" if chosen.get("select_fitness") is None else f", held-out {chosen['select_fitness']:.4f}"
            lines.append(f"{stem}   group model: {which} (by {chosen.get('selected_by', 'weak fitness')}; "
                         f"weak {chosen['fitness']:.4f}{held})")
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def coefficient_table(genome: dict, coefficients: list[float]) -> pd.DataFrame:
    """Rows: layer group (and part); columns: experts."""
    experts, parts = genome["experts"], genome["parts"]
    grid = np.asarray(coefficients).reshape(len(experts), -1, len(parts))
    rows = []
    for group in range(grid.shape[1]):
        first = group * genome["group_size"]
        last = min(genome["layers"], first + genome["group_size"]) - 1
        for p, part in enumerate(parts):
            rows.append({"layers": f"{first}-{last}" + ("" if part == "all" else f" {part}"),
                         **{expert: float(grid[e, group, p]) for e, expert in enumerate(experts)}})
    return pd.DataFrame(rows)


def _print_time(run: RunDir, candidates: list[dict]) -> None:
    timing = _read_json(run.search / "timing.json")
    ok = [row for row in candidates if row["status"] == "ok"]
    if timing:
        total = sum(timing["seconds"].values())
        print("where the time went:\n")
        rows = [{"phase": phase, "seconds": seconds, "share": seconds / total if total else 0.0}
                for phase, seconds in timing["seconds"].items()]
        print(markdown_table(pd.DataFrame(rows), digits=2))
    if ok:
        merge_ms = 1000 * np.median([row["merge_seconds"] for row in ok])
        score_s = np.median([row["score_seconds"] for row in ok])
        examples = np.median([row["examples"] for row in ok]) / score_s
        print(f"per candidate (median): merge {merge_ms:.0f} ms, scoring {score_s:.2f} s "
              f"({examples:.1f} examples/s); merge is {merge_ms / 10 / score_s:.1f}% of scoring\n")


def plot_fitness(run: RunDir, candidates: list[dict], baselines: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitness = [row["fitness"] for row in candidates]
    failed = [i for i, row in enumerate(candidates) if row["status"] != "ok"]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.scatter(range(len(fitness)), fitness, s=12, color="tab:blue", label="candidate")
    if failed:
        axes.scatter(failed, [fitness[i] for i in failed], s=18, marker="x", color="tab:red", label="failed")
    axes.plot(np.maximum.accumulate(fitness) if fitness else [], color="tab:blue", label="best so far")
    lines = {name: b for name, b in baselines.items()  # the scan is in the table; references may be unscored
             if not name.startswith("uniform@") and b["fitness"] is not None}
    for (name, baseline), color in zip(lines.items(), plt.cm.tab10(np.linspace(0.1, 0.9, len(lines)))):
        axes.axhline(baseline["fitness"], linestyle="--", linewidth=1, color=color, label=name)
    axes.set_xlabel("evaluation")
    axes.set_ylabel("weak-label fitness")
    axes.legend(fontsize=7, loc="lower right")
    axes.set_title("CMA-ES merge search")
    return save_figure(figure, run.search_plots / "fitness.png")


def plot_coefficients(run: RunDir, genome: dict, coefficients: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = coefficient_table(genome, coefficients)
    values = table[genome["experts"]].to_numpy()
    figure, axes = plt.subplots(figsize=(2 + 1.4 * len(genome["experts"]), 1.5 + 0.35 * len(table)))
    image = axes.imshow(values, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(genome["experts"])), genome["experts"], rotation=30, ha="right")
    axes.set_yticks(range(len(table)), table["layers"])
    axes.set_ylabel("layers")
    for (i, j), value in np.ndenumerate(values):
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    figure.colorbar(image, ax=axes, label="coefficient")
    axes.set_title("evolved merge coefficients")
    return save_figure(figure, run.search_plots / "coefficients.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory")


def run_from_args(args: argparse.Namespace, cfg: RunConfig | None) -> None:
    main(args.run)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("inspect")
