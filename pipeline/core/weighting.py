"""Task-weighting strategies for multi-task fine-tuning (stage 3), registered by name.

Every step sees one loss per task (each batch holds examples of every task). A strategy turns them into the scalar
that is back-propagated, `combine(losses)`, and after the optimizer step `observe(losses, grad_norms)` lets it
update its weights. Weights are reported with mean 1 (they sum to the number of tasks K).

- `static`: fixed weights, equal or proportional to the tasks' training sizes.
- `uncertainty` (Kendall, Gal and Cipolla 2018): learned log-variances s_k; loss = sum exp(-s_k) L_k + s_k, so a
  task whose loss stays high is down-weighted.
- `dwa` (Liu, Johns and Davison 2019, dynamic weight average): w = K softmax(r / T), r_k the ratio of the task's
  loss over the last window to the window before; a task whose loss stalls gets more weight.
- `famo` (Liu et al. 2023): the weighted sum of log-losses with softmax(xi) weights; xi moves against the tasks'
  log-loss decrease, so tasks that improved less gain weight. As in the paper's code, the decrease is measured on
  the step's own batch, before and after the optimizer step (one extra forward without gradients per step);
  `same_batch: 0` measures it against the next step's losses on another batch instead (no extra forward), which
  with a few examples per task is mostly the difference between two batches: Adam then turns that noise into
  steps of full size on xi, and the weights drift to a few tasks (the rule of the suite's FAMO collapse in the
  README's quality report).
- `dao`, this product's dynamic adaptive loss, after Ding et al. 2024. Each task's weight is the product of a
  training-dynamics term and a data term, smoothed and renormalised:

      w_k ∝ EMA[ (1 - g_k) / (K - 1)  ·  K softmax(r_k / T)_k ]  ·  d_k

  g_k is the task's share of the gradient norm at the last shared representation (the final norm's output), so for
  two tasks each is weighted by the other task's share, as in the published method; r_k is the loss descent ratio
  of `dwa`; d_k = (n_k / mean n)^a_size · (1 + imbalance_k)^a_balance · (L_k(0) / mean L(0))^a_difficulty is the data
  term: training size, class imbalance (1 - normalised label entropy) and difficulty (the merged model's initial loss
  on the task relative to the other tasks). Inside each task, examples can also be weighted by inverse label
  frequency (`class_balance`), DAO's data-level weight for class imbalance. Weights are clipped to [w_min, w_max]
  times the mean so that no task is switched off.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.registry import Registry

WEIGHTINGS: Registry[type["Weighting"]] = Registry("loss weighting")


@dataclass(frozen=True)
class TaskStats:
    """Data characteristics of the tasks, in task order: training sizes and class imbalance in [0, 1)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    imbalance: tuple[float, ...]


def imbalance(label_counts: list[int]) -> float:
    """1 - normalised entropy of the label distribution: 0 when balanced, towards 1 when one label dominates."""
    total = sum(label_counts)
    probabilities = [count / total for count in label_counts if count]
    if len(label_counts) < 2:
        return 0.0
    entropy = -sum(p * math.log(p) for p in probabilities)
    return max(0.0, 1.0 - entropy / math.log(len(label_counts)))


