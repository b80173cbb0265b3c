"""Hybrid LoRA (Beiranvand, Sarhadi, Salimi Sartakhti, "Hybrid fine-tuning of large language models using LoRA:
enhancing multi-task text classification through knowledge sharing", JECEI 13(2), 2025): task-specific LoRA modules
trained together on all tasks, with an attention mechanism over the task modules' outputs, so that every input can
draw on every task's knowledge.

How it is built here. peft holds one LoRA adapter per task on every target layer, all active at once. Each such layer
gets a router: for an input of task t, token by token,

    alpha(x) = softmax( (x W_q) keys^T / sqrt(d) + prior[t] )        shape [batch, tokens, tasks]
    y = W x + sum_k alpha_k(x) * scale * B_k A_k x

`W_q` [in, d] and `keys` [tasks, d] are learned (keys start at zero: the attention starts at the prior); `prior` is
a learned [tasks, tasks] table of logits that starts at `own_bias` on its diagonal, so that module k starts as task
k's own module and the attention learns how much each task draws on the others. Forward hooks do the weighting
(a pre-hook on each LoRA layer computes alpha from its input; a hook on each task's `lora_B` scales its output), so
peft's own LoRA layers, initialisation and adapter files stay as they are.

How it becomes one checkpoint. The task modules are saved as ordinary per-task adapters (the experts of stage 2).
The attention, averaged over each task's examples and summed over tasks, gives per layer and module the weight with
which the tasks used that module on average: `c[k, layer, part] = sum_t mean_{x in task t} alpha_k(x)` (parts:
attention and MLP projections). Merged with these coefficients, the model applies to every input what the tasks
applied on average; it is stage 2's start point (`search.init: hybrid`), from which CMA-ES searches on the weak set.
The sum (not the mean) over tasks keeps each module at the scale it trained at: a task's own module carries about
alpha_own of its output in training and about the same in the merge.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from torch import nn

from sentimerge.merge.genome import Genome

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


class TaskRouter(nn.Module):
    """The attention of one LoRA layer over its task modules: weights [batch, tokens, tasks] per input token."""

    def __init__(self, in_features: int, tasks: int, dim: int, own_bias: float):
        super().__init__()
        self.query = nn.Linear(in_features, dim, bias=False)
        self.keys = nn.Parameter(torch.zeros(tasks, dim))
        self.prior = nn.Parameter(own_bias * torch.eye(tasks))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """x [batch, tokens, in]; task [batch] (the input's task index): attention weights [batch, tokens, tasks]."""
        logits = (self.query(x.to(self.query.weight.dtype)) @ self.keys.T).float() * self.scale
        return torch.softmax(logits + self.prior[task].float()[:, None, :], dim=-1)


class HybridRouting(nn.Module):
    """The routers of a peft model holding one LoRA adapter per task (all active), and the hooks that weigh each task
    module's output by its attention weight. Registered as a submodule of the model, so its parameters train, are
    checkpointed and resume with the adapters'.

    Before each forward, `set_task(task)` gives the batch's task indices ([batch] tensor, or one int for a batch of
    one task). With `start_recording()`, the attention weights of the real tokens (`token_mask`) are summed per
    layer, input task and module until `stop_recording()` returns their means."""

    def __init__(self, model: nn.Module, tasks: list[str], *, dim: int, own_bias: float):
        super().__init__()
        from peft.tuners.lora import LoraLayer

        self.tasks = list(tasks)
        self.routers = nn.ModuleDict()
        self.layer_names: dict[str, str] = {}
        self._task: torch.Tensor | None = None
        self._alpha: dict[str, torch.Tensor] = {}
        self._handles = []
        self.token_mask: torch.Tensor | None = None
        self._sums: dict[str, torch.Tensor] | None = None
        self._counts: torch.Tensor | None = None
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or not all(task in module.lora_A for task in self.tasks):
                continue
            key = name.replace(".", "/")  # ModuleDict keys cannot hold dots
            weight = module.lora_A[self.tasks[0]].weight
            self.routers[key] = TaskRouter(module.in_features, len(self.tasks), dim, own_bias).to(weight.device)
            self.layer_names[key] = name
            self._handles.append(module.register_forward_pre_hook(partial(self._route, key)))
            for index, task in enumerate(self.tasks):
                self._handles.append(module.lora_B[task].register_forward_hook(partial(self._weigh, key, index)))
        if not self.routers:
            raise ValueError("no LoRA layer holds an adapter for every task")

    def set_task(self, task: torch.Tensor | int) -> None:
        self._task = torch.as_tensor(task).reshape(-1)

    def _route(self, key: str, module: nn.Module, args: tuple) -> None:
        x = args[0]
        task = self._task.to(x.device) if self._task is not None else None
        if task is None:
            raise RuntimeError("HybridRouting: set_task() before the forward")
        if task.numel() == 1 and x.shape[0] != 1:
            task = task.expand(x.shape[0])
        alpha = self.routers[key](x, task)
        self._alpha[key] = alpha
        if self._sums is not None:
            self._record(key, alpha, task)

    def _weigh(self, key: str, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self._alpha[key][..., index:index + 1].to(output.dtype)

    def _record(self, key: str, alpha: torch.Tensor, task: torch.Tensor) -> None:
        mask = self.token_mask.to(alpha.device, alpha.dtype) if self.token_mask is not None else \
            torch.ones(alpha.shape[:2], device=alpha.device)
        per_example = (alpha.detach() * mask[..., None]).sum(1)          # [batch, tasks]
        sums = self._sums.setdefault(key, torch.zeros(len(self.tasks), len(self.tasks)))
        sums.index_add_(0, task.cpu(), per_example.float().cpu())
        if key == next(iter(self.routers)):  # count tokens once per forward
            self._counts.index_add_(0, task.cpu(), mask.sum(1).float().cpu())

    def start_recording(self) -> None:
        self._sums, self._counts = {}, torch.zeros(len(self.tasks))

    def stop_recording(self) -> dict[str, np.ndarray]:
        """Per LoRA layer (its module name): mean attention [input task, module] over the recorded tokens."""
        sums, counts = self._sums, self._counts.clamp(min=1)
        self._sums = self._counts = None
        return {self.layer_names[key]: (value / counts[:, None]).numpy() for key, value in sums.items()}

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def load_hybrid_model(base_path: str, tasks: list[str], lora, *, dim: int, own_bias: float, dtype: str,
                      device: torch.device, seed: int, trust_remote_code: bool = False):
    """(peft model with one seeded LoRA adapter per task, all active and trainable, and its `HybridRouting` as the
    submodule `hybrid_routing`; tokenizer)."""
    from sentimerge.experts.train import load_lora_model

    model, tokenizer = load_lora_model(base_path, lora, dtype=dtype, device=device, seed=seed,
                                       trust_remote_code=trust_remote_code, adapter_names=tuple(tasks))
    routing = HybridRouting(model, tasks, dim=dim, own_bias=own_bias)
    model.add_module("hybrid_routing", routing)
    return model, tokenizer


def layer_coefficients(attention: dict[str, np.ndarray], tasks: list[str], num_layers: int) -> np.ndarray:
    """Stage 2's per-layer coefficients from the recorded attention: [modules (tasks), layers, parts (attention,
    MLP)], each `sum_t mean alpha_k` over the layer's LoRA layers of that part (module docstring)."""
    totals = np.zeros((len(tasks), num_layers, 2))
    counts = np.zeros((num_layers, 2))
    for name, mean in attention.items():
        layer = next(int(part) for part in name.split(".") if part.isdigit())
        part = 0 if name.rsplit(".", 1)[-1] in ATTENTION_MODULES else 1
        totals[:, layer, part] += mean.sum(axis=0)  # summed over input tasks: [modules]
        counts[layer, part] += 1
    filled = counts > 0
    totals[:, filled] /= counts[filled]
    for layer, part in zip(*np.where(~filled)):  # a part without LoRA layers: the other part's value
        totals[:, layer, part] = totals[:, layer, 1 - part]
    return totals


def genome_coefficients(coefficients: np.ndarray, genome: Genome, bounds: tuple[float, float]) -> np.ndarray:
    """`layer_coefficients` [experts, layers, 2] averaged into the genome's layer groups (and parts, unless attention
    and MLP are searched apart), clipped to the search's bounds: a flat genome vector."""
    experts, layers, _ = coefficients.shape
    if experts != len(genome.experts) or layers != genome.num_layers:
        raise ValueError(f"coefficients for {experts} experts x {layers} layers, genome {genome.experts} x "
                         f"{genome.num_layers}")
    grid = np.zeros((experts, genome.groups, len(genome.parts)))
    for group in range(genome.groups):
        rows = coefficients[:, group * genome.group_size:(group + 1) * genome.group_size]
        if genome.split_attention_mlp:
            grid[:, group] = rows.mean(axis=1)
        else:
            grid[:, group, 0] = rows.mean(axis=(1, 2))
    return np.clip(grid.reshape(-1), *bounds)


@torch.no_grad()
def record_attention(model, tokenizer, routing: HybridRouting, tasks: list, examples: dict[str, list[dict]],
                     device: torch.device, *, batch_size: int = 16, use_autocast: bool = True) -> dict[str, np.ndarray]:
    """Mean attention per LoRA layer [input task, module] over the real tokens of each task's `examples` (prompt
    and answer, as in training)."""
    from sentimerge.experts.train import autocast, collate
    from sentimerge.pipeline.core.prompts import training_example

    model.eval()
    routing.start_recording()
    try:
        for index, task in enumerate(tasks):
            rows = [training_example(tokenizer, task, example) for example in examples[task.name]]
            for first in range(0, len(rows), batch_size):
                batch = collate(rows[first:first + batch_size], tokenizer.pad_token_id)
                attention = batch["attention_mask"].to(device)
                routing.set_task(index)
                routing.token_mask = attention
                with autocast(device, use_autocast):
                    model(input_ids=batch["input_ids"].to(device), attention_mask=attention,
                          position_ids=(attention.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    finally:
        routing.token_mask = None
        means = routing.stop_recording()
    return means
