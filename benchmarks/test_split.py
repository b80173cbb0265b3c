"""Does the evolved merge's lead hold on examples no choice has seen? Scores a finished search on the test split.

    python benchmarks/test_split.py CONFIG --run-dir R [--batch-size 16]

The search picks its merge on weak labels, and the config's settings were chosen looking at gold dev scores; the
test split was used by neither. On every test example of each task, scores uniform task arithmetic, TIES (the
search's own baselines, same coefficients) and the selected evolved merge, merged in memory exactly as the search
scores candidates, and reports the evolved merge minus each baseline with the paired bootstrap of stage 2's final
table. Writes benchmarks/results/test_split_<name>.{md,json}.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import finished_search, machine  # noqa: E402
from sentimerge.merge.engine import InMemoryMerge  # noqa: E402
from sentimerge.merge.fitness import encode_set, evaluate  # noqa: E402
from sentimerge.merge.methods import get_method  # noqa: E402
from sentimerge.pipeline.core.candidates import load_search_inputs
from sentimerge.pipeline.core.metrics import paired_bootstrap  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, write_json_atomic, write_text_atomic  # noqa: E402
from sentimerge.pipeline.core.upstream import load_prepared
from sentimerge.pipeline.search import COMPARED, final_markdown

RESULTS = ROOT / "benchmarks" / "results"


def score_test(cfg, run: RunDir, batch_size: int) -> dict:
    """Per model: each task's primary test metric and mean, and the predictions; plus the evolved-minus-baseline
    bootstraps."""
    missing = [task.name for task in cfg.tasks if not run.data(task.name, "test").is_file()]
    if missing:
        raise SystemExit(f"{run.prepare}: no prepared test split for {', '.join(missing)} (give the tasks one)")
    data = {task.name: load_prepared(run, task.name, "test") for task in cfg.tasks}
    model, tokenizer, adapters, genome = load_search_inputs(cfg, run)
    gold = {name: [example["label"] for example in examples] for name, examples in data.items()}
    sets = [encode_set(tokenizer, task, data[task.name], gold[task.name]) for task in cfg.tasks]
    baselines = json.loads(run.search_baselines.read_text(encoding="utf-8"))
    selected = json.loads(run.search_selected.read_text(encoding="utf-8"))
    models = [(name, baselines[name]["method"], baselines[name]["coefficients"]) for name in COMPARED]
    models.append(("evolved", cfg.search.method, selected["coefficients"]))
    scores, predictions = {}, {}
    for name, method, coefficients in models:  # one merger at a time, each on the restored base
        merger = InMemoryMerge(model, adapters, genome, get_method(method), density=cfg.search.density, seed=cfg.seed)
        merger.apply(np.asarray(coefficients, dtype=float))
        result = evaluate(model, tokenizer, sets, batch_size)
        merger.restore()
        scores[name] = {task: value["metric"] for task, value in result["tasks"].items()}
        scores[name]["mean"] = float(np.mean([value["metric"] for value in result["tasks"].values()]))
        predictions[name] = result["predictions"]
    leads = {name: paired_bootstrap(list(cfg.tasks), gold, predictions["evolved"], predictions[name], seed=cfg.seed)
             for name in COMPARED}
    return {"examples": {name: len(rows) for name, rows in data.items()}, "scores": scores, "evolved_minus": leads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=16, help="scoring batch (bf16 scores move with it)")
    args = parser.parse_args()
    cfg, run = finished_search(args.config, args.run_dir)
    started = time.time()
    result = score_test(cfg, run, args.batch_size)
    command = "python " + shlex.join(["benchmarks/test_split.py", *sys.argv[1:]])
    table = pd.DataFrame([{"model": name, **values} for name, values in result["scores"].items()])
    examples = ", ".join(f"{name} {count}" for name, count in result["examples"].items())
    text = (f"# The evolved merge on the test split ({cfg.name})\n\n"
            f"{time.strftime('%Y-%m-%d')}, {machine()}, seed {cfg.seed}, bf16, scoring batch {args.batch_size}; "
            f"`{command}` ({time.time() - started:.0f} s). Every test example ({examples}); primary metric per "
            "task.\n\n" + final_markdown(table, result["evolved_minus"], "test"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"test_split_{cfg.name}.json", {"command": command, **result})
    write_text_atomic(RESULTS / f"test_split_{cfg.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
