"""The search space: one coefficient per expert per layer group (optionally per attention/MLP half).

A genome is a flat vector ordered expert-major, then layer group, then part: `x[(e * groups + g) * parts + p]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PARTS_SPLIT = ("attention", "mlp")
PARTS_JOINT = ("all",)


@dataclass(frozen=True)
class Genome:
    experts: tuple[str, ...]
    num_layers: int
    group_size: int
    split_attention_mlp: bool = False

    @property
    def groups(self) -> int:
        return math.ceil(self.num_layers / self.group_size)

    @property
    def parts(self) -> tuple[str, ...]:
        return PARTS_SPLIT if self.split_attention_mlp else PARTS_JOINT

    @property
    def size(self) -> int:
        return len(self.experts) * self.groups * len(self.parts)

    def filled(self, value: float) -> np.ndarray:
        return np.full(self.size, float(value))

    def one_hot(self, expert: str, value: float = 1.0) -> np.ndarray:
        """Only `expert`, at `value`, in every layer: the expert alone."""
        grid = np.zeros((len(self.experts), self.groups, len(self.parts)))
        grid[self.experts.index(expert)] = value
        return grid.reshape(-1)

    def layer_coefficients(self, genome: np.ndarray) -> np.ndarray:
        """[experts, layers, parts]: each layer's coefficient, expanded from its group's."""
        genome = np.asarray(genome, dtype=float)
        if genome.shape != (self.size,):
            raise ValueError(f"genome has shape {genome.shape}, expected ({self.size},)")
        grid = genome.reshape(len(self.experts), self.groups, len(self.parts))
        return grid[:, [layer // self.group_size for layer in range(self.num_layers)], :]

    def part_index(self, part: str) -> int:
        return 0 if not self.split_attention_mlp else PARTS_SPLIT.index(part)

    def labels(self) -> list[str]:
        """A readable name per genome entry, e.g. `polarity/L0-5/mlp`."""
        names = []
        for expert in self.experts:
            for group in range(self.groups):
                first, last = group * self.group_size, min(self.num_layers, (group + 1) * self.group_size) - 1
                for part in self.parts:
                    names.append(f"{expert}/L{first}-{last}" + ("" if part == "all" else f"/{part}"))
        return names
