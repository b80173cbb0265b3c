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
from sentimerge.pipeline.core.models import DTYPES, attention_kwargs, peft_quietly
from sentimerge.pipeline.core.prompts import training_example
from sentimerge.pipeline.core.scoring import (
    cache_keyword,
    last_positions,
    left_padded,
    returned_cache,
    score_task,
)
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
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                **attention_kwargs(device))
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


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool, model=None):
    """bf16 autocast on CPU or CUDA (model math in bf16; the LoRA weights and optimizer stay in float32).

    With `model` (a peft model), its LoRA layers also stop casting their input to the adapter's float32 dtype
    (peft's `disable_input_dtype_casting`): under autocast the LoRA matmuls run in bf16 anyway, so the cast to
    float32 and autocast's cast back were two copies of every adapted layer's input, forward and backward, for the
    same bits (losses and gradients identical to the last bit; a multi-task step of SmolLM2-135M 4-14% faster on 2
    CPU cores)."""
    if not enabled:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast(device.type, dtype=torch.bfloat16), \
            disable_input_dtype_casting(model, active=model is not None):
        yield


def encode(tokenizer, task: TaskSpec, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; the loss falls on the answer and end-of-turn tokens only."""
    return [training_example(tokenizer, task, example) for example in examples]


MIN_SHARED_PREFIX = 8  # tokens: a shorter common prefix is not worth its own forward
# Tokens a shared prefix must save (prefix x (rows - 1)) to be computed once: its own forward and backward cost a
# pass through every layer. Measured on SmolLM2-135M, 2 CPU cores (2026-12-02): a multi-task batch of 6 rows sharing
# only the 15-token system turn (75 saved) stepped in 0.97-1.10 s shared against 0.85-0.93 s not; a one-task batch
# of 6 sharing 41 tokens (205 saved) was level (0.69-0.73 s both ways).
MIN_SAVED_TOKENS = 128


def shared_prefix_length(encoded: list[tuple[list[int], list[int]]]) -> int:
    """Tokens every sequence of a batch starts with (system turn, instruction, answer list), stopping one token
    before the earliest answer token, so that every logit the loss needs comes from the rows' own part; 0 when
    shorter than `MIN_SHARED_PREFIX`."""
    first_answer = min(next((i for i, t in enumerate(targets) if t != -100), len(targets)) for _, targets in encoded)
    limit = min(first_answer - 1, *(len(ids) - 1 for ids, _ in encoded))
    reference = encoded[0][0]
    length = 0
    while length < limit and all(ids[length] == reference[length] for ids, _ in encoded):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, *,
            share_prefix: bool = False, min_saved_tokens: int = MIN_SAVED_TOKENS) -> dict[str, torch.Tensor]:
    """Left-padded batch: every sequence ends at the last column, so the answers sit in the last few positions.

    With `share_prefix`, the tokens all sequences start with (`shared_prefix_length`) go to `prefix_ids` [P] and
    the rows hold only what follows, left-padded; `answer_logits` then computes the prefix once per batch (an exact
    rewrite: the same loss and gradients, with P x (batch - 1) fewer positions through the model) when that saves at
    least `min_saved_tokens` positions (`MIN_SAVED_TOKENS`; below it the prefix's own pass costs more than it saves).
    `prefix_ids` is None otherwise."""
    prefix = shared_prefix_length(encoded) if share_prefix and len(encoded) > 1 else 0
    if prefix * (len(encoded) - 1) < min_saved_tokens:
        prefix = 0
    width = max(len(ids) for ids, _ in encoded) - prefix
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(encoded):
        input_ids[row, width - len(ids) + prefix:] = torch.tensor(ids[prefix:])
        labels[row, width - len(ids) + prefix:] = torch.tensor(targets[prefix:])
        attention[row, width - len(ids) + prefix:] = 1
    answer_width = int((labels != -100).float().cumsum(-1).gt(0).sum(-1).max())  # from the first answer token on
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "answer_width": answer_width,
            "prefix_ids": torch.tensor(encoded[0][0][:prefix]) if prefix else None}


def answer_logits(model, batch: dict, device: torch.device, *, use_autocast: bool,
                  capture: list | None = None, forward_kwargs: dict | None = None) -> torch.Tensor:
    """Logits [batch, answer_width + 1, vocab] of the last positions of a `collate` batch: those whose next token is
    an answer or end-of-turn token (`labels[:, -answer_width:]`), plus one.

    Only those positions reach the LM head (`logits_to_keep`). A batch with `prefix_ids` computes the shared prefix
    once (batch 1), repeats its KV cache over the rows, and runs the rows on top of it; gradients flow through the
    cache into the prefix's forward, summed over the rows, as if every row had computed it. With `capture`, the input
    of the output embedding at the kept positions is appended to it (per-task gradient norms are taken there).
    `forward_kwargs` go to the rows' forward (peft's `adapter_names`, in a batch without a shared prefix)."""
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    keep = last_positions(input_ids, batch["answer_width"] + 1)
    prefix = batch.get("prefix_ids")
    with autocast(device, use_autocast, model):
        extra = {"use_cache": False}
        if prefix is not None:
            prefix = prefix.to(device)[None]
            cache = returned_cache(model(input_ids=prefix, use_cache=True, logits_to_keep=last_positions(prefix)))
            cache.batch_repeat_interleave(len(input_ids))
            attention = torch.cat([torch.ones((len(input_ids), prefix.shape[1]), dtype=attention.dtype,
                                              device=device), attention], dim=-1)
            extra = {cache_keyword(model): cache, "use_cache": True}
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, attention.shape[1] - input_ids.shape[1]:]
        hook = None
        if capture is not None:
            hook = model.get_output_embeddings().register_forward_hook(
                lambda module, args, output: capture.append(args[0]))
        try:
            return model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep,
                         **extra, **(forward_kwargs or {})).logits
        finally:
            if hook is not None:
                hook.remove()


def answer_loss(model, batch: dict, device: torch.device, *, use_autocast: bool,
                answers: tuple[tuple[int, ...], ...] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a `collate` batch (with or without a shared prefix).

    With `answers` (the task's answers as token ids, `answer_tokens(tokenizer, task).answers`), each answer token's
    softmax runs over the tokens that continue the gold answer's prefix into one of the task's answers
    (`experts.answer_space: answers`, the constrained decoding of a verbaliser), the end-of-turn token's over the
    vocabulary as before. Raises ValueError when a row's answer is none of `answers`."""
    logits = answer_logits(model, batch, device, use_autocast=use_autocast)[:, :-1].float()
    targets = batch["labels"][:, -batch["answer_width"]:].to(device)
    if answers is not None:
        logits = logits.masked_fill(~allowed_tokens(targets, answers, logits.shape[-1]), float("-inf"))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)


