"""Multi-stage merging by task group (MEM-MCL: Inoshita, Zhou and Kawai, arXiv 2601.06780).

Level 1 merges each group of related tasks' experts into a group model with a CMA-ES of its own, scored on that
group's weak sets; level 2 merges the group models (a group of one task enters as its expert) with a CMA-ES over
per-layer coefficients of the group models' deltas, scored on every weak set. Groups enter in ascending difficulty.

With task arithmetic the levels compose exactly: a group model is W0 + sum_{i in g} c_i(l) delta_i, and the final
model W0 + sum_g w_g(l) (group model_g - W0) = W0 + sum_i w_{g(i)}(l) c_i(l) delta_i, a flat merge whose coefficient
of expert i in layer group l (and part) is the product. Each level's CMA-ES searches its own vector, and its
`decode` gives the flat genome it stands for: candidates are then scored, logged, selected, exported and written as
a mergekit recipe exactly like the flat search's (the recipe of the two-level merge is the flat recipe of the
products).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sentimerge.merge.genome import Genome

Decode = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GroupPlan:
    """The task groups in the order they enter (ascending mean difficulty, then name), each with its experts."""

    groups: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.groups]

    def searched(self) -> list[tuple[str, tuple[str, ...]]]:
        """The groups merged at level 1: those of two experts or more."""
        return [(name, experts) for name, experts in self.groups if len(experts) > 1]


def group_plan(experts: list[str], group_of: dict[str, str], difficulty: dict[str, float]) -> GroupPlan:
    """Groups of `experts` by `group_of` (expert -> group), ordered by the mean of their experts' `difficulty`
    (missing: 0), then by name; experts keep their order within a group."""
    members: dict[str, list[str]] = {}
    for expert in experts:
        members.setdefault(group_of[expert], []).append(expert)
    mean = {name: float(np.mean([difficulty.get(e, 0.0) for e in group])) for name, group in members.items()}
    order = sorted(members, key=lambda name: (mean[name], name))
    return GroupPlan(tuple((name, tuple(members[name])) for name in order))


def level_one(genome: Genome, experts: tuple[str, ...]) -> tuple[int, Decode]:
    """The size of a group's level-1 vector (its experts' coefficients per layer group and part) and its decoder to
    the flat genome (every other expert at 0)."""
    rows = [genome.experts.index(expert) for expert in experts]
    shape = (len(genome.experts), genome.groups, len(genome.parts))

    def decode(vector: np.ndarray) -> np.ndarray:
        grid = np.zeros(shape)
        grid[rows] = np.asarray(vector, dtype=float).reshape(len(rows), *shape[1:])
        return grid.reshape(-1)

    return len(rows) * genome.groups * len(genome.parts), decode


def restrict(genome: Genome, flat: np.ndarray, experts: tuple[str, ...]) -> np.ndarray:
    """The level-1 vector of `experts` read from a flat genome (the inverse of `level_one`'s decoder)."""
    grid = np.asarray(flat, dtype=float).reshape(len(genome.experts), genome.groups, len(genome.parts))
    return grid[[genome.experts.index(expert) for expert in experts]].reshape(-1)


def level_two(genome: Genome, plan: GroupPlan, group_models: dict[str, np.ndarray]) -> tuple[int, Decode]:
    """The size of the level-2 vector (one coefficient per group, layer group and part) and its decoder: each
    group's level-1 flat genome (`group_models[group]`; a group of one expert: that expert at 1) scaled per layer
    group and part by the group's coefficient, summed over the groups."""
    shape = (len(genome.experts), genome.groups, len(genome.parts))
    inner = []
    for name, experts in plan.groups:
        model = group_models.get(name)
        if model is None:
            if len(experts) != 1:
                raise ValueError(f"group {name}: no level-1 merge of its {len(experts)} experts")
            model = genome.one_hot(experts[0])
        inner.append(np.asarray(model, dtype=float).reshape(shape))

    def decode(vector: np.ndarray) -> np.ndarray:
        weights = np.asarray(vector, dtype=float).reshape(len(inner), 1, *shape[1:])
        return sum(grid * weights[g] for g, grid in enumerate(inner)).reshape(-1)

    return len(inner) * genome.groups * len(genome.parts), decode
