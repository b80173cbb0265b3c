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

from pipeline.config import RunConfig, dump_config, suggest
from pipeline.data import find_conflicts, find_leaks, load_task_splits, source_location
from pipeline.errors import SentimergeError
from pipeline.models import check_model_dir, provision_base_model
from pipeline.prompts import answer_tokens, prompt_ids, user_message
from pipeline.rundir import (RunDir, digest, fresh_dir, is_done, read_jsonl, read_manifest, write_json_atomic,
                             write_jsonl_atomic, write_manifest, write_text_atomic)

log = logging.getLogger("sentimerge.prepare")


def fingerprint(cfg: RunConfig) -> str:
    """Hash of what decides the prepared data and model: a run dir prepared with another one is not reused."""
    decisive = {"seed": cfg.seed, "base_model": cfg.base_model.decisive(), "data_root": cfg.data_root,
                "tasks": [task.decisive() for task in cfg.tasks]}
    return digest(decisive)


def main(cfg: RunConfig, *, force: bool = False) -> Path:
    run = RunDir(cfg.resolved_run_dir)
    if is_done(run.prepare) and not force and read_manifest(run.prepare).get("fingerprint") != fingerprint(cfg):
        raise SentimergeError(f"{run.prepare}: prepared with a different config (tasks, data, seed or base model); "
                              "use another --run-dir, or --force to prepare again")
    started = time.time()
    data = {}
    for task in cfg.tasks:  # read every time: a finished prepare is reused only while its data is unchanged
        data[task.name] = load_task_splits(task, data_root=cfg.data_root, cache_dir=cfg.resolved_cache_dir,
                                           seed=cfg.seed)
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
    _check_answers(cfg, model_path)
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


def prepared_key(run: RunDir) -> str:
    """What the later stages hash of stage 0: its config fingerprint and the hashes of the data it froze (a run
    prepared before data hashes were kept: the fingerprint alone, so that it keeps its later stages)."""
    manifest = read_manifest(run.prepare)
    if "data" not in manifest:
        return manifest.get("fingerprint")
    return digest({"fingerprint": manifest.get("fingerprint"), "data": manifest["data"]})


def _tokenizer_corpus(cfg: RunConfig, data: dict) -> list[str]:
    """Texts a tiny model's tokenizer is trained on (only used when the base model is `tiny`)."""
    if cfg.base_model.tiny is None:
        return []
    corpus = []
    for task in cfg.tasks:
        corpus += [user_message(task, "", None), *task.answers, "Text: Aspect: Answer with one of:"]
        corpus += [row["text"] for row in data[task.name].get("train", [])]
    return corpus


def _check_answers(cfg: RunConfig, model_path: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.base_model.trust_remote_code)
    for task in cfg.tasks:
        try:
            answer_tokens(tokenizer, task)
        except SentimergeError as error:
            raise SentimergeError(f"task {task.name}: {error}") from None


def check_against_base_model(cfg: RunConfig, model_path: str, data: dict | None = None) -> None:
    """What the config asks of the base model, checked before anything trains, every problem in one error: each
    LoRA `target_modules` name matches a linear layer (a typo trained nothing on it, an embedding's LoRA was left
    out of every merge), and the longest prompt plus answer fits the model's context (`max_position_embeddings`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trust = cfg.base_model.trust_remote_code
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    other = {name.rsplit(".", 1)[-1]: type(module).__name__ for name, module in model.named_modules()
             if name and not isinstance(module, torch.nn.Linear)}
    problems = []
    for section, lora in (("experts", cfg.experts.lora), ("finetune", cfg.finetune.lora)):
        if lora.target_modules == "all-linear":
            continue
        for target in lora.target_modules:
            if target in linear:
                continue
            if target in other:
                problems.append(f"{section}.lora.target_modules: {target!r} is a {other[target]}, not a linear layer; "
                                "only linear layers' LoRA deltas are merged")
            else:
                problems.append(f"{section}.lora.target_modules: no module named {target!r} in the base model"
                                f"{suggest(target, sorted(linear))}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions and data is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
        for task in cfg.tasks:
            rows = [row for rows in data[task.name].values() for row in rows]
            aspect = max((row.get("aspect") or "" for row in rows), key=len, default="")
            answer = max(len(tokens) for tokens in answer_tokens(tokenizer, task).answers)
            # the longest prompt: the instruction and answer list, the longest aspect, a text cut at max_text_tokens
            frame = len(prompt_ids(tokenizer, task, {"text": "", "aspect": aspect or None}))
            longest = frame + task.max_text_tokens + answer + 1
            if longest > positions:
                problems.append(f"task {task.name}: prompts of up to {longest} tokens (max_text_tokens "
                                f"{task.max_text_tokens}) exceed the base model's context of {positions} positions; "
                                f"lower max_text_tokens to {max(8, positions - frame - answer - 1)} or less")
    if problems:
        raise SentimergeError("\n".join(problems))


def _report(cfg: RunConfig, data: dict, leaks: list[dict], conflicts: list[dict]) -> dict:
    tasks = {}
    for task in cfg.tasks:
        splits = {}
        for split, rows in data[task.name].items():
            entry = {"examples": len(rows), "sha256": data_hashes({"t": {"s": rows}})["t"]["s"]}
            if task.kind == "classification":
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


def load_prepared(run: RunDir, task: str, split: str) -> list[dict]:
    """The canonical examples `prepare` froze for `task` and `split` (what every later stage reads)."""
    path = run.data(task, split)
    if not is_done(run.prepare):
        raise SentimergeError(f"{run.prepare}: not prepared; run `sentimerge prepare` first")
    if not path.is_file():
        raise SentimergeError(f"{path}: task {task!r} has no prepared {split} split")
    return read_jsonl(path)


def prepared_model_path(run: RunDir) -> str:
    read_manifest(run.prepare)
    try:
        path = json.loads(run.base_model.read_text(encoding="utf-8"))["path"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise SentimergeError(f"{run.base_model}: missing or corrupted; run `sentimerge prepare --force`") from None
    check_model_dir(Path(path))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="prepare again even if the run dir is prepared")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, force=args.force)


if __name__ == "__main__":
    from pipeline.cli import run_module

    run_module("prepare")
