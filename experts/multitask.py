"""Building blocks of multi-task fine-tuning (stage 3): task-balanced batches, per-task losses, gradient norms.

Sampling rule: every step takes `per_task` examples of every task, each task walking through its own seeded
shuffle of its training set (reshuffled with a new seed at the end of each pass). Every step therefore has a loss for
every task, and the task weights, not the sampling, decide each task's share of the gradient.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import yaml

from sentimerge.curriculum.config import TaskPacingConfig
from sentimerge.curriculum.pacing import batch_counts, competence, task_shares
from sentimerge.experts.checkpoint import save_adapter
from sentimerge.experts.distill import ExpertTeachers, distillation_losses, teacher_share
from sentimerge.experts.losses import REGRESSION_LOSSES, Levels, expected_squared_error
from sentimerge.experts.loop import Loop, run_loop
from sentimerge.experts.train import answer_logits, collate, evaluate_dev, learning_rate, load_lora_model
from sentimerge.pipeline.core.config import DistillSettings, FinetuneConfig, RunConfig, WeightingSettings
from sentimerge.pipeline.core.data import sample_examples
from sentimerge.pipeline.core.errors import ConfigError, ModelError
from sentimerge.pipeline.core.models import pick_device
from sentimerge.pipeline.core.prompts import answer_tokens, training_example
from sentimerge.pipeline.core.rundir import (
    RunDir,
    read_jsonl,
    read_manifest,
    save_figure,
    write_csv_atomic,
    write_manifest,
    write_text_atomic,
)
from sentimerge.pipeline.core.tasks import TaskSpec
from sentimerge.pipeline.core.upstream import load_prepared
from sentimerge.pipeline.core.weighting import TaskStats, imbalance, make_weighting


class TaskBalancedSampler:
    """`per_task` example indices of each task per step, from per-task seeded shuffles; resumable via `state()`."""

    def __init__(self, sizes: list[int], per_task: int, seed: int):
        self.sizes, self.per_task, self.seed = sizes, per_task, seed
        self.passes = [0] * len(sizes)
        self.positions = [0] * len(sizes)

    def _order(self, task: int) -> np.ndarray:
        return np.random.default_rng([self.seed, task, self.passes[task]]).permutation(self.sizes[task])

    def next_batch(self, counts: list[int] | None = None) -> list[tuple[int, int]]:
        """(task index, example index) pairs, task by task: `per_task` of every task, or `counts[task]` (a task
        pacing's batch, `curriculum.pacing.batch_counts`)."""
        drawn = []
        for task, size in enumerate(self.sizes):
            order = self._order(task)
            for _ in range(self.per_task if counts is None else counts[task]):
                if self.positions[task] >= size:
                    self.passes[task] += 1
                    self.positions[task] = 0
                    order = self._order(task)
                drawn.append((task, int(order[self.positions[task]])))
                self.positions[task] += 1
        return drawn

    def state(self) -> dict:
        return {"passes": list(self.passes), "positions": list(self.positions)}

    def load_state(self, state: dict) -> None:
        self.passes, self.positions = list(state["passes"]), list(state["positions"])


def task_stats(tasks: list[TaskSpec], train: dict[str, list[dict]]) -> TaskStats:
    """Training sizes and class imbalance (regression: imbalance of the answer levels the labels map to)."""
    imbalances = []
    for task in tasks:
        counts = Counter(task.answer_index(example["label"]) for example in train[task.name])
        imbalances.append(imbalance([counts.get(i, 0) for i in range(len(task.answers))]))
    return TaskStats(tuple(t.name for t in tasks), tuple(len(train[t.name]) for t in tasks), tuple(imbalances))


def class_balance_weights(task: TaskSpec, examples: list[dict]) -> np.ndarray:
    """Per example: inverse frequency of its answer in the task's training set, normalised to mean 1."""
    answers = [task.answer_index(example["label"]) for example in examples]
    counts = Counter(answers)
    weights = np.array([len(answers) / (len(counts) * counts[a]) for a in answers], dtype=np.float64)
    return weights / weights.mean()


@dataclass
class Distillation:
    """A batch's distillation target (`finetune.distill`): the teachers' logits [B, answer_width, vocab] aligned with
    it (`ExpertTeachers.batch_logits`), the teacher's share and the temperature; `per_example_losses` records the
    batch's mean KL term in `kl` (for the metrics log)."""

    logits: torch.Tensor
    share: float
    temperature: float
    kl: float | None = None


@dataclass(frozen=True)
class RegressionRows:
    """The regression rows of a batch for a regression loss other than `level_ce` (`experts/losses.py`): row
    indices [R], gold scores [R], each row's levels, the loss's name and its MSE weight."""

    rows: list[int]
    gold: torch.Tensor
    levels: list[Levels]
    loss: str
    mse_weight: float


def per_example_losses(model, batch: dict, device: torch.device, *, use_autocast: bool,
                       capture: list | None = None, regression: RegressionRows | None = None,
                       distill: Distillation | None = None) -> torch.Tensor:
    """Mean cross-entropy over each example's answer tokens of a `collate` batch, shape [batch]; with `distill`,
    (1 - share) x that cross-entropy + share x the distillation term (`experts.distill.distillation_losses`); with
    `regression`, its rows' losses are the named regression loss of that (mixed) loss and the squared error of the
    expected level value (read at the position that predicts the row's first answer token).

    With `capture`, the input of the output embedding (the last shared representation, at the answer positions) is
    appended to it so that per-task gradient norms can be taken there.
    """
    logits = answer_logits(model, batch, device, use_autocast=use_autocast, capture=capture)
    targets = batch["labels"][:, -batch["answer_width"]:].to(device)
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                     ignore_index=-100, reduction="none")
    counted = (targets != -100).sum(-1).clamp(min=1)
    losses = token_losses.sum(-1) / counted
    if distill is not None:
        kl = distillation_losses(logits[:, :-1], distill.logits, targets, distill.temperature)
        distill.kl = float(kl.detach().mean())
        losses = (1 - distill.share) * losses + distill.share * kl
    if regression is None or not regression.rows:
        return losses
    rows = torch.tensor(regression.rows, device=device)
    first = (targets[rows] != -100).float().argmax(-1)  # each row's first answer token, predicted at that column
    first_logits = logits[rows, first]
    errors = torch.stack([expected_squared_error(first_logits[j:j + 1], levels, regression.gold[j:j + 1])[0]
                          for j, levels in enumerate(regression.levels)])
    combine = REGRESSION_LOSSES.get(regression.loss)
    return losses.index_put((rows,), combine(losses[rows], errors, regression.mse_weight))


