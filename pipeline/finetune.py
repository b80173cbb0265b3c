"""Stage 3, `sentimerge finetune CONFIG`: multi-task LoRA fine-tuning of the merged model with dynamic task weights.

Every step's batch holds `per_task` examples of every task (experts/multitask.py states the sampling rule); the
loss is the weighting strategy's combination of the per-task losses (pipeline/weighting.py documents `dao` and
its peers), and the weights actually used are logged per step and plotted. Regression tasks train on the
cross-entropy of the answer level nearest to the gold score, so their loss is on the same scale as classification.
Writes `<run>/finetune/`: the adapter, metrics.jsonl, weights.csv and weights.png, the resolved config and a
manifest written last. An interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from sentimerge.experts.loop import Loop, run_loop
from sentimerge.experts.multitask import (TaskBalancedSampler, class_balance_weights, gradient_norms, per_example_losses,
                               task_losses, task_stats)
from sentimerge.experts.train import collate, evaluate_dev, learning_rate, load_lora_model
from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.data import sample_examples
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.models import pick_device
from sentimerge.pipeline.core.upstream import load_prepared, prepared_key, prepared_model_path
from sentimerge.pipeline.core.prompts import training_example
from sentimerge.pipeline.core.rundir import (RunDir, digest, is_done, read_jsonl, read_manifest, save_figure, write_csv_atomic,
                             write_manifest, write_text_atomic)
from sentimerge.pipeline.core.weighting import make_weighting

log = logging.getLogger("sentimerge.finetune")


def start_model_path(cfg: RunConfig, run: RunDir) -> str:
    """The model stage 3 starts from: stage 2's merged model (default) or the base model."""
    if cfg.finetune.start == "base":
        return prepared_model_path(run)
    if not is_done(run.search):
        raise SentimergeError(f"{run.search}: stage 2 has not finished; run `sentimerge search` first "
                              "(or set finetune.start: base)")
    return str(run.search_merged)


def upstream_key(cfg: RunConfig, run: RunDir) -> str | None:
    """What stage 3 hashes of the stages it reads from: stage 2's fingerprint (start: merged), else the prepared
    data's. Kept in the manifest: a finished stage 3 whose upstream changed is refused, not reported as done."""
    if cfg.finetune.start == "base":
        return prepared_key(run)
    if not run.search_state.is_file():
        return None
    return json.loads(run.search_state.read_text(encoding="utf-8"))["fingerprint"]


def fingerprint(cfg: RunConfig, start: str) -> str:
    decisive = {"finetune": cfg.finetune.decisive(), "seed": cfg.seed, "start": start,
                "tasks": [task.decisive() for task in cfg.tasks]}
    return digest(decisive)


