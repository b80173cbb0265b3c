"""Task-weighting strategies move weights the way their definitions say, on constructed cases."""

from __future__ import annotations

import pytest
import torch

from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.weighting import WEIGHTINGS, TaskStats, imbalance, make_weighting

STATS = TaskStats(names=("a", "b"), sizes=(100, 100), imbalance=(0.0, 0.0))


def _run(strategy, losses_per_step, grad_norms=None, after=None):
    """Feed per-step losses (and gradient norms); with `after`, each step's losses on its own batch after the
    update, for a strategy that asks for them (FAMO's same-batch rule)."""
    for step, losses in enumerate(losses_per_step):
        losses = torch.tensor(losses, dtype=torch.float32)
        if strategy.combine(losses).requires_grad:
            strategy.combine(losses).backward()
        strategy.observe(losses, None if grad_norms is None else torch.tensor(grad_norms[step]))
        if strategy.needs_losses_after_step:
            strategy.observe_same_batch(losses, torch.tensor(after[step], dtype=torch.float32))
    return strategy.weights()


def test_registry_lists_the_strategies_and_rejects_unknown_names_and_options():
    assert set(WEIGHTINGS.names()) == {"static", "uncertainty", "dwa", "famo", "dao"}
    with pytest.raises(ConfigError, match="did you mean 'dao'"):
        make_weighting("daoo", STATS, {})
    with pytest.raises(ConfigError, match="dwa does not take window_size"):
        make_weighting("dwa", STATS, {"window_size": 3})


def test_static_weights_are_equal_or_follow_size():
    assert make_weighting("static", STATS, {}).weights().tolist() == [1.0, 1.0]
    sized = make_weighting("static", TaskStats(("a", "b"), (300, 100), (0, 0)), {"by_size": 1})
    assert sized.weights().tolist() == pytest.approx([1.5, 0.5])


def test_uncertainty_down_weights_the_task_whose_loss_stays_high():
    strategy = make_weighting("uncertainty", STATS, {"lr": 0.05})
    weights = _run(strategy, [[3.0, 0.3]] * 40)
    assert weights[0] < 1.0 < weights[1]


def test_dwa_up_weights_the_task_whose_loss_stalls():
    strategy = make_weighting("dwa", STATS, {"window": 2})
    falling = [2.0, 1.8, 1.5, 1.2, 1.0, 0.8]
    weights = _run(strategy, [[value, 1.0] for value in falling])  # task b stalls at 1.0
    assert weights[1] > 1.0 > weights[0]
    assert weights.sum().item() == pytest.approx(2.0)


def test_famo_up_weights_the_task_that_improves_less():
    steps = [[1.0 * 0.9 ** i, 1.0 * 0.99 ** i] for i in range(30)]  # a improves fast, b slowly
    next_step = make_weighting("famo", STATS, {"lr": 0.1, "same_batch": 0})
    _run(next_step, steps)
    assert next_step.needs_losses_after_step is False
    same_batch = make_weighting("famo", STATS, {"lr": 0.1})
    _run(same_batch, steps, after=[[a * 0.9, b * 0.99] for a, b in steps])
    for strategy in (next_step, same_batch):
        z = torch.softmax(strategy.logits.detach(), 0)
        assert z[1] > z[0]


def test_famo_measures_the_decrease_on_the_same_batch_so_batch_noise_does_not_move_it():
    """Losses that differ between batches by a factor of 3 but never improve: the next-step rule reads the batch
    differences as progress and moves the weights; the same-batch rule sees no decrease and keeps them equal."""
    noisy = [[3.0, 1.0] if i % 2 else [1.0, 3.0] for i in range(40)]
    next_step = make_weighting("famo", STATS, {"same_batch": 0})
    _run(next_step, noisy[:-1] + [[3.0, 1.0]])
    same_batch = make_weighting("famo", STATS, {})
    _run(same_batch, noisy, after=noisy)
    assert torch.softmax(same_batch.logits.detach(), 0).tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    assert abs(torch.softmax(next_step.logits.detach(), 0)[0].item() - 0.5) > 0.01