class Weighting:
    """Base: equal weights that never change."""

    needs_grad_norms = False
    needs_losses_after_step = False  # observe_same_batch wants the step's batch re-scored after the update
    class_balance = False  # weight examples inside a task by inverse label frequency

    def __init__(self, stats: TaskStats):
        self.stats = stats
        self.k = len(stats.names)
        self._weights = torch.ones(self.k)

    def weights(self) -> torch.Tensor:
        return self._weights.clone()

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        return (self._weights.to(losses.device) * losses).sum() / self.k

    def observe(self, losses: torch.Tensor, grad_norms: torch.Tensor | None = None) -> None:
        """Called after every optimizer step with that step's detached per-task losses (and gradient norms)."""

    def observe_same_batch(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """With `needs_losses_after_step`, called after `observe`: the step's per-task losses [K] on its own batch
        before and after the optimizer step."""

    def state_dict(self) -> dict:
        return {"weights": self._weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self._weights = torch.tensor(state["weights"])


def _mean_one(values: torch.Tensor) -> torch.Tensor:
    return values * len(values) / values.sum()


@WEIGHTINGS.register("static")
class Static(Weighting):
    """Fixed weights: `by_size: 1` makes them proportional to the training sizes, else equal."""

    def __init__(self, stats: TaskStats, by_size: float = 0.0):
        super().__init__(stats)
        if by_size:
            self._weights = _mean_one(torch.tensor(stats.sizes, dtype=torch.float32))


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """Learned homoscedastic uncertainty: loss = sum_k exp(-s_k) L_k + s_k, with s_k trained by its own Adam."""

    def __init__(self, stats: TaskStats, lr: float = 0.01):
        super().__init__(stats)
        self.log_variance = torch.zeros(self.k, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_variance], lr=lr)

    def weights(self) -> torch.Tensor:
        return _mean_one(torch.exp(-self.log_variance.detach()))

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.log_variance.to(losses.device)
        return (torch.exp(-s) * losses + s).sum() / self.k

    def observe(self, losses: torch.Tensor, grad_norms: torch.Tensor | None = None) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def state_dict(self) -> dict:
        return {"log_variance": self.log_variance.detach().tolist(), "adam": _adam_state(self.optimizer)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.log_variance.copy_(torch.tensor(state["log_variance"]))
        _load_adam_state(self.optimizer, state["adam"])


def _adam_state(optimizer: torch.optim.Optimizer) -> dict:
    """The moments of a one-tensor Adam as JSON (no pickle in checkpoints)."""
    slot = optimizer.state_dict()["state"].get(0, {})
    return {key: (value.tolist() if torch.is_tensor(value) else value) for key, value in slot.items()}


def _load_adam_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    if state:
        adam = optimizer.state_dict()
        adam["state"] = {0: {key: torch.tensor(value) for key, value in state.items()}}
        optimizer.load_state_dict(adam)


class _DescentRate:
    """Per-task loss averaged over windows of `window` steps; `ratios()` is last window / the one before."""

    def __init__(self, k: int, window: int):
        self.window = window
        self.current, self.count = torch.zeros(k), 0
        self.last: torch.Tensor | None = None
        self.before: torch.Tensor | None = None

    def add(self, losses: torch.Tensor) -> bool:
        """Accumulate one step; True when a window just closed."""
        self.current += losses.float().cpu()
        self.count += 1
        if self.count < self.window:
            return False
        self.before, self.last = self.last, self.current / self.count
        self.current, self.count = torch.zeros_like(self.current), 0
        return True

    def ratios(self) -> torch.Tensor | None:
        if self.last is None or self.before is None:
            return None
        return self.last / self.before.clamp(min=1e-8)

    def state_dict(self) -> dict:
        as_list = lambda t: None if t is None else t.tolist()  # noqa: E731
        return {"current": self.current.tolist(), "count": self.count, "last": as_list(self.last),
                "before": as_list(self.before)}

    def load_state_dict(self, state: dict) -> None:
        as_tensor = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
        self.current, self.count = torch.tensor(state["current"]), state["count"]
        self.last, self.before = as_tensor(state["last"]), as_tensor(state["before"])


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(Weighting):
    """w = K softmax(r / T) with r the per-task loss descent ratio between the last two windows."""

    def __init__(self, stats: TaskStats, temperature: float = 2.0, window: int = 10):
        super().__init__(stats)
        self.temperature = temperature
        self.rate = _DescentRate(self.k, int(window))

    def observe(self, losses: torch.Tensor, grad_norms: torch.Tensor | None = None) -> None:
        if self.rate.add(losses) and self.rate.ratios() is not None:
            self._weights = self.k * torch.softmax(self.rate.ratios() / self.temperature, dim=0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rate": self.rate.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rate.load_state_dict(state["rate"])


@WEIGHTINGS.register("famo")
class Famo(Weighting):
    """FAMO: minimise sum_k z_k log(L_k + floor) / c with z = softmax(xi); xi follows the tasks' log-loss decrease.

    `floor` (nats, default 0: the published objective) bounds the 1 / (L_k + floor) factor the log puts on each
    task's gradient. With one or two examples per task and step, a task's loss on its batch is at times below
    1e-3 (a confident right answer), and without a floor that task takes almost all of the step's gradient: on
    the suite (one example per task) the effective weight of one task reached 7.98 of 8 and the final model fell
    from 0.60 to 0.39 (README, stage 3). The decrease that moves xi is measured on log(L + floor) as well."""

    def __init__(self, stats: TaskStats, lr: float = 0.025, gamma: float = 0.01, same_batch: float = 1.0,
                 floor: float = 0.0):
        super().__init__(stats)
        if floor < 0:
            raise ConfigError(f"famo: floor must be >= 0 (nats), got {floor}")
        self.logits = torch.zeros(self.k, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=gamma)
        self.previous: torch.Tensor | None = None
        self.needs_losses_after_step = bool(same_batch)
        self.floor = floor

    def _shifted(self, losses: torch.Tensor) -> torch.Tensor:
        return (losses + self.floor).clamp(min=1e-8)

    def _effective(self, losses: torch.Tensor) -> torch.Tensor:
        """The weight each task's gradient gets: z_k / (L_k + floor) normalised (the gradient of the objective)."""
        z = torch.softmax(self.logits.detach(), dim=0).to(losses.device)
        inverse = z / self._shifted(losses.detach())
        return inverse / inverse.sum()

    def weights(self) -> torch.Tensor:
        if self.previous is None:
            return torch.ones(self.k)
        return self.k * self._effective(self.previous)

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        z = torch.softmax(self.logits.detach(), dim=0).to(losses.device)
        c = (z / self._shifted(losses.detach())).sum()
        return (z * self._shifted(losses).log()).sum() / c

    def observe(self, losses: torch.Tensor, grad_norms: torch.Tensor | None = None) -> None:
        losses = losses.float().cpu().clamp(min=0.0)
        if self.previous is not None and not self.needs_losses_after_step:
            self._step(self._shifted(self.previous).log() - self._shifted(losses).log())
        self.previous = losses

    def observe_same_batch(self, before: torch.Tensor, after: torch.Tensor) -> None:
        before, after = before.float().cpu().clamp(min=0.0), after.float().cpu().clamp(min=0.0)
        self._step(self._shifted(before).log() - self._shifted(after).log())

    def _step(self, decrease: torch.Tensor) -> None:
        """One Adam step on xi along the Jacobian of softmax(xi) times the log-loss decrease (tasks that decreased
        more lose weight)."""
        with torch.enable_grad():
            gradient = torch.autograd.grad(torch.softmax(self.logits, dim=0), self.logits, grad_outputs=decrease)[0]
        self.optimizer.zero_grad()
        self.logits.grad = gradient
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"logits": self.logits.detach().tolist(),
                "previous": None if self.previous is None else self.previous.tolist(),
                "adam": _adam_state(self.optimizer)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(torch.tensor(state["logits"]))
        self.previous = None if state["previous"] is None else torch.tensor(state["previous"])
        _load_adam_state(self.optimizer, state["adam"])


@WEIGHTINGS.register("dao")
class DynamicAdaptive(Weighting):
    """The dynamic adaptive loss (see the module docstring for the formula)."""

    needs_grad_norms = True

    def __init__(self, stats: TaskStats, temperature: float = 2.0, window: int = 10, smoothing: float = 0.9,
                 a_size: float = 0.25, a_balance: float = 1.0, a_difficulty: float = 0.5, w_min: float = 0.2,
                 w_max: float = 5.0, class_balance: bool = True):
        super().__init__(stats)
        self.class_balance = bool(class_balance)
        self.temperature, self.smoothing, self.w_min, self.w_max = temperature, smoothing, w_min, w_max
        self.a_difficulty = a_difficulty
        self.rate = _DescentRate(self.k, int(window))
        sizes = torch.tensor(stats.sizes, dtype=torch.float32)
        self.data_term = (sizes / sizes.mean()) ** a_size * (1 + torch.tensor(stats.imbalance)) ** a_balance
        self.dynamics = torch.ones(self.k)
        self.grad_share: torch.Tensor | None = None
        self.initial_loss: torch.Tensor | None = None
        self._weights = self._normalise(self.data_term)

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Scale `raw` so that the clipped weights clamp(c raw, w_min, w_max) have mean 1 (bisection on c)."""
        raw = raw.clamp(min=1e-8) / raw.clamp(min=1e-8).mean()
        low, high = 0.0, self.w_max / raw.min().item()
        for _ in range(60):  # mean(clamp(c raw)) grows with c
            scale = (low + high) / 2
            low, high = (scale, high) if raw.mul(scale).clamp(self.w_min, self.w_max).mean() < 1 else (low, scale)
        return raw.mul((low + high) / 2).clamp(self.w_min, self.w_max)

    def observe(self, losses: torch.Tensor, grad_norms: torch.Tensor | None = None) -> None:
        losses = losses.float().cpu()
        if self.initial_loss is None:
            self.initial_loss = losses.clone()
        if grad_norms is not None:
            share = grad_norms.float().cpu() / grad_norms.sum().clamp(min=1e-12)
            self.grad_share = share if self.grad_share is None else self.smoothing * self.grad_share + (1 - self.smoothing) * share
        balance = (1 - self.grad_share) / max(self.k - 1, 1) * self.k if self.grad_share is not None and self.k > 1 \
            else torch.ones(self.k)
        self.rate.add(losses)
        ratios = self.rate.ratios()
        descent = self.k * torch.softmax(ratios / self.temperature, 0) if ratios is not None else torch.ones(self.k)
        self.dynamics = self.smoothing * self.dynamics + (1 - self.smoothing) * balance * descent
        difficulty = (self.initial_loss / self.initial_loss.mean().clamp(min=1e-8)).clamp(min=1e-3) ** self.a_difficulty
        self._weights = self._normalise(self.dynamics * self.data_term * difficulty)

    def state_dict(self) -> dict:
        as_list = lambda t: None if t is None else t.tolist()  # noqa: E731
        return {"weights": self._weights.tolist(), "dynamics": self.dynamics.tolist(),
                "grad_share": as_list(self.grad_share), "initial_loss": as_list(self.initial_loss),
                "rate": self.rate.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        as_tensor = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
        self._weights, self.dynamics = torch.tensor(state["weights"]), torch.tensor(state["dynamics"])
        self.grad_share, self.initial_loss = as_tensor(state["grad_share"]), as_tensor(state["initial_loss"])
        self.rate.load_state_dict(state["rate"])


def make_weighting(name: str, stats: TaskStats, options: dict[str, float]) -> Weighting:
    """The strategy `name` with `options`; an unknown option is a ConfigError naming the accepted ones."""
    strategy = WEIGHTINGS.get(name)
    accepted = [p for p in inspect.signature(strategy.__init__).parameters if p not in ("self", "stats")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"finetune.weighting.options: {name} does not take {', '.join(unknown)} "
                          f"(it takes: {', '.join(accepted) or 'nothing'})")
    return strategy(stats, **options)
