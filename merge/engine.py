"""The in-memory merge: one resident scoring copy of the base model whose adapted weights each candidate rewrites.

Everything that does not depend on the coefficients is computed once: each target weight's base value in float32,
the experts' stacked LoRA factors (weighted-sum methods merge on the factors: W0 + B_cat diag(c s) A_cat) or their
sparsified dense deltas (other methods). A candidate then costs one small computation per weight and a copy into
the resident bf16 parameter. Nothing is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from merge.genome import Genome
from merge.lora import LoraFactors, layer_of, part_of
from merge.methods import MergeMethod
from pipeline.errors import ModelError


class MergeFailed(RuntimeError):
    """A candidate whose merged weights are not finite."""


@dataclass
class _Target:
    weight: str
    param: torch.nn.Parameter
    layer: int
    part: int
    base: torch.Tensor  # float32
    a: torch.Tensor | None = None  # [sum of ranks, in], low-rank methods
    b: torch.Tensor | None = None  # [out, sum of ranks]
    rank_owner: torch.Tensor | None = None  # expert index of each rank row
    scales: torch.Tensor | None = None  # LoRA scale of each rank row
    deltas: torch.Tensor | None = None  # [experts, out, in], dense methods


class InMemoryMerge:
    """Writes candidates' merged weights into `model` (the resident scoring copy)."""

    def __init__(self, model, experts: dict[str, dict[str, LoraFactors]], genome: Genome, method: MergeMethod, *,
                 density: float = 1.0, seed: int = 0):
        self.model, self.genome, self.method, self.density = model, genome, method, density
        names = list(genome.experts)
        if list(experts) != names:
            raise ValueError(f"experts {list(experts)} do not match the genome's {names}")
        params = dict(model.named_parameters())
        weights = sorted({weight for factors in experts.values() for weight in factors},
                         key=lambda w: (layer_of(w) or 0, w))
        generator = torch.Generator().manual_seed(seed)
        self.targets: list[_Target] = []
        for weight in weights:
            if weight not in params:
                raise ModelError(f"the adapters change {weight}, which the base model does not have")
            layer = layer_of(weight)
            if layer is None or layer >= genome.num_layers:
                raise ModelError(f"{weight}: LoRA outside the decoder layers is not supported by the layer-wise merge")
            param = params[weight]
            target = _Target(weight, param, layer, genome.part_index(part_of(weight)) if genome.split_attention_mlp
                             else 0, param.detach().float().clone())
            present = [(i, experts[name][weight]) for i, name in enumerate(names) if weight in experts[name]]
            for _, factors in present:
                if tuple(factors.b.shape[:1]) + tuple(factors.a.shape[1:]) != tuple(param.shape):
                    raise ModelError(f"{weight}: LoRA shape {tuple(factors.b.shape)} x {tuple(factors.a.shape)} "
                                     f"does not fit the base weight {tuple(param.shape)}")
            if method.low_rank:
                target.a = torch.cat([f.a.float() for _, f in present])
                target.b = torch.cat([f.b.float() for _, f in present], dim=1)
                target.rank_owner = torch.cat([torch.full((f.a.shape[0],), i) for i, f in present])
                target.scales = torch.cat([torch.full((f.a.shape[0],), f.scale) for _, f in present])
            else:
                target.deltas = torch.zeros((len(names), *param.shape))
                for i, factors in present:
                    # the delta as mergekit sees it: (W0 + s B A) - W0 in float32, so trimming picks the same entries
                    delta = (target.base + factors.delta()) - target.base
                    target.deltas[i] = method.sparsify(delta, density, generator) if method.sparsify else delta
            self.targets.append(target)

    @torch.no_grad()
    def merged_weight(self, target: _Target, weights: torch.Tensor) -> torch.Tensor:
        """The merged float32 value of one target weight for per-expert `weights` [E]."""
        if self.method.low_rank:
            rows = weights[target.rank_owner] * target.scales
            return torch.addmm(target.base, target.b, target.a * rows[:, None])
        return self.method.combine(target.base, target.deltas, weights)

    def _expert_weights(self, coefficients: np.ndarray) -> list[torch.Tensor]:
        return [torch.tensor(coefficients[:, t.layer, t.part], dtype=torch.float32) for t in self.targets]

    @torch.no_grad()
    def apply(self, genome: np.ndarray) -> None:
        """Write the candidate `genome`'s merged weights into the resident model."""
        coefficients = self.genome.layer_coefficients(genome)
        for target, weights in zip(self.targets, self._expert_weights(coefficients)):
            merged = self.merged_weight(target, weights)
            if not torch.isfinite(merged).all():
                raise MergeFailed(f"{target.weight}: merged weight is not finite")
            target.param.copy_(merged)

    @torch.no_grad()
    def merged_state(self, genome: np.ndarray) -> dict[str, torch.Tensor]:
        """The candidate's merged adapted weights in float32 (for checks and exports; the model is untouched)."""
        coefficients = self.genome.layer_coefficients(genome)
        return {t.weight: self.merged_weight(t, w) for t, w in zip(self.targets, self._expert_weights(coefficients))}
