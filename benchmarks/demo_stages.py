"""Where finished demo runs spent their time, side by side: each stage, and inside it each phase the run recorded.

    python benchmarks/demo_stages.py RUN [RUN ...] --label LABEL [--label LABEL ...] --name NAME

Reads only what the runs wrote: `run.json` (seconds per stage, each stage in its own child process, and the peak
resident memory of `sentimerge run`), the search's `timing.json` (load, weak labels, baselines, candidates' merging
and scoring, selection, final tables), the experts' and stage 3's manifests (training and dev-evaluation seconds)
and the export's. Nothing is re-run, so the runs must have been timed alone on an idle machine (a fresh clone's
`make demo`: benchmarks/fresh_demo.py). The first run is the reference of the ratio columns. Writes
benchmarks/results/demo_stages_<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from benchmarks.summary import machine  # noqa: E402
from sentimerge.pipeline.core.evaluation import markdown_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _json(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path}: missing; is the run finished?")
    return json.loads(path.read_text(encoding="utf-8"))


def stage_seconds(run: Path) -> dict[str, float]:
    """{'stage' or 'stage / phase': seconds} of one finished run (the phases are the parts its stages record)."""
    info = _json(run / "run.json")
    rows: dict[str, float] = {}
    for stage, seconds in info["seconds"].items():
        rows[stage] = float(seconds)
        if stage == "experts":
            experts = sorted(p for p in (run / "experts").iterdir() if (p / "DONE.json").is_file())
            done = [_json(p / "DONE.json") for p in experts]
            train = sum(d.get("train_seconds", 0.0) for d in done)
            evaluation = sum(d.get("eval_seconds", 0.0) for d in done)
            rows["experts / task experts' training"] = train
            rows["experts / task experts' dev evaluations"] = evaluation
            rows["experts / shared adapter, curriculum scoring, loading"] = float(seconds) - train - evaluation
        elif stage == "search":
            phases = _json(run / "search" / "timing.json")["seconds"]
            for phase, value in phases.items():
                rows[f"search / {phase}"] = float(value)
            rows["search / other"] = float(seconds) - sum(phases.values())
        elif stage == "finetune":
            done = _json(run / "finetune" / "DONE.json")
            rows["finetune / training"] = done["train_seconds"]
            rows["finetune / dev evaluations"] = done["eval_seconds"]
            rows["finetune / other"] = float(seconds) - done["train_seconds"] - done["eval_seconds"]
    rows["total"] = float(info["total_seconds"])
    rows["peak RSS (MB)"] = float(info["peak_rss_mb"])
    return rows


def side_by_side(runs: list[Path], labels: list[str]) -> list[dict]:
    """One row per stage or phase: each run's seconds and its ratio to the first run's."""
    columns = [stage_seconds(run) for run in runs]
    keys = list(dict.fromkeys(key for column in columns for key in column))
    table = []
    for key in keys:
        row = {"part": key}
        for label, column in zip(labels, columns):
            row[label] = None if key not in column else round(column[key], 1)
        reference = columns[0].get(key)
        for label, column in zip(labels[1:], columns[1:]):
            value = column.get(key)
            row[f"{label}/{labels[0]}"] = (round(value / reference, 2) if value is not None and reference else None)
        table.append(row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--label", action="append", required=True, help="one per run, in order")
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    if len(args.label) != len(args.runs):
        raise SystemExit(f"--label: {len(args.label)} given for {len(args.runs)} runs; give one per run")
    table = side_by_side(args.runs, args.label)
    command = "python " + shlex.join(["benchmarks/demo_stages.py", *sys.argv[1:]])
    runs = ", ".join(f"`{label}`: {run}" for label, run in zip(args.label, args.runs))
    text = (f"# Where the demo's time went: {' vs '.join(args.label)}\n\n`{command}`; {machine()}; {runs}. Seconds "
            f"as the runs recorded them (each stage in its own child process); ratios against `{args.label[0]}`.\n\n"
            + markdown_table(pd.DataFrame(table), digits=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"demo_stages_{args.name}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"demo_stages_{args.name}.json").write_text(
        json.dumps({"command": command, "machine": machine(), "runs": dict(zip(args.label, map(str, args.runs))),
                    "rows": table}, indent=2) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