def regression_levels(tokenizer, task: TaskSpec) -> Levels:
    """The levels of a regression task for `expected_mse`. Raises ModelError when a level's answer is more than one
    token (its probability would need a forward per level)."""
    tokens = answer_tokens(tokenizer, task).answers
    longer = [task.answers[i] for i, ids in enumerate(tokens) if len(ids) != 1]
    if longer:
        raise ModelError(f"task {task.name}: finetune.regression_loss expected_mse needs one-token level answers; "
                         f"{longer[0]!r} is {len(tokens[task.answers.index(longer[0])])} tokens")
    return Levels(torch.tensor([ids[0] for ids in tokens]), torch.tensor(task.level_values, dtype=torch.float32))


def task_losses(example_losses: torch.Tensor, task_of_example: torch.Tensor, example_weights: torch.Tensor,
                k: int) -> torch.Tensor:
    """Weighted mean loss of each task's examples in the batch, shape [k]."""
    weighted = torch.zeros(k, device=example_losses.device).index_add(0, task_of_example, example_losses * example_weights)
    totals = torch.zeros(k, device=example_losses.device).index_add(0, task_of_example, example_weights)
    return weighted / totals.clamp(min=1e-8)


def gradient_norms(losses: torch.Tensor, representation: torch.Tensor) -> torch.Tensor:
    """||d L_k / d h|| for each task loss at the shared representation h (the graph is kept for backward)."""
    norms = []
    for k in range(len(losses)):
        (gradient,) = torch.autograd.grad(losses[k], representation, retain_graph=True, allow_unused=True)
        norms.append(torch.zeros(()) if gradient is None else gradient.float().norm().detach().cpu())
    return torch.stack(norms)