def test_famo_floor_bounds_the_weight_a_near_zero_loss_takes_and_keeps_the_objectives_gradient():
    """One example per task and step: a confident right answer has a loss near 0, and log L gives its task almost
    all of the gradient (the suite's FAMO collapse); with `floor` f the effective weights are z_k / (L_k + f)
    normalised, and the combined loss's gradient is exactly that weighting of the tasks' loss gradients."""
    losses = [2.0, 1e-4]
    published = make_weighting("famo", STATS, {})
    _run(published, [losses], after=[losses])
    assert published.weights()[1].item() > 1.99  # of 2: task b's near-zero loss takes everything
    floored = make_weighting("famo", STATS, {"floor": 0.5})
    _run(floored, [losses], after=[losses])
    z = torch.softmax(floored.logits.detach(), 0)
    expected = 2 * (z / (torch.tensor(losses) + 0.5)) / (z / (torch.tensor(losses) + 0.5)).sum()
    torch.testing.assert_close(floored.weights(), expected)
    assert floored.weights()[1].item() < 2 * (2.0 + 0.5) / (2.0 + 0.5 + 0.5)  # at most (L_max + f) / f times a's
    values = torch.tensor(losses, requires_grad=True)
    floored.combine(values).backward()
    torch.testing.assert_close(values.grad, floored.weights() / 2)  # d objective / d L_k = effective weight_k
    with pytest.raises(ConfigError, match="floor"):
        make_weighting("famo", STATS, {"floor": -0.1})


def test_dao_weights_each_task_by_the_other_tasks_gradient_share():
    strategy = make_weighting("dao", STATS, {"a_difficulty": 0.0, "window": 1000})
    weights = _run(strategy, [[1.0, 1.0]] * 30, grad_norms=[[3.0, 1.0]] * 30)  # a dominates the gradient
    assert weights[1] > 1.0 > weights[0]


def test_dao_data_term_favours_imbalanced_and_initially_harder_tasks():
    skewed = TaskStats(("a", "b"), (100, 100), (imbalance([90, 10]), imbalance([50, 50])))
    assert skewed.imbalance[0] > 0.5 and skewed.imbalance[1] == pytest.approx(0.0)
    strategy = make_weighting("dao", skewed, {"a_difficulty": 0.0})
    assert strategy.weights()[0] > strategy.weights()[1]
    harder = make_weighting("dao", STATS, {"a_balance": 0.0})
    weights = _run(harder, [[2.0, 0.5]], grad_norms=[[1.0, 1.0]])
    assert weights[0] > weights[1]


def test_dao_weights_stay_within_their_bounds():
    strategy = make_weighting("dao", TaskStats(("a", "b", "c"), (10, 1000, 100), (0.9, 0.0, 0.0)),
                              {"w_min": 0.5, "w_max": 2.0})
    weights = _run(strategy, [[5.0, 0.01, 1.0]] * 20, grad_norms=[[0.01, 10.0, 1.0]] * 20)
    assert weights.min() >= 0.5 - 1e-4 and weights.max() <= 2.0 + 1e-4
    assert weights.sum().item() == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize("name", ["uncertainty", "dwa", "famo", "dao"])
def test_state_round_trips_so_a_resumed_run_continues_identically(name):
    steps = [[1.0 + 0.1 * i, 2.0 - 0.05 * i] for i in range(12)]
    norms = [[1.0, 2.0]] * 12
    after = [[a * 0.95, b * 0.99] for a, b in steps]
    whole = make_weighting(name, STATS, {})
    _run(whole, steps, norms, after)
    first = make_weighting(name, STATS, {})
    _run(first, steps[:5], norms[:5], after[:5])
    resumed = make_weighting(name, STATS, {})
    resumed.load_state_dict(first.state_dict())
    _run(resumed, steps[5:], norms[5:], after[5:])
    torch.testing.assert_close(resumed.weights(), whole.weights())


def test_dao_weights_follow_the_gradient_shares_also_when_the_losses_differ_100x_in_scale():
    """A regression task on MSE beside a cross-entropy: DAO weighs by gradient-norm shares, not by loss values."""
    weights = {}
    for scale in (1.0, 100.0):
        strategy = make_weighting("dao", STATS, {"a_difficulty": 0.0, "window": 1000})
        weights[scale] = _run(strategy, [[scale, 1.0]] * 30, grad_norms=[[3.0, 1.0]] * 30)
    assert torch.allclose(weights[1.0], weights[100.0])
    # each task's weight is the other task's share of the gradient norm (1/4 and 3/4), normalised to mean 1
    assert weights[100.0].tolist() == pytest.approx([0.5, 1.5], abs=0.05)
