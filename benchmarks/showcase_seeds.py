"""The demo's showcase over seeds: is the evolved merge ahead of uniform and TIES in every run, on each split?

    python benchmarks/showcase_seeds.py RUN [RUN ...] --name NAME [--record]

Reads each finished run's stage 2 comparisons (`search/report.json`: the evolved merge minus uniform and TIES on the
final tables' examples, with the 95% paired bootstrap interval `sentimerge search` computed) and writes, per run and
split, the difference and its interval, then over the runs: the mean, the sd and how many runs have the evolved merge
ahead (difference above 0) and ahead beyond noise (the interval's low end above 0). Dev chose the settings; test
chose nothing. Writes benchmarks/results/showcase_<name>.{md,json}; `--record` puts the counts in summary.json
(`demo_showcase_<split>_<baseline>_ahead_beyond_noise`, runs where the interval excludes 0).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine, record  # noqa: E402
from sentimerge.pipeline.core.evaluation import markdown_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def comparisons(run: Path) -> list[dict]:
    """One row per split and baseline of `run`'s stage 2 report: the evolved merge's mean lead and its interval."""
    path = run / "search" / "report.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; is the search of {run} finished?")
    report = json.loads(path.read_text(encoding="utf-8"))
    seed = yaml.safe_load((run / "search" / "config.yaml").read_text(encoding="utf-8")).get("seed")
    rows = []
    for split in ("dev", "test"):
        for baseline, comparison in (report.get(f"gold_{split}_comparison") or {}).items():
            mean = comparison["mean"]
            rows.append({"run": str(run), "seed": seed, "split": split, "vs": baseline,
                         "difference": round(mean["difference"], 4), "low": round(mean["low"], 4),
                         "high": round(mean["high"], 4), "p_better": round(mean["p_better"], 3)})
    if not rows:
        raise SystemExit(f"{path}: no comparisons of the evolved merge (a run without an evolved merge?)")
    return rows


def over_runs(rows: list[dict]) -> list[dict]:
    """Per split and baseline: runs, mean and sd of the difference, runs ahead, runs ahead beyond noise."""
    summary = []
    for split in ("dev", "test"):
        for baseline in dict.fromkeys(row["vs"] for row in rows):
            group = [row for row in rows if row["split"] == split and row["vs"] == baseline]
            if not group:
                continue
            values = [row["difference"] for row in group]
            summary.append({"split": split, "vs": baseline, "runs": len(group),
                            "mean": round(statistics.fmean(values), 4),
                            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                            "ahead": sum(value > 0 for value in values),
                            "ahead_beyond_noise": sum(row["low"] > 0 for row in group)})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--record", action="store_true", help="write the counts to summary.json")
    args = parser.parse_args()
    rows = [row for run in args.runs for row in comparisons(run)]
    summary = over_runs(rows)
    command = "python " + shlex.join(["benchmarks/showcase_seeds.py", *sys.argv[1:]])
    text = (f"# The evolved merge against uniform and TIES, run by run: {args.name}\n\n`{command}`; {machine()}. "
            "Mean primary metric over the tasks, evolved merge minus the baseline on the final tables' examples, with "
            "the 95% paired bootstrap interval stage 2 computed (2000 resamples); dev chose the settings, test chose "
            "nothing.\n\n" + markdown_table(pd.DataFrame(rows), digits=4)
            + "\nOver the runs (ahead: difference above 0; beyond noise: the interval's low end above 0):\n\n"
            + markdown_table(pd.DataFrame(summary), digits=4))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"showcase_{args.name}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"showcase_{args.name}.json").write_text(
        json.dumps({"command": command, "rows": rows, "summary": summary}, indent=2) + "\n", encoding="utf-8")
    if args.record:
        record({f"demo_showcase_{row['split']}_{row['vs']}_ahead_beyond_noise": row["ahead_beyond_noise"]
                for row in summary}, command=command,
               notes=f"runs where the evolved merge's lead has a 95% interval above 0, of {len(args.runs)}")
    print(text)


if __name__ == "__main__":
    main()
