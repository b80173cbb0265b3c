"""The in-memory merge: one resident scoring copy of the base model whose adapted weights each candidate rewrites.

Everything that does not depend on the coefficients is computed once: a copy of each target weight's base value
(in the resident model's dtype: exact in float32, and half the memory of a float32 copy for bf16), the experts'
stacked LoRA factors (weighted-sum methods merge on the factors: W0 + B_cat diag(c s) A_cat) or their sparsified
dense deltas (other methods). A candidate then costs one small computation per weight and a copy into the resident
parameter. Nothing is written to disk.

Dense deltas take experts x the adapted weights in float32 (1.7 GB for 3 experts on a 135M model; 28 GB per expert
on a 7B one). With `keep_deltas=False` they are recomputed from the LoRA factors one weight at a time for each
candidate instead: slower per candidate, the memory of one weight: for a baseline that is scored only a few times.
Sparsification masks are drawn per weight from a generator seeded by (seed, weight index), so both modes merge
exactly the same.
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
    base: torch.Tensor  # the resident dtype; merged in float32
    index: int = 0  # position among the targets: seeds its sparsification masks
    a: torch.Tensor | None = None  # [sum of ranks, in], low-rank methods
    b: torch.Tensor | None = None  # [out, sum of ranks]
    rank_owner: torch.Tensor | None = None  # expert index of each rank row
    scales: torch.Tensor | None = None  # LoRA scale of each rank row
    deltas: torch.Tensor | None = None  # [experts, out, in], dense methods with keep_deltas
    factors: list[tuple[int, LoraFactors]] | None = None  # (expert index, factors), dense methods without


class InMemoryMerge:
    """Writes candidates' merged weights into `model` (the resident scoring copy)."""

    def __init__(self, model, experts: dict[str, dict[str, LoraFactors]], genome: Genome, method: MergeMethod, *,
                 density: float = 1.0, seed: int = 0, keep_deltas: bool = True):
        self.model, self.genome, self.method, self.density, self.seed = model, genome, method, density, seed
        self.expert_count = len(genome.experts)
        names = list(genome.experts)
        if list(experts) != names:
            raise ValueError(f"experts {list(experts)} do not match the genome's {names}")
        params = dict(model.named_parameters())
        weights = sorted({weight for factors in experts.values() for weight in factors},
                         key=lambda w: (layer_of(w) or 0, w))
        self.targets: list[_Target] = []
        for index, weight in enumerate(weights):
            if weight not in params:
                raise ModelError(f"the adapters change {weight}, which the base model does not have")
            layer = layer_of(weight)
            if layer is None or layer >= genome.num_layers:
                raise ModelError(f"{weight}: LoRA outside the decoder layers is not supported by the layer-wise merge")
            param = params[weight]
            target = _Target(weight, param, layer, genome.part_index(part_of(weight)) if genome.split_attention_mlp
                             else 0, param.detach().clone(), index)
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
                target.factors = present
                if keep_deltas:
                    target.deltas = self._dense_deltas(target)
                    target.factors = None
            self.targets.append(target)

    def _dense_deltas(self, target: _Target) -> torch.Tensor:
        """[experts, out, in] float32: each expert's (sparsified) delta of the target weight."""
        base = target.base.float()
        deltas = torch.zeros((self.expert_count, *base.shape))
        seed = int(np.random.SeedSequence([self.seed, target.index]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        for i, factors in target.factors:
            # the delta as mergekit sees it: (W0 + s B A) - W0 in float32, so trimming picks the same entries
            delta = (base + factors.delta()) - base
            deltas[i] = self.method.sparsify(delta, self.density, generator) if self.method.sparsify else delta
        return deltas

    @torch.no_grad()
    def merged_weight(self, target: _Target, weights: torch.Tensor) -> torch.Tensor:
        """The merged float32 value of one target weight for per-expert `weights` [E]."""
        if self.method.low_rank:
            rows = weights[target.rank_owner] * target.scales
            return torch.addmm(target.base.float(), target.b, target.a * rows[:, None])
        deltas = target.deltas if target.deltas is not None else self._dense_deltas(target)
        return self.method.combine(target.base.float(), deltas, weights)

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
