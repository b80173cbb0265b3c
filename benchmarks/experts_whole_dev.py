"""Does every expert beat the zero-shot base model on its own task? Scored on each task's WHOLE dev split.

    python benchmarks/experts_whole_dev.py configs/suite.yaml --run-dir R [--arm random=R2 ...]

The experts' manifests score a 100-example dev sample, and two such samples can disagree by more than an expert's
gain; this scores the zero-shot base model and each arm's expert (its LoRA merged into the base in memory, exactly
the `expert:<task>` merge of stage 2) on every dev example of its task. The first arm is the run's own experts;
each `--arm NAME=RUN_DIR` adds the experts of another run dir (e.g. the curriculum ablation's random-order arm).
Writes benchmarks/results/experts_whole_dev_<config name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine  # noqa: E402
from sentimerge.merge.engine import InMemoryMerge  # noqa: E402
from sentimerge.merge.genome import Genome  # noqa: E402
from sentimerge.merge.lora import read_adapter  # noqa: E402
from sentimerge.merge.methods import get_method  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.evaluation import evaluate_model, markdown_table
from sentimerge.pipeline.core.models import load_model  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, is_done  # noqa: E402
from sentimerge.pipeline.core.runtime import set_threads, setup_logging  # noqa: E402
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=RUN_DIR")
    parser.add_argument("--label", default="expert", help="the run's own arm's column name")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config, run_dir=args.run_dir)
    set_threads(cfg.threads)
    run = RunDir(cfg.resolved_run_dir)
    arms = {args.label: run, **{name: RunDir(path) for name, path in (text.split("=", 1) for text in args.arm)}}
    missing = [f"{folder.expert(task.name)}" for folder in arms.values() for task in cfg.tasks
               if not is_done(folder.expert(task.name))]
    if missing:
        raise SystemExit("no finished expert in: " + ", ".join(missing))
    started = time.time()
    model, tokenizer = load_model(prepared_model_path(run), dtype="bfloat16")
    dev = {task.name: load_prepared(run, task.name, "dev") for task in cfg.tasks}
    scores = {"zero_shot": evaluate_model(model, tokenizer, list(cfg.tasks), dev,
                                          batch_size=cfg.evaluate.batch_size)[0].set_index("task")["primary"]}
    for name, folder in arms.items():
        adapters = {task.name: read_adapter(folder.expert_adapter(task.name)) for task in cfg.tasks}
        genome = Genome(tuple(adapters), model.config.num_hidden_layers, cfg.search.layer_group_size)
        merger = InMemoryMerge(model, adapters, genome, get_method("task_arithmetic"))
        own = {}
        for task in cfg.tasks:
            merger.apply(genome.one_hot(task.name))
            table, _ = evaluate_model(model, tokenizer, [task], {task.name: dev[task.name]},
                                      batch_size=cfg.evaluate.batch_size)
            own[task.name] = float(table.set_index("task").loc[task.name, "primary"])
        merger.apply(genome.filled(0.0))  # back to the base model
        scores[name] = pd.Series(own)
    rows = [{"task": task.name, "metric": task.primary, "dev_n": len(dev[task.name]),
             **{name: float(values[task.name]) for name, values in scores.items()}} for task in cfg.tasks]
    table = pd.DataFrame(rows)
    for name in arms:
        table[f"{name} - zero_shot"] = table[name] - table["zero_shot"]
    mean = {"task": "mean", "metric": "", "dev_n": int(table["dev_n"].sum()),
            **{column: table[column].mean() for column in table.columns if column not in ("task", "metric", "dev_n")}}
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    above = {name: int((table[name].iloc[:-1] > table["zero_shot"].iloc[:-1]).sum()) for name in arms}
    command = "python " + shlex.join(["benchmarks/experts_whole_dev.py", *sys.argv[1:]])
    header = (f"# Experts against the zero-shot base model on the whole dev splits ({cfg.name})\n\n"
              f"{time.strftime('%Y-%m-%d')}, {machine()}, seed {cfg.seed}, bf16; `{command}` "
              f"({time.time() - started:.0f} s). Arms: " +
              ", ".join(f"`{name}` = `{folder.root}` ({above[name]} of {len(cfg.tasks)} tasks above zero-shot)"
                        for name, folder in arms.items()) + ".\n\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"experts_whole_dev_{cfg.name}"
    stem.with_suffix(".md").write_text(header + markdown_table(table), encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "above_zero_shot": above,
                                                     "table": json.loads(table.to_json(orient="records"))},
                                                    indent=2) + "\n", encoding="utf-8")
    print(header + markdown_table(table))


if __name__ == "__main__":
    main()
