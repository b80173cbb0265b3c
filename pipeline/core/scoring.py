"""Scoring: the log-probability of each answer of a task, for many examples at once.

One batched forward over the left-padded prompts keeps only the last position's logits (`logits_to_keep`), which
gives every answer's first token. Answers longer than one token continue from the prompts' KV cache, repeated once
per such answer, so the prompt is never computed twice. The token prefix all prompts share (system turn,
instruction, answer list) is computed once per call and reused by every batch through its KV cache. Classification
predicts the answer with the highest total log-probability. Regression answers are score levels 0..L-1 spread evenly
over the task's range; the prediction is the probability-weighted mean of the level values (softmax over the levels'
log-probabilities). That yields a real number from the same single forward, uses the model's whole distribution
rather than its top level, and is the quantity a level-wise cross-entropy teaches in training.

The model's math runs in its own dtype (bf16 by default), but the LM head of the kept positions runs in float32
(`float32_head`): bf16 logits keep 8 significant bits, so at logit magnitudes of 16-32 every log-probability is a
multiple of 1/8 nat or coarser, two answers often tie exactly, and `argmax` would then pick the first label of the
task's list. A tie that remains in float32 is counted and logged (`TaskScores.ties`), never resolved silently.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sentimerge.pipeline.core.errors import ModelError
from sentimerge.pipeline.core.prompts import answer_tokens, prompt_ids
from sentimerge.pipeline.core.tasks import TaskSpec

log = logging.getLogger("sentimerge.scoring")


@dataclass
class TaskScores:
    """Per-example answer log-probabilities [N, A] and the resulting predictions."""

    task: TaskSpec
    logprobs: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities renormalised over the task's answers."""
        return torch.softmax(self.logprobs, dim=-1)

    @property
    def ties(self) -> torch.Tensor:
        """[N] bool: classification examples whose two best answers have exactly the same log-probability.

        There `argmax` picks the answer listed first; always False for regression (its prediction is a mean)."""
        if self.task.kind != "classification" or self.logprobs.shape[-1] < 2:
            return torch.zeros(self.logprobs.shape[0], dtype=torch.bool)
        top = self.logprobs.topk(2, dim=-1).values
        return top[:, 0] == top[:, 1]

    @property
    def predictions(self) -> list[str | float]:
        """The label (classification) or the probability-weighted level value (regression) per example.

        Raises ModelError when a score is not finite (NaN or infinite weights or activations): no metric, table or
        prediction is ever computed from them."""
        broken = int((~torch.isfinite(self.logprobs)).any(-1).sum())
        if broken:
            raise ModelError(f"task {self.task.name}: the model's scores of {broken} of {len(self.logprobs)} examples "
                             "are not finite (NaN or infinite weights or activations)")
        if self.task.kind == "classification":
            tied = int(self.ties.sum())
            if tied:
                log.warning("task %s: %d of %d examples have two answers with exactly equal log-probabilities; "
                            "the answer listed first is taken", self.task.name, tied, len(self.logprobs))
            return [self.task.labels[i] for i in self.logprobs.argmax(-1).tolist()]
        values = torch.tensor(self.task.level_values, dtype=self.probs.dtype)
        return (self.probs @ values).tolist()


@contextlib.contextmanager
def float32_head(model) -> Iterator[None]:
    """Within the block, the model's output embedding (LM head) computes its logits in float32.

    The rest of the model keeps its dtype. The head's weight is cast once per block ([vocab, hidden] float32: 113 MB
    for SmolLM2-135M) and applied to the kept positions only, so the cost is one small matmul per forward. Whatever
    the model does after its head (softcapping, scaling) then runs in float32 too. A head that is not a plain
    `torch.nn.Linear` (a peft LoRA layer on `lm_head`) keeps its own dtype, with a warning.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        log.warning("scoring: the LM head is a %s, not a Linear layer; its logits keep the model's dtype",
                    type(head).__name__)
        yield
        return
    weight = head.weight.detach().float()
    bias = None if head.bias is None else head.bias.detach().float()

    def forward_in_float32(module, inputs, output):
        with torch.autocast(weight.device.type, enabled=False):
            return torch.nn.functional.linear(inputs[0].float(), weight, bias)

    handle = head.register_forward_hook(forward_in_float32)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def score_prompts(model, prompts: list[list[int]], answers: tuple[tuple[int, ...], ...], *, pad_id: int,
                  batch_size: int = 16, reuse_prefix: bool = True) -> torch.Tensor:
    """log P(answer | prompt) for every prompt and answer: a float32 tensor [len(prompts), len(answers)], in nats.

    The LM head runs in float32 (`float32_head`) whatever the model's dtype. Raises ValueError for `batch_size` < 1.

    With `reuse_prefix`, the prompts' longest common token prefix (system turn, instruction, answer list: about
    half of a short prompt) is computed once, and each batch only computes the rest on top of its KV cache.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    result = torch.empty(len(prompts), len(answers), dtype=torch.float32)
    with float32_head(model):
        prefix = _prefix(model, prompts, device) if reuse_prefix and len(prompts) > 1 else None
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            result[batch] = _score_batch(model, [prompts[i] for i in batch], answers, pad_id, device, prefix)
    return result