def main(cfg: RunConfig, *, force: bool = False, before_step: Callable[[int], None] | None = None,
         folder: Path | None = None) -> dict:
    """Train (or resume, or skip when finished) stage 3 into `folder` (default: the run's `finetune/`)."""
    run = RunDir(cfg.resolved_run_dir, finetune=folder)
    settings = cfg.finetune
    seed = cfg.seed if settings.seed is None else settings.seed  # training; the dev sample stays the run's
    start = start_model_path(cfg, run)
    key = fingerprint(cfg, start)
    upstream = upstream_key(cfg, RunDir(cfg.resolved_run_dir))
    if is_done(run.finetune) and not force:
        manifest = read_manifest(run.finetune)
        if manifest.get("fingerprint") != key:
            raise SentimergeError(f"{run.finetune}: finished with another config; pass --force to train it again")
        if "upstream" in manifest and manifest["upstream"] != upstream:  # runs made before it was kept: no check
            raise SentimergeError(f"{run.finetune}: trained on another stage 2 merge or other prepared data; run "
                                  "`sentimerge finetune --force` to train it again")
        log.info("finetune: already done in %s", run.finetune)
        return read_manifest(run.finetune)
    if force or is_done(run.finetune):
        shutil.rmtree(run.finetune, ignore_errors=True)

    tasks = list(cfg.tasks)
    train = {task.name: load_prepared(run, task.name, "train") for task in tasks}
    dev = {task.name: _dev_sample(load_prepared(run, task.name, "dev"), settings.dev_examples, cfg.seed, task.name)
           for task in tasks}
    weighting = make_weighting(settings.weighting.name, task_stats(tasks, train), settings.weighting.options)
    names = [task.name for task in tasks]

    run.finetune.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.finetune_config, yaml.safe_dump(
        {"finetune": settings.model_dump(mode="json"), "start": start, "seed": seed, "fingerprint": key},
        sort_keys=False))
    device = pick_device(cfg.device)
    model, tokenizer = load_lora_model(start, settings.lora, dtype=cfg.base_model.dtype, device=device, seed=seed,
                                       trust_remote_code=cfg.base_model.trust_remote_code)
    encoded: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def encode(task_index: int, example_index: int):
        if (task_index, example_index) not in encoded:
            encoded[task_index, example_index] = training_example(tokenizer, tasks[task_index],
                                                                  train[names[task_index]][example_index])
        return encoded[task_index, example_index]

    balance = [torch.tensor(class_balance_weights(task, train[task.name]), dtype=torch.float32)
               if weighting.class_balance else torch.ones(len(train[task.name])) for task in tasks]
    sampler = TaskBalancedSampler([len(train[name]) for name in names], settings.per_task, seed)
    pending: dict = {}

    def step(step_index: int) -> dict:
        drawn = sampler.next_batch()
        batch = collate([encode(t, i) for t, i in drawn], tokenizer.pad_token_id)
        measure = weighting.needs_grad_norms and step_index % settings.weighting.grad_norm_every == 0
        capture = [] if measure else None
        losses = per_example_losses(model, batch, device, use_autocast=settings.autocast, capture=capture)
        task_index = torch.tensor([t for t, _ in drawn], device=losses.device)
        example_weights = torch.stack([balance[t][i] for t, i in drawn]).to(losses.device)
        per_task = task_losses(losses, task_index, example_weights, len(tasks))
        weights = weighting.weights()
        total = weighting.combine(per_task)
        pending["norms"] = gradient_norms(per_task, capture[0]) if measure else None
        total.backward()
        pending["losses"] = per_task.detach().float().cpu()
        return {"loss": round(total.item(), 5),
                "task_loss": {name: round(v, 5) for name, v in zip(names, pending["losses"].tolist())},
                "weights": {name: round(w, 5) for name, w in zip(names, weights.tolist())},
                **({"grad_norm": {n: round(v, 6) for n, v in zip(names, pending["norms"].tolist())}}
                   if pending["norms"] is not None else {})}

    def evaluate() -> dict:
        metrics = {task.name: evaluate_dev(model, tokenizer, task, dev[task.name], device,
                                           use_autocast=settings.autocast, batch_size=settings.eval_batch_size)
                   for task in tasks}
        return {"primary": float(np.mean([m["primary"] for m in metrics.values()])), "tasks": metrics}

    total_steps = settings.total_steps
    loop = Loop(
        name="finetune", total_steps=total_steps, checkpoint_dir=run.finetune_checkpoint,
        metrics_log=run.finetune_metrics, fingerprint=key, step=step,
        learning_rate=lambda s: learning_rate(s, settings), evaluate=evaluate,
        eval_steps={round(total_steps * k / settings.evaluations) for k in range(1, settings.evaluations + 1)},
        checkpoint_every=settings.checkpoint_every, keep=settings.keep, max_grad_norm=settings.max_grad_norm,
        after_step=lambda s: weighting.observe(pending["losses"], pending["norms"]),
        extra_state=lambda: {"sampler": sampler.state(), "weighting": weighting.state_dict()},
        load_extra_state=lambda extra: (sampler.load_state(extra["sampler"]), weighting.load_state_dict(extra["weighting"])),
        before_step=before_step or (lambda s: None),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    started = time.time()
    state = run_loop(loop, model, optimizer, device)

    from sentimerge.experts.checkpoint import save_adapter

    save_adapter(model, run.finetune_adapter)
    weights = write_weight_history(run)
    kept = state["kept"]
    write_manifest(run.finetune, stage="finetune", fingerprint=key, upstream=upstream, start=start,
                   weighting=settings.weighting.name,
                   steps=state["step"], examples=state["step"] * settings.per_task * len(tasks),
                   zero_shot=state["zero_shot"], dev=kept["dev"], kept_step=kept["step"],
                   final_weights=weights.iloc[-1].drop("step").to_dict() if len(weights) else {},
                   train_seconds=round(state["train_seconds"], 1), eval_seconds=round(state["eval_seconds"], 1),
                   seconds=round(time.time() - started, 1))
    shutil.rmtree(run.finetune_checkpoint, ignore_errors=True)
    log.info("finetune (%s): mean dev primary %.3f (start %.3f) -> %s", settings.weighting.name,
             kept["dev"]["primary"], state["zero_shot"]["primary"], run.finetune)
    return read_manifest(run.finetune)


def _dev_sample(examples: list[dict], limit: int | None, seed: int, task: str) -> list[dict]:
    if limit is None or len(examples) <= limit:
        return examples
    return sample_examples(examples, limit, seed, f"{task}/finetune/dev")


def write_weight_history(run: RunDir) -> pd.DataFrame:
    """weights.csv (step x task) and weights.png from the metrics log: the weights each step actually used."""
    rows = [{"step": row["step"], **row["weights"]} for row in read_jsonl(run.finetune_metrics) if "weights" in row]
    table = pd.DataFrame(rows)
    write_csv_atomic(run.finetune / "weights.csv", table)
    if len(table):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 3.5))
        for column in table.columns.drop("step"):
            axis.plot(table["step"], table[column], label=column)
        axis.set_xlabel("step")
        axis.set_ylabel("task weight (mean 1)")
        axis.legend(fontsize=7, ncol=2)
        save_figure(figure, run.finetune / "weights.png")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="train again even if stage 3 finished")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, force=args.force)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("finetune")
