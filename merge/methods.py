"""Merge methods, registered by name: each combines the experts' deltas of one weight with per-expert weights.

A method is two small pure functions on float32 tensors:
- `sparsify(delta, density, generator)`: what does not depend on the coefficients (trimming, drop masks), done once;
- `combine(base, deltas[E, ...], weights[E])`: the closed form of the merged weight.
Each mirrors the mergekit method of the same semantics (`mergekit_method`), so a recipe reproduces the merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sentimerge.pipeline.core.registry import Registry


@dataclass(frozen=True)
class MergeMethod:
    name: str
    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    mergekit_method: str
    sparsify: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor] | None = None
    low_rank: bool = False  # combine is a weighted sum, so it can run on the LoRA factors directly
    exact_recipe: bool = True  # False where mergekit draws its own random masks

    def mergekit_parameters(self, density: float) -> dict:
        """Per-model parameters of the recipe besides `weight`."""
        return {"density": density} if self.sparsify is not None else {}


METHODS: Registry[MergeMethod] = Registry("merge method")


def get_method(name: str) -> MergeMethod:
    return METHODS.get(name)


def _expand(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.view(-1, *([1] * (like.dim() - 1)))


def weighted_sum(base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Task arithmetic: W0 + sum_i w_i delta_i."""
    return base + (deltas * _expand(weights, deltas)).sum(0)


def _elected_mean(normalize: bool):
    def combine(base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """TIES: elect each entry's sign by the weighted sum, keep agreeing deltas, take their weighted mean."""
        weighted = deltas * _expand(weights, deltas)
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agrees = (weighted.sign() == majority).to(deltas.dtype)
        mixed = (weighted * agrees).sum(0)
        if normalize:
            divisor = (_expand(weights, deltas) * agrees).sum(0)
            mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        return base + mixed

    return combine


def trim_by_magnitude(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep the `density` share of entries with the largest magnitude, as mergekit's `magnitude` counts them.

    A selection (kthvalue) instead of mergekit's full sort: the same entries unless magnitudes tie at the threshold.
    """
    if density >= 1:
        return delta
    magnitudes = delta.abs().flatten()
    keep = max(1, int(density * magnitudes.numel()))
    threshold = magnitudes.kthvalue(magnitudes.numel() - keep + 1).values
    return delta * (delta.abs() >= threshold)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (seeded), rescaled to the delta's L1 norm as mergekit does."""
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return rescaled_masked_tensor(delta, mask, RescaleNorm.l1)


for _method in (
    MergeMethod("task_arithmetic", weighted_sum, "task_arithmetic", low_rank=True),
    MergeMethod("ties", _elected_mean(normalize=True), "ties", sparsify=trim_by_magnitude),
    MergeMethod("dare_linear", weighted_sum, "dare_linear", sparsify=random_drop, exact_recipe=False),
    MergeMethod("dare_ties", _elected_mean(normalize=False), "dare_ties", sparsify=random_drop, exact_recipe=False),
):
    METHODS.register(_method.name)(_method)
