"""Building blocks of expert training: the LoRA model, padded batches, the answer-only loss, the LR schedule and
the dev evaluation. `pipeline/experts.py` strings them together; stage 3 can reuse them.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from sentimerge.experts.config import ExpertsConfig, LoraSettings
from sentimerge.pipeline.core.metrics import compute_metrics
from sentimerge.pipeline.core.models import DTYPES, peft_quietly
from sentimerge.pipeline.core.prompts import training_example
from sentimerge.pipeline.core.scoring import last_positions, score_task
from sentimerge.pipeline.core.tasks import TaskSpec


def load_lora_model(base_path: str, lora: LoraSettings, *, dtype: str, device: torch.device, seed: int,
                    trust_remote_code: bool = False, adapter_names: tuple[str, ...] = ("default",)):
    """(peft model with a fresh, seeded LoRA adapter per name in `adapter_names`, all active, tokenizer) on the base
    model at `base_path`."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules=lora.target_modules, bias="none")
    torch.manual_seed(seed)
    model = peft_model(base, config, adapter_name=adapter_names[0])
    for name in adapter_names[1:]:  # several adapters (Hybrid LoRA's task modules): all active and trainable
        model.add_adapter(name, config)
    if len(adapter_names) > 1:
        model.base_model.set_adapter(list(adapter_names))
    model.to(device)
    return model, tokenizer


def peft_model(base, config, adapter_name: str = "default"):
    """peft's `get_peft_model`, without the deprecation warning it triggers in transformers 5 (peft calls
    `is_gradient_checkpointing`; nothing on our side to fix)."""
    from peft import get_peft_model

    with peft_quietly():
        return get_peft_model(base, config, adapter_name=adapter_name)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU or CUDA (model math in bf16; the LoRA weights and optimizer stay in float32)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def encode(tokenizer, task: TaskSpec, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; the loss falls on the answer and end-of-turn tokens only."""
    return [training_example(tokenizer, task, example) for example in examples]


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch: every sequence ends at the last column, so the answers sit in the last few positions."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        labels[row, width - len(ids):] = torch.tensor(targets)
        attention[row, width - len(ids):] = 1
    answer_width = int((labels != -100).float().cumsum(-1).gt(0).sum(-1).max())  # from the first answer token on
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "answer_width": answer_width}


def answer_loss(model, batch: dict, device: torch.device, *, use_autocast: bool) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens. Only the last positions' logits are computed (`logits_to_keep`)."""
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    keep = batch["answer_width"]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with autocast(device, use_autocast):
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                       logits_to_keep=last_positions(input_ids, keep + 1), use_cache=False).logits
    targets = batch["labels"][:, -keep:].to(device)
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100)


def learning_rate(step: int, cfg: ExpertsConfig) -> float:
    """The learning rate of 0-based `step`: linear warm-up, then cosine or linear decay to `min_lr_ratio`."""
    total = cfg.total_steps
    warmup = round(cfg.warmup * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.learning_rate
    progress = (step - warmup) / max(1, total - warmup - 1)
    shape = 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) if cfg.schedule == "cosine" else 1.0 - min(1.0, progress)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def scores_in_eval_mode(model, tokenizer, task: TaskSpec, examples: list[dict], device: torch.device, *,
                        use_autocast: bool, batch_size: int):
    """`score_task` with dropout off (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        with autocast(device, use_autocast):
            return score_task(model, tokenizer, task, examples, batch_size=batch_size)
    finally:
        model.train(was_training)


def evaluate_dev(model, tokenizer, task: TaskSpec, examples: list[dict], device: torch.device, *,
                 use_autocast: bool, batch_size: int) -> dict[str, float]:
    """The task's metrics on `examples`."""
    scores = scores_in_eval_mode(model, tokenizer, task, examples, device, use_autocast=use_autocast,
                                 batch_size=batch_size)
    return compute_metrics(task, [example["label"] for example in examples], scores.predictions)


def answer_losses(model, tokenizer, task: TaskSpec, examples: list[dict], device: torch.device, *,
                  use_autocast: bool, batch_size: int) -> np.ndarray:
    """Per example: -log p(gold answer), with p renormalised over the task's answers."""
    scores = scores_in_eval_mode(model, tokenizer, task, examples, device, use_autocast=use_autocast,
                                 batch_size=batch_size)
    gold = torch.tensor([task.answer_index(example["label"]) for example in examples])
    return (-torch.log_softmax(scores.logprobs, dim=-1).gather(1, gold[:, None]).squeeze(1)).numpy()