@dataclass
class _Prefix:
    length: int
    cache: object  # the model's KV cache of the prefix, batch 1


def _prefix(model, prompts: list[list[int]], device) -> _Prefix | None:
    shortest = min(len(p) for p in prompts)
    length = 0
    while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    if length < 8:  # not worth a second forward
        return None
    ids = torch.tensor([prompts[0][:length]], device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=last_positions(ids))
    return _Prefix(length, returned_cache(out))


def left_padded(prompts: list[list[int]], pad_id: int, device, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [len(prompts), longest - skip] on `device`: each prompt without its first
    `skip` tokens (a prefix computed once elsewhere), left-padded so every prompt ends at the last column."""
    width = max(len(p) for p in prompts) - skip
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) + skip:] = torch.tensor(prompt[skip:])
        attention[row, width - len(prompt) + skip:] = 1
    return input_ids.to(device), attention.to(device)


def _score_batch(model, prompts, answers, pad_id, device, prefix: _Prefix | None = None) -> torch.Tensor:
    skip = prefix.length if prefix else 0
    input_ids, attention = left_padded(prompts, pad_id, device, skip)  # after the shared prefix when there is one
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(len(prompts))
        attention = torch.cat([torch.ones((len(prompts), skip), dtype=torch.long, device=device), attention], dim=-1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    longer = [i for i, answer in enumerate(answers) if len(answer) > 1]
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions[:, skip:],
                **{cache_keyword(model): cache}, use_cache=bool(longer) or cache is not None,
                logits_to_keep=last_positions(input_ids))
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = first[:, [answer[0] for answer in answers]]
    if longer:
        scores[:, longer] += _continuations(model, returned_cache(out), attention, positions,
                                            [answers[i] for i in longer], pad_id)
    return scores.cpu()


@functools.cache
def _cache_argument(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model) -> str:
    """The forward's keyword for the KV cache, which scoring and the prefix-sharing training forward pass: `cache`
    where transformers has renamed it (5.2x: `past_key_values` is deprecated there), `past_key_values` in the
    earlier releases pyproject allows."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_argument(type(base))


def returned_cache(out):
    """The KV cache a forward returned (`out.cache` where transformers has renamed it, else `out.past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def last_positions(input_ids: torch.Tensor, count: int = 1) -> torch.Tensor:
    """`logits_to_keep` for the last `count` positions, as an index tensor (scoring and training pass this).

    The kept hidden states are then a contiguous copy [batch, count, hidden]. With `logits_to_keep=count` they are a
    strided slice, and torch's matmul, unless the weights require grad, multiplies it by the output embedding expanded
    per sequence (a copy of [batch, hidden, vocab], forward and backward): 2.4x slower scoring of a frozen SmolLM2-135M,
    40% of a LoRA training step (the embedding is frozen there).
    """
    width = input_ids.shape[1]
    return torch.arange(width - count, width, device=input_ids.device)


def _continuations(model, cache, attention, positions, answers, pad_id) -> torch.Tensor:
    """Sum of log-probs of each answer's tokens after its first, continuing from the prompts' cache."""
    batch, count = attention.shape[0], len(answers)
    steps = max(len(answer) for answer in answers) - 1
    feed = torch.full((count, steps), pad_id, dtype=torch.long)
    target = torch.zeros((count, steps), dtype=torch.long)
    valid = torch.zeros((count, steps), dtype=torch.bool)
    for j, answer in enumerate(answers):
        feed[j, : len(answer) - 1] = torch.tensor(answer[:-1])
        target[j, : len(answer) - 1] = torch.tensor(answer[1:])
        valid[j, : len(answer) - 1] = True
    device = attention.device
    feed, target, valid = feed.to(device).repeat(batch, 1), target.to(device).repeat(batch, 1), valid.to(device).repeat(batch, 1)
    cache.batch_repeat_interleave(count)
    mask = torch.cat([attention.repeat_interleave(count, 0), torch.ones_like(feed)], dim=-1)
    start = positions[:, -1:].repeat_interleave(count, 0) + 1
    steps_positions = start + torch.arange(steps, device=device)
    logits = model(input_ids=feed, attention_mask=mask, position_ids=steps_positions, **{cache_keyword(model): cache}).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (logprobs * valid).sum(-1).view(batch, count)


def score_task(model, tokenizer, task: TaskSpec, examples: list[dict], *, batch_size: int = 16) -> TaskScores:
    """Score every example of `task` with `model`."""
    prompts = [prompt_ids(tokenizer, task, example) for example in examples]
    tokens = answer_tokens(tokenizer, task)
    logprobs = score_prompts(model, prompts, tokens.answers, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    return TaskScores(task, logprobs)
