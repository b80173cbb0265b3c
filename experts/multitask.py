"""Building blocks of multi-task fine-tuning (stage 3): task-balanced batches, per-task losses, gradient norms.

Sampling rule: every step takes `per_task` examples of every task, each task walking through its own seeded
shuffle of its training set (reshuffled with a new seed at the end of each pass). Every step therefore has a loss for
every task, and the task weights, not the sampling, decide each task's share of the gradient.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from sentimerge.experts.train import autocast
from sentimerge.pipeline.core.scoring import last_positions
from sentimerge.pipeline.core.tasks import TaskSpec
from sentimerge.pipeline.core.weighting import TaskStats, imbalance


class TaskBalancedSampler:
    """`per_task` example indices of each task per step, from per-task seeded shuffles; resumable via `state()`."""

    def __init__(self, sizes: list[int], per_task: int, seed: int):
        self.sizes, self.per_task, self.seed = sizes, per_task, seed
        self.passes = [0] * len(sizes)
        self.positions = [0] * len(sizes)

    def _order(self, task: int) -> np.ndarray:
        return np.random.default_rng([self.seed, task, self.passes[task]]).permutation(self.sizes[task])

    def next_batch(self) -> list[tuple[int, int]]:
        """(task index, example index) pairs, task by task."""
        drawn = []
        for task, size in enumerate(self.sizes):
            order = self._order(task)
            for _ in range(self.per_task):
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


def per_example_losses(model, batch: dict, device: torch.device, *, use_autocast: bool,
                       capture: list | None = None) -> torch.Tensor:
    """Mean cross-entropy over each example's answer tokens, shape [batch].

    With `capture`, the input of the output embedding (the last shared representation, at the answer positions) is
    appended to it so that per-task gradient norms can be taken there.
    """
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    keep = batch["answer_width"]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hook = None
    if capture is not None:
        hook = model.get_output_embeddings().register_forward_hook(lambda module, args, output: capture.append(args[0]))
    try:
        with autocast(device, use_autocast):
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                           logits_to_keep=last_positions(input_ids, keep + 1), use_cache=False).logits
    finally:
        if hook is not None:
            hook.remove()
    targets = batch["labels"][:, -keep:].to(device)
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                     ignore_index=-100, reduction="none")
    counted = (targets != -100).sum(-1).clamp(min=1)
    return token_losses.sum(-1) / counted


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
