"""Training losses of regression tasks, registered by name (`finetune.regression_loss`).

A regression task answers one of L score levels ("0".."L-1", spread evenly over the task's range); the scorer
predicts the probability-weighted mean of the level values (`pipeline/core/scoring.py`). Its training loss can be:

- `level_ce`: cross-entropy of the answer tokens of the level nearest the gold score (the default; the same loss
  as classification, so every task's loss has the same kind and scale);
- `expected_mse`: the squared error of the predicted value itself, (sum_k p_k v_k - y)^2, in the task's units
  (the range it is labelled on), where p is the softmax over the levels' first-token logits: the very number the
  scorer predicts, differentiable through every level's probability. This is a true regression loss, whose scale
  differs from the classification tasks' cross-entropy, as in DAO's financial setting (Ding et al., arXiv
  2408.11856: MSE for the regression task beside cross-entropy);
- `level_ce+expected_mse`: their sum, the MSE weighted by `finetune.mse_weight`.

Classification examples keep their answer cross-entropy under every choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sentimerge.pipeline.core.registry import Registry

# (per-example answer cross-entropy [B], expected-value squared error [B], mse_weight) -> loss [B]
RegressionLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
REGRESSION_LOSSES: Registry[RegressionLoss] = Registry("regression loss")
REGRESSION_LOSSES.register("level_ce")(lambda ce, mse, weight: ce)
REGRESSION_LOSSES.register("expected_mse")(lambda ce, mse, weight: mse)
REGRESSION_LOSSES.register("level_ce+expected_mse")(lambda ce, mse, weight: ce + weight * mse)


@dataclass(frozen=True)
class Levels:
    """A regression task's answer levels as the training loss needs them: the first (and only) token id of each
    level's answer [L] and the value it stands for [L]."""

    token_ids: torch.Tensor
    values: torch.Tensor


def expected_value(first_logits: torch.Tensor, levels: Levels) -> torch.Tensor:
    """sum_k p_k v_k with p = softmax over the levels' logits: [B, vocab] -> [B] (float32). The scorer's
    prediction: its log-softmax over the vocabulary, renormalised over the levels, is the same softmax."""
    probabilities = torch.softmax(first_logits.float()[:, levels.token_ids.to(first_logits.device)], dim=-1)
    return probabilities @ levels.values.to(probabilities.device, torch.float32)


def expected_squared_error(first_logits: torch.Tensor, levels: Levels, gold: torch.Tensor) -> torch.Tensor:
    """(expected_value - gold)^2 per example, [B], in the task's units squared."""
    return (expected_value(first_logits, levels) - gold.to(first_logits.device, torch.float32)) ** 2
