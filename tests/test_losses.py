"""Regression training losses (`finetune.regression_loss`): the expected-value squared error against its closed
form and its gradient, the registry, and stage 3 training with it on the tiny run."""

from __future__ import annotations

import pytest
import torch

from sentimerge.experts.losses import REGRESSION_LOSSES, Levels, expected_squared_error, expected_value
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl
from tests.conftest import write_tiny_config

LEVELS = Levels(token_ids=torch.tensor([5, 2, 7]), values=torch.tensor([-1.0, 0.0, 1.0]))


def _logits(probabilities: list[float]) -> torch.Tensor:
    """[1, 10] logits whose softmax over tokens 5, 2, 7 is `probabilities` (other tokens arbitrary)."""
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, LEVELS.token_ids] = torch.log(torch.tensor(probabilities))
    return logits


def test_expected_mse_equals_its_closed_form():
    logits = _logits([0.2, 0.3, 0.5])
    assert expected_value(logits, LEVELS).item() == pytest.approx(-0.2 + 0.5)
    gold = torch.tensor([1.0])
    assert expected_squared_error(logits, LEVELS, gold).item() == pytest.approx((0.3 - 1.0) ** 2)
    assert REGRESSION_LOSSES.get("level_ce+expected_mse")(torch.tensor([2.0]), torch.tensor([0.49]), 0.5).item() \
        == pytest.approx(2.0 + 0.245)


def test_expected_mse_is_differentiable_through_every_level_probability():
    """d/dz_k (E - y)^2 = 2 (E - y) p_k (v_k - E) for the levels' logits z, and 0 for every other token."""
    logits = _logits([0.2, 0.3, 0.5]).requires_grad_(True)
    gold = torch.tensor([0.8])
    expected_squared_error(logits, LEVELS, gold).sum().backward()
    p, v, e = torch.tensor([0.2, 0.3, 0.5]), LEVELS.values, 0.3
    closed = 2 * (e - 0.8) * p * (v - e)
    assert torch.allclose(logits.grad[0, LEVELS.token_ids], closed, atol=1e-6)
    others = torch.ones(10, dtype=torch.bool)
    others[LEVELS.token_ids] = False
    assert torch.count_nonzero(logits.grad[0, others]) == 0


def test_an_unknown_regression_loss_is_refused_with_a_suggestion(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="unknown regression loss 'expected_mes' \\(did you mean 'expected_mse'"):
        load_config(write_tiny_config(tmp_path, cache_dir=cache_dir, finetune={"regression_loss": "expected_mes"}))


@pytest.mark.parametrize("loss", ["expected_mse", "level_ce+expected_mse"])
def test_stage_3_trains_the_regression_task_on_its_expected_value(tmp_path, cache_dir, loss):
    """The intensity task's logged loss is the squared error of its expected score (same scale as the task: up to
    (6)^2 on [-3, 3]), while classification losses stay cross-entropies; every loss finite, training moves it."""
    from sentimerge.pipeline import finetune, prepare

    settings = {"start": "base", "steps": 6, "per_task": 2, "checkpoint_every": 3, "dev_examples": 4,
                "evaluations": 1, "lora": {"r": 4, "alpha": 8}, "learning_rate": 1e-2, "weighting": {"name": "static"}}
    runs = {}
    for name in ("level_ce", loss):
        cfg = load_config(write_tiny_config(tmp_path / name, cache_dir=cache_dir,
                                            finetune={**settings, "regression_loss": name}))
        prepare.main(cfg)
        finetune.main(cfg)
        runs[name] = [row["task_loss"] for row in read_jsonl(RunDir(cfg.resolved_run_dir).finetune_metrics)
                      if "task_loss" in row]
    # the same batches (same seed): classification losses start equal, the regression task's differs
    assert runs[loss][0]["polarity"] == pytest.approx(runs["level_ce"][0]["polarity"], rel=1e-4)
    assert runs[loss][0]["intensity"] != pytest.approx(runs["level_ce"][0]["intensity"], rel=1e-3)
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in runs[loss])