def next_token_logits(model, prompts: list[list[int]], pad_id: int, device: torch.device, *,
                      use_autocast: bool) -> torch.Tensor:
    """Logits [len(prompts), vocab] of the token that follows each prompt (token ids), from one left-padded batch."""
    input_ids, attention = left_padded(prompts, pad_id, device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with autocast(device, use_autocast, model):
        return model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False,
                     logits_to_keep=last_positions(input_ids)).logits[:, -1]


def locality_kl(model, prompts: list[list[int]], pad_id: int, device: torch.device, *,
                use_autocast: bool) -> torch.Tensor:
    """KL(start || expert) in nats, the mean over `prompts` of the KL divergence between the next-token distributions
    of the start model (the peft `model` with its adapter disabled; no gradient) and of the model with its adapter,
    over the whole vocabulary, computed in float32 (`experts.locality`). Zero while the adapter changes nothing."""
    with torch.no_grad(), model.disable_adapter():
        start = next_token_logits(model, prompts, pad_id, device, use_autocast=use_autocast).float().log_softmax(-1)
    expert = next_token_logits(model, prompts, pad_id, device, use_autocast=use_autocast).float().log_softmax(-1)
    return torch.nn.functional.kl_div(expert, start, log_target=True, reduction="batchmean")


def allowed_tokens(targets: torch.Tensor, answers: tuple[tuple[int, ...], ...], vocab: int) -> torch.Tensor:
    """Which logits each position's softmax keeps under `answer_loss(..., answers=...)`: bool [B, W, vocab], every
    token at positions that are not an answer's own (the end of turn, padding). At the t-th token of a row's gold
    answer g: the t-th tokens of the answers that start with g[:t]. Raises ValueError naming a row whose answer
    tokens are none of `answers`."""
    allowed = torch.ones((*targets.shape, vocab), dtype=torch.bool, device=targets.device)
    rows = targets.tolist()
    for row, labels in enumerate(rows):
        start = next((i for i, token in enumerate(labels) if token != -100), len(labels))
        gold = next((answer for answer in answers if tuple(labels[start:start + len(answer)]) == answer), None)
        if gold is None:
            raise ValueError(f"answer_loss: row {row}'s answer tokens {labels[start:]} start with none of the "
                             f"task's answers {answers}")
        for t in range(len(gold)):
            keep = sorted({answer[t] for answer in answers if len(answer) > t and answer[:t] == gold[:t]})
            allowed[row, start + t] = False
            allowed[row, start + t, keep] = True
    return allowed


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
        with autocast(device, use_autocast, model):
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