def pacing_schedule(settings: FinetuneConfig, order: list[str], names: list[str]) -> Callable[[int], list[int] | None]:
    """step (0-based) -> examples of each task (in `names` order) in that step's batch under `settings.task_pacing`
    tasks ranked by `order` (easiest first); None every step when the pacing is `none`. The
    counts add up to `per_task` x tasks at every step."""
    pacing, k = settings.task_pacing, len(names)
    if pacing.pacing == "none":
        return lambda step: None
    if sorted(order) != sorted(names):
        raise ConfigError(f"finetune.task_pacing: the task order {order} does not list the tasks {names}")
    rank = [order.index(name) for name in names]

    def counts(step: int) -> list[int]:
        level = competence(pacing.pacing, step, settings.total_steps, start=max(pacing.start, 1.0 / k),
                           full_at=pacing.full_at)
        by_rank = batch_counts(task_shares(level, k), settings.per_task * k)
        return [by_rank[rank[i]] for i in range(k)]

    return counts


def fill_absent(values: torch.Tensor, present: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """`values` [k] where `present`, else the task's `carried` value (its last observed one; before the first, the
    mean of the present values), detached: a task the pacing left out of a batch adds no gradient and keeps the
    weighting's view of it unchanged."""
    stand_in = torch.where(torch.isnan(carried), values.detach()[present].mean(), carried).to(values.dtype)
    return torch.where(present, values, stand_in.to(values.device))


def train_multitask(cfg: RunConfig, run: RunDir, *, start: str, fingerprint: str, seed: int,
                    task_order: list[str] | None = None,
                    before_step: Callable[[int], None] | None = None, manifest: dict | None = None,
                    build_model: Callable[[], tuple] | None = None,
                    set_task: Callable[[torch.Tensor | int], None] | None = None,
                    after_training: Callable[[object, object], None] | None = None,
                    evaluate_start: bool = True, teachers: ExpertTeachers | None = None,
                    name: str = "finetune") -> dict:
    """Multi-task LoRA training with `cfg.finetune`'s settings from the checkpoint `start` into `run.finetune` (a
    folder of its own: `RunDir(root, finetune=folder)`), resuming from its last checkpoint; returns its manifest.

    Stage 3 trains the merged model with it; stage 1 trains the shared adapter (`experts.shared`) with it; the
    report trains the multi-task LoRA baseline with it. Every step has `per_task` examples of every task
    (`TaskBalancedSampler`); the weighting strategy combines the task losses. Writes the adapter (peft format),
    metrics.jsonl, weights.csv/png, config.yaml, and DONE.json last with `manifest`'s entries and the counts:
    optimizer `steps` and training `examples` (steps x per_task x tasks).

    Hybrid LoRA (`experts.hybrid`) trains with it too: `build_model()` gives its (model, tokenizer) instead of one
    fresh LoRA on `start`, `set_task` gets each forward's task indices (the batch's, or the evaluated task's), and
    `after_training(model, tokenizer)` writes what else the folder holds before the manifest is written.

    With `finetune.task_pacing` on, `task_order` (task names, easiest first) sets when each task enters the batches
    (`pacing_schedule`); a task left out of a step's batch keeps its last loss and gradient norm (`fill_absent`).

    With `evaluate_start` off, nothing is evaluated before the first step and the manifest's `zero_shot` is None
    (the shared adapter: its start is the base model, which the report scores anyway).

    With `teachers` (the task experts, `finetune.distill.weight` > 0), every example's loss also learns from its
    task's expert (`Distillation`); each step logs the teacher's share and the batch's mean KL term.

    `name` labels the progress bar and the log lines (`shared adapter`, `hybrid experts`: not stage 3's `finetune`)."""
    settings = cfg.finetune
    tasks = list(cfg.tasks)
    unlabelled = [task.name for task in tasks if task.source.unlabelled_train]
    if unlabelled:
        raise ConfigError(f"task {unlabelled[0]}: its train split is unlabelled (source.unlabelled_train), and "
                          "multi-task training needs labels: this config merges given experts only (`sentimerge "
                          "search` writes the merged model)")
    train = {task.name: load_prepared(run, task.name, "train") for task in tasks}
    dev = {task.name: _dev_sample(load_prepared(run, task.name, "dev"), settings.dev_examples, cfg.resolved_data_seed,
                                  task.name)
           for task in tasks}
    weighting = make_weighting(settings.weighting.name, task_stats(tasks, train), settings.weighting.options)
    names = [task.name for task in tasks]

    run.finetune.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.finetune_config, yaml.safe_dump(
        {"finetune": settings.model_dump(mode="json"), "start": start, "seed": seed, "fingerprint": fingerprint},
        sort_keys=False))
    device = pick_device(cfg.device)
    if build_model is not None:
        model, tokenizer = build_model()
    else:
        model, tokenizer = load_lora_model(start, settings.lora, dtype=cfg.base_model.dtype, device=device,
                                           seed=seed, trust_remote_code=cfg.base_model.trust_remote_code)
    encoded: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def encode(task_index: int, example_index: int):
        if (task_index, example_index) not in encoded:
            encoded[task_index, example_index] = training_example(tokenizer, tasks[task_index],
                                                                  train[names[task_index]][example_index])
        return encoded[task_index, example_index]

    levels = {index: regression_levels(tokenizer, task) for index, task in enumerate(tasks)
              if task.kind == "regression" and settings.regression_loss != "level_ce"}
    balance = [torch.tensor(class_balance_weights(task, train[task.name]), dtype=torch.float32)
               if weighting.class_balance else torch.ones(len(train[task.name])) for task in tasks]
    sampler = TaskBalancedSampler([len(train[name]) for name in names], settings.per_task, seed)
    pending: dict = {}
    counts_at = pacing_schedule(settings, task_order or names, names)
    carried = {"loss": torch.full((len(tasks),), float("nan")), "norm": torch.full((len(tasks),), float("nan"))}

    def step(step_index: int) -> dict:
        counts = counts_at(step_index)
        drawn = sampler.next_batch(counts)
        present = None if counts is None or min(counts) > 0 else torch.tensor([count > 0 for count in counts])
        # the tasks' common prefix (system turn) once per batch; Hybrid LoRA routes every row by its own task
        batch = collate([encode(t, i) for t, i in drawn], tokenizer.pad_token_id, share_prefix=set_task is None)
        if set_task is not None:
            set_task(torch.tensor([t for t, _ in drawn]))
        measure = weighting.needs_grad_norms and step_index % settings.weighting.grad_norm_every == 0
        capture = [] if measure else None
        distill = None
        share = teacher_share(settings.distill, step_index, settings.total_steps) if teachers is not None else 0.0
        if share > 0:
            encoded_rows = [encode(t, i) for t, i in drawn]
            distill = Distillation(teachers.batch_logits([names[t] for t, _ in drawn], encoded_rows,
                                                         tokenizer.pad_token_id,
                                                         batch["answer_width"], use_autocast=settings.autocast),
                                   share, settings.distill.temperature)
        regression = None
        if settings.regression_loss != "level_ce":
            rows = [row for row, (t, _) in enumerate(drawn) if t in levels]
            regression = RegressionRows(rows, torch.tensor([float(train[names[drawn[row][0]]][drawn[row][1]]["label"])
                                                            for row in rows]),
                                        [levels[drawn[row][0]] for row in rows], settings.regression_loss,
                                        settings.mse_weight)
        losses = per_example_losses(model, batch, device, use_autocast=settings.autocast, capture=capture,
                                    regression=regression, distill=distill)
        task_index = torch.tensor([t for t, _ in drawn], device=losses.device)
        example_weights = torch.stack([balance[t][i] for t, i in drawn]).to(losses.device)
        per_task = task_losses(losses, task_index, example_weights, len(tasks))
        if present is not None:
            per_task = fill_absent(per_task, present.to(per_task.device), carried["loss"])
        weights = weighting.weights()
        total = weighting.combine(per_task)
        pending["norms"] = gradient_norms(per_task, capture[0]) if measure else None
        if present is not None and pending["norms"] is not None:
            pending["norms"] = fill_absent(pending["norms"], present, carried["norm"])
        total.backward()
        pending["losses"] = per_task.detach().float().cpu()
        if weighting.needs_losses_after_step:  # re-scored after the optimizer step (`after_step`)
            pending.update(batch=batch, regression=regression, distill=distill, task_index=task_index,
                           example_weights=example_weights, present=present)
        if counts is not None:
            carried["loss"] = pending["losses"].clone()
            if pending["norms"] is not None:
                carried["norm"] = pending["norms"].clone()
        return {"loss": round(total.item(), 5),
                **({"batch_tasks": dict(zip(names, counts))} if counts is not None else {}),
                **({"teacher_share": round(share, 5), "distill_kl": round(distill.kl, 5)}
                   if distill is not None else {}),
                "task_loss": {name: round(v, 5) for name, v in zip(names, pending["losses"].tolist())},
                "weights": {name: round(w, 5) for name, w in zip(names, weights.tolist())},
                **({"grad_norm": {n: round(v, 6) for n, v in zip(names, pending["norms"].tolist())}}
                   if pending["norms"] is not None else {})}

    def evaluate_task(index: int, task) -> dict:
        if set_task is not None:
            set_task(index)
        return evaluate_dev(model, tokenizer, task, dev[task.name], device, use_autocast=settings.autocast,
                            batch_size=settings.eval_batch_size)

    def evaluate() -> dict:
        metrics = {task.name: evaluate_task(index, task) for index, task in enumerate(tasks)}
        return {"primary": float(np.mean([m["primary"] for m in metrics.values()])), "tasks": metrics}

    def after_step(step_index: int) -> None:
        weighting.observe(pending["losses"], pending["norms"])
        if weighting.needs_losses_after_step:
            with torch.no_grad():
                losses = per_example_losses(model, pending["batch"], device, use_autocast=settings.autocast,
                                            regression=pending["regression"], distill=pending["distill"])
                after = task_losses(losses, pending["task_index"], pending["example_weights"], len(tasks)).float().cpu()
            if pending["present"] is not None:  # a task not in the batch: no change
                after = fill_absent(after, pending["present"], pending["losses"])
            weighting.observe_same_batch(pending["losses"], after)

    total_steps = settings.total_steps
    loop = Loop(
        name=name, total_steps=total_steps, checkpoint_dir=run.finetune_checkpoint,
        metrics_log=run.finetune_metrics, fingerprint=fingerprint, step=step,
        learning_rate=lambda s: learning_rate(s, settings), evaluate=evaluate,
        eval_steps={round(total_steps * k / settings.evaluations) for k in range(1, settings.evaluations + 1)},
        checkpoint_every=settings.checkpoint_every, keep=settings.keep, max_grad_norm=settings.max_grad_norm,
        after_step=after_step,
        extra_state=lambda: {"sampler": sampler.state(), "weighting": weighting.state_dict(),
                             "carried": {key: value.tolist() for key, value in carried.items()}},
        load_extra_state=lambda extra: (sampler.load_state(extra["sampler"]), weighting.load_state_dict(extra["weighting"]),
                                        carried.update({key: torch.tensor(value) for key, value
                                                        in extra.get("carried", {}).items()})),
        before_step=before_step or (lambda s: None), evaluate_start=evaluate_start,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    started = time.time()
    state = run_loop(loop, model, optimizer, device)
    save_adapter(model, run.finetune_adapter)
    if after_training is not None:
        after_training(model, tokenizer)
    weights = write_weight_history(run)
    kept = state["kept"]
    write_manifest(run.finetune, **(manifest or {}), fingerprint=fingerprint, start=start,
                   weighting=settings.weighting.name,
                   steps=state["step"], examples=state["step"] * settings.per_task * len(tasks),
                   zero_shot=state["zero_shot"], dev=kept["dev"], kept_step=kept["step"],
                   final_weights=weights.iloc[-1].drop("step").to_dict() if len(weights) else {},
                   train_seconds=round(state["train_seconds"], 1), eval_seconds=round(state["eval_seconds"], 1),
                   seconds=round(time.time() - started, 1))
    shutil.rmtree(run.finetune_checkpoint, ignore_errors=True)
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


def multitask_lora_config(cfg: RunConfig, steps: int, per_task: int | None = None) -> RunConfig:
    """`cfg` with a `finetune` section that trains one multi-task LoRA from the base model the way an expert trains:
    the experts' LoRA (rank, alpha, targets), a fresh one (`init: fresh`, whatever stage 3's), and learning rate, equal
    task weights, no task pacing, no distillation, `steps` optimizer steps of `per_task` examples of every task
    (default: stage 3's). The report's multi-task LoRA baseline and the shared adapter (`experts.shared`) train with
    it, so the two differ only in their budgets."""
    update = {"start": "base", "init": "fresh", "weighting": WeightingSettings(name="static"), "lora": cfg.experts.lora,
              "distill": DistillSettings(),
              "learning_rate": cfg.experts.learning_rate, "steps": steps, "task_pacing": TaskPacingConfig()}
    if per_task is not None:
        update["per_task"] = per_task
    return cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update=update)})
