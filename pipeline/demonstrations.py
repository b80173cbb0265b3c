"""`sentimerge demonstrations CONFIG --k K --out FILE`: draw in-context demonstrations for every task and write a
tasks file that carries them (MEM-MCL puts easy examples before the question).

Per task: the labelled train rows whose input does not occur in the task's dev or test split form the candidates; a
seeded sample of `--pool` of them (salt `<task>/demonstrations`, the run's data seed) gets each example's difficulty
from the curriculum's model-free signals (`experts.curriculum.signals` without `base_loss`; input length in words);
K demonstrations are drawn from it, seeded and stratified over the answers (one answer after another, in a seeded
order, so K >= the number of answers shows every answer), then ordered easiest first. The written file is the
config's tasks with `demonstrations:` filled in: point a config's `tasks:` at it. Scoring (evaluation, the search's
fitness and selection sets, `predict`, the exported model's card) puts them before every question; training prompts
leave them out, and the search's weak and selection sets never draw a demonstration's row.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import yaml

from sentimerge.curriculum.signals import SignalInputs, example_difficulty
from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.data import load_task_splits, sample_examples
from sentimerge.pipeline.core.errors import ConfigError, DataError
from sentimerge.pipeline.core.tasks import TaskSpec

log = logging.getLogger("sentimerge.demonstrations")

MODEL_FREE = ("agreement", "length", "rarity", "lexicon")


def _key(example: dict) -> tuple[str, str | None]:
    return example["text"].strip(), (example.get("aspect") or None)


def draw_demonstrations(task: TaskSpec, splits: dict[str, list[dict]], k: int, *, seed: int, pool: int,
                        signals: dict[str, float], label_polarity: dict[str, float]) -> list[dict]:
    """K demonstrations of `task` ({text, aspect?, label}, easiest first) from `splits["train"]` (see the module
    docstring for the rule). Raises DataError when the train split is unlabelled or has fewer than K candidates."""
    evaluated = {_key(example) for split, rows in splits.items() if split != "train" for example in rows}
    candidates = [example for example in splits.get("train", [])
                  if example.get("label") is not None and _key(example) not in evaluated]
    if len(candidates) < k:
        raise DataError(f"task {task.name}: {len(candidates)} labelled train rows outside dev and test, fewer than "
                        f"--k {k}")
    rows = sample_examples(candidates, pool, seed, f"{task.name}/demonstrations") if pool < len(candidates) \
        else list(candidates)
    weights = {name: weight for name, weight in signals.items() if name in MODEL_FREE}
    difficulty = example_difficulty(weights, SignalInputs(task, rows, [len(row["text"].split()) for row in rows],
                                                          label_polarity=label_polarity)).scores
    rng = np.random.default_rng([seed, int(hashlib.sha1(f"{task.name}/demonstrations/draw".encode()).hexdigest()[:8], 16)])
    by_answer: dict[int, list[int]] = {}
    for index in rng.permutation(len(rows)):
        by_answer.setdefault(task.answer_index(rows[index]["label"]), []).append(int(index))
    answers = [int(answer) for answer in rng.permutation(sorted(by_answer))]
    chosen: list[int] = []
    while len(chosen) < k:
        for answer in answers:
            if by_answer[answer] and len(chosen) < k:
                chosen.append(by_answer[answer].pop(0))
    chosen.sort(key=lambda index: (difficulty[index], index))
    return [{"text": rows[i]["text"], **({"aspect": rows[i]["aspect"]} if rows[i].get("aspect") else {}),
             "label": rows[i]["label"]} for i in chosen]


def main(cfg: RunConfig, *, k: int, out: Path, pool: int = 256, force: bool = False) -> Path:
    """Write `out`: the config's tasks, each with K drawn demonstrations (K = 0 removes them)."""
    if k < 0 or pool < max(k, 1):
        raise ConfigError(f"--k must be >= 0 and --pool >= k (got --k {k}, --pool {pool})")
    if out.exists() and not force:
        raise ConfigError(f"{out}: exists; pass --force to replace it")
    curriculum = cfg.experts.curriculum
    tasks = []
    for task in cfg.tasks:
        spec = task.model_dump(mode="json", exclude_unset=True)
        spec.pop("demonstrations", None)
        if k:
            splits = load_task_splits(task, data_root=cfg.data_root, cache_dir=cfg.resolved_cache_dir,
                                      seed=cfg.resolved_data_seed)
            spec["demonstrations"] = draw_demonstrations(task, splits, k, seed=cfg.resolved_data_seed, pool=pool,
                                                         signals=curriculum.signals,
                                                         label_polarity=curriculum.label_polarity)
            log.info("demonstrations %-12s %s", task.name, ", ".join(str(d["label"]) for d in spec["demonstrations"]))
        tasks.append(TaskSpec.model_validate(spec).model_dump(mode="json", exclude_unset=True))
    document = {"tasks": tasks, **({"data_root": str(Path(cfg.data_root).absolute())} if cfg.data_root else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {cfg.name}'s tasks with {k} demonstrations each (sentimerge demonstrations, data seed "
                   f"{cfg.resolved_data_seed}, pool {pool})\n" + yaml.safe_dump(document, sort_keys=False,
                                                                              allow_unicode=True), encoding="utf-8")
    log.info("demonstrations: wrote %s; set `tasks: %s` in a config to use them", out, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, required=True, help="demonstrations per task (0 removes them)")
    parser.add_argument("--out", type=Path, required=True, help="the tasks file to write")
    parser.add_argument("--pool", type=int, default=256, help="train rows per task whose difficulty is computed")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, k=args.k, out=args.out, pool=args.pool, force=args.force)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("demonstrations")
