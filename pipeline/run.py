"""`sentimerge run CONFIG`: every stage in order (prepare, experts, search, finetune, export), skipping the finished
ones, each in a forked child process from the command line (`core.isolation`: a stage's memory goes back to the
system when it ends), then one results table: the zero-shot base model, each expert on its own task, the uniform and
TIES merges, the evolved merge, and the final model, each task's primary metric and their mean, on dev and (where
every task has one) test, every row of a split scored on the same examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import pandas as pd

from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.evaluation import (
    evaluation_splits,
    final_examples,
    markdown_table,
    merge_labels,
    missing_test_splits,
)
from sentimerge.pipeline.core.isolation import isolation_available, run_isolated
from sentimerge.pipeline.core.rundir import RunDir, is_done, write_csv_atomic, write_json_atomic, write_text_atomic
from sentimerge.pipeline.core.runtime import release_memory

log = logging.getLogger("sentimerge.run")


def stages():
    """The stage scripts in order (imported here so that `sentimerge --help` stays light)."""
    from sentimerge.pipeline import experts, export, finetune, prepare, search

    return [("prepare", prepare.main), ("experts", experts.main), ("search", search.main),
            ("finetune", finetune.main), ("export", export.main)]


def main(cfg: RunConfig) -> pd.DataFrame:
    run = RunDir(cfg.resolved_run_dir)
    seconds, skipped = {}, []
    for name, stage in stages():
        log.info("== %s", name)
        folders = [run.prepare] if name == "prepare" else [run.expert(t.name) for t in cfg.tasks] \
            if name == "experts" else [getattr(run, name)]
        if all(is_done(folder) for folder in folders):
            skipped.append(name)
        started = time.time()
        run_isolated(stage, cfg)  # in a forked child: every stage starts from the memory of an idle process
        release_memory()  # what the stage loaded where it ran in this process (isolation off)
        seconds[name] = round(time.time() - started, 1)
        if name == "prepare" and missing_test_splits(run, cfg):  # before any training, not at the search
            raise SentimergeError("\n".join(missing_test_splits(run, cfg)))
    # wall time per stage of the invocation that ran it, and the peak memory of those invocations: a stage finished
    # earlier (skipped now: say which) keeps what the earlier run.json recorded, so a second `run` loses nothing
    earlier = json.loads(run.run_info.read_text(encoding="utf-8")) if run.run_info.is_file() else {}
    seconds.update({name: earlier["seconds"][name] for name in skipped if name in earlier.get("seconds", {})})
    peak = max(peak_rss_mb(), earlier.get("peak_rss_mb", 0.0) if skipped else 0.0)
    write_json_atomic(run.run_info, {
        "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1), "skipped": skipped,
        "peak_rss_mb": round(peak, 1), "stages_in_child_processes": isolation_available()})
    table = results_table(cfg, run)
    write_csv_atomic(run.root / "results.csv", table)
    text = markdown_table(table)
    write_text_atomic(run.root / "results.md", text)
    examples = "; ".join(f"{split}: " + ", ".join(f"{name} {len(rows)}" for name, rows in
                                                  final_examples(run, cfg, split).items())
                         for split in evaluation_splits(run, cfg))
    print(f"\nResults of {cfg.name} (primary metric per task; every row of a split on the same examples: "
          f"{examples}; settings were chosen on dev; {run.root / 'results.md'}):\n")
    print(text)
    print("seconds per stage: " + ", ".join(f"{name} {value}" for name, value in seconds.items())
          + (f" (finished earlier: {', '.join(skipped)})" if skipped else ""))
    return table


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children (each stage's child), in MB."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux reports KB


def results_table(cfg: RunConfig, run: RunDir) -> pd.DataFrame:
    """One row per model and evaluation split: stage 2's final table (base, experts, uniform, TIES, evolved), each
    expert on its own task, and the exported final model; columns are the tasks' primary metrics and their mean.
    Every row of a split is scored on the same examples (`core.evaluation.final_examples`): dev, on which settings
    were chosen, and test, which chose nothing, where every task has one."""
    names = [task.name for task in cfg.tasks]
    label = merge_labels(bool(cfg.experts.shared.examples))
    rows = []
    for split in evaluation_splits(run, cfg):
        search = pd.read_csv(run.search_final_table(split)).set_index("model")
        split_rows = [{"split": split, "model": label.get(model, model), **{n: search.loc[model, n] for n in names}}
                      for model in search.index if not model.startswith("expert:")]
        split_rows.insert(1, {"split": split, "model": "each expert on its own task",
                              **{n: search.loc[f"expert:{n}", n] for n in names}})
        final = pd.read_csv(run.export_eval(split)).set_index("task")["primary"]
        split_rows.append({"split": split, "model": f"final ({cfg.finetune.weighting.name})",
                           **{n: float(final[n]) for n in names}})
        rows += split_rows
    table = pd.DataFrame(rows)
    table["mean"] = table[names].mean(axis=1)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("run")
