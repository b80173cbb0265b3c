"""The demo run's headline figures: wall time per stage, peak memory, retention and weak-vs-gold rank correlation.

    python benchmarks/demo_report.py RUN_DIR [--no-timing]   (a directory `sentimerge run configs/demo.yaml` finished)

Retention is the ratio of means over the tasks' primary metrics on dev (on test where `search.gold.splits` left dev
out): mean(model) / mean(each expert on its own task); a ratio of means, because one near-zero expert score
(Pearson) would dominate a mean of ratios. The weak-vs-gold Spearman is over the final table's models that have a weak
fitness and a mean (the merges: uniform, TIES, evolved; the base model and the experts too where the search scored
them on the weak set, `search.weak.references`): does the weak fitness order them as the gold score does? Writes
benchmarks/results/demo_pipeline.md and the summary keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine, record  # noqa: E402
from sentimerge.pipeline.core.evaluation import markdown_table

RESULTS = ROOT / "benchmarks" / "results"


def _examples(run: Path, split: str) -> str:
    """Examples per task of the final tables' `split`, counted from the kept predictions."""
    from sentimerge.pipeline.core.rundir import read_jsonl

    rows = read_jsonl(run / "search" / ("final_predictions.jsonl" if split == "dev" else
                                        f"final_predictions_{split}.jsonl"))
    return ", ".join(f"{task} {len(labels)}" for task, labels in rows[0]["predictions"].items()) if rows else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--no-timing", action="store_true",
                        help="leave demo_wall_seconds and demo_peak_rss_mb as they are (a run timed beside other jobs, or "
                             "one benchmarks/fresh_demo.py timed as a whole `make demo`)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    results = pd.read_csv(run / "results.csv")
    if "split" not in results:  # a run made before the test split was scored beside dev
        results.insert(0, "split", "dev")
    split = "dev" if "dev" in set(results["split"]) else results["split"].iloc[0]  # `search.gold.splits: [test]`
    table = results[results["split"] == split].drop(columns="split").set_index("model")
    info = json.loads((run / "run.json").read_text())
    report = json.loads((run / "search" / "report.json").read_text())
    final_row = next(name for name in table.index if name.startswith("final"))
    expert_mean = table.loc["each expert on its own task", "mean"]
    retention = {"evolved": table.loc["evolved merge", "mean"] / expert_mean,
                 "final": table.loc[final_row, "mean"] / expert_mean}
    spearman = report["weak_vs_gold_spearman"]
    throughput = report["throughput"]
    suffix = "" if split == "dev" else f"_{split}"
    values = {f"retention_evolved{suffix}": retention["evolved"], f"retention_final{suffix}": retention["final"],
              f"weak_gold_spearman{suffix}": spearman["final_table"]}
    for name, comparison in (report.get("gold_dev_comparison") or {}).items():  # paired bootstrap, final table
        values[f"demo_evolved_minus_{name}"] = comparison["mean"]["difference"]
        values[f"demo_evolved_beats_{name}_share"] = comparison["mean"]["p_better"]
    for name, comparison in (report.get("gold_test_comparison") or {}).items():  # the split that chose nothing
        values[f"demo_test_evolved_minus_{name}"] = comparison["mean"]["difference"]
        values[f"demo_test_evolved_minus_{name}_low"] = comparison["mean"]["low"]
    # each stage's seconds are those of the invocation that ran it (run.json keeps them when a later one skips it)
    if not args.no_timing:
        values |= {"demo_wall_seconds": info["total_seconds"], "demo_peak_rss_mb": info["peak_rss_mb"]}
    command = f"sentimerge run configs/demo.yaml --run-dir {run}; python benchmarks/demo_report.py {run}"
    record(values, command=command)
    bests = "none" if spearman["generation_bests"] is None else f"{spearman['generation_bests']:.3f}"
    examples = _examples(run, split)
    text = f"""# The demo pipeline end to end

`sentimerge run configs/demo.yaml --run-dir {run}` from an empty run directory, then
`python benchmarks/demo_report.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}, {machine()}. Primary
metric per task (as the tasks file states it), seed 0; every row of a split on the same examples (the whole
split, or `search.gold.final` examples per task: {examples}). Settings were chosen on dev; the test split chose nothing.

{markdown_table(results)}
{"Timings: not recorded as the demo's (--no-timing). " if args.no_timing else ""}Wall time per stage (s): {', '.join(f'{k} {v}' for k, v in info['seconds'].items())}; total {info['total_seconds']} s
({info['total_seconds'] / 60:.1f} min), each stage timed by the invocation that ran it.
Peak resident memory: {info['peak_rss_mb']:.0f} MB.

Retention (ratio of means over tasks vs each expert on its own task): evolved merge {retention['evolved']:.3f},
final model {retention['final']:.3f} ({split}). Weak fitness vs gold {split}, Spearman over the final table's models:
{spearman['final_table']:.3f}; over the generations' best candidates: {bests}.
Search candidates: merge {throughput['merge_ms_per_candidate']:.0f} ms, scoring
{throughput['scoring_s_per_candidate']:.2f} s ({throughput['examples_per_s']:.1f} examples/s), medians over
{throughput['candidates']} candidates.
""" + "".join(f"Evolved merge minus {name} on {split} (mean; 95% paired bootstrap interval): "
              f"{c['mean']['difference']:+.4f} [{c['mean']['low']:+.3f}, {c['mean']['high']:+.3f}], better in "
              f"{c['mean']['p_better']:.0%} of resamples.\n"
              for split in ("dev", "test") for name, c in (report.get(f"gold_{split}_comparison") or {}).items())
    (RESULTS / "demo_pipeline.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
