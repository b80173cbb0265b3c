"""MEM-MCL's mechanisms against their off-switches, demo and suite, in one table (issue 22), from the result files of
the benchmarks that measured them (nothing is trained or scored here):

    python benchmarks/mem_mcl_table.py

- multi-stage merging by task group (`search.stages: groups`) against the flat search, the merged model's gold mean
  at the same number of candidate evaluations (`benchmarks/multistage.py`: multistage_<config>.json);
- task pacing in stage 3 (`finetune.task_pacing`, easiest task first) against all tasks at once, the final model
  (`benchmarks/stage3_ablation.py`: stage3_ablation_<config>_task_pacing.json);
- 3 in-context demonstrations per prompt, ordered easiest first, against none, the final model
  (stage3_ablation_<config>_demonstrations.json).

Each row: the mean over seeds of the seed-by-seed difference (mechanism minus off-switch, mean primary metric over
tasks), its sd, the seeds where the mechanism is ahead, on dev (chose the settings) and on the split that chose
nothing (the demo's test split; the suite's unseen dev half). Writes benchmarks/results/mem_mcl_features.{md,json}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sentimerge.pipeline.core.evaluation import markdown_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
UNSEEN = {"demo": "test", "suite": "unseen dev half"}
# (mechanism, off-switch, what is scored, result file pattern, how its summary rows are picked)
MECHANISMS = [
    ("multi-stage merge by task group", "flat search, same evaluations", "merged model", "multistage_{config}",
     lambda row: row.get("comparison") == "multistage - flat"),
    ("task pacing, easiest task first", "all tasks at once", "final model", "stage3_ablation_{config}_task_pacing",
     lambda row: True),
    ("3 demonstrations, easiest first", "no demonstrations", "final model",
     "stage3_ablation_{config}_demonstrations", lambda row: True),
]


def rows(results: Path = RESULTS) -> list[dict]:
    """One row per mechanism, config and split, from the summaries of the result files that exist."""
    table = []
    for mechanism, off, scored, pattern, pick in MECHANISMS:
        for config in ("demo", "suite"):
            path = results / (pattern.format(config=config) + ".json")
            if not path.is_file():
                continue
            for row in json.loads(path.read_text(encoding="utf-8"))["summary"]:
                if not pick(row):
                    continue
                table.append({"mechanism": mechanism, "off-switch": off, "scored": scored, "config": config,
                              "split": "dev" if row["split"] == "dev" else UNSEEN[config],
                              "seeds": int(row["runs"]), "difference": float(row["difference"]),
                              "sd": float(row["sd"]), "ahead": row["ahead"], "source": path.name})
    return table


def main() -> None:
    table = rows()
    if not table:
        raise SystemExit(f"{RESULTS}: none of the result files this table reads exists")
    frame = pd.DataFrame(table)
    text = ("# MEM-MCL's mechanisms against their off-switches\n\n`python benchmarks/mem_mcl_table.py` (from the "
            "result files named in `source`; their commands and per-seed paired bootstrap intervals are there)\n\n"
            "difference: mechanism minus off-switch, mean primary metric over tasks, mean over seeds of the "
            "seed-by-seed differences; dev chose the settings, the other split chose nothing.\n\n"
            + markdown_table(frame))
    (RESULTS / "mem_mcl_features.md").write_text(text, encoding="utf-8")
    (RESULTS / "mem_mcl_features.json").write_text(json.dumps({"rows": table}, indent=2) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
