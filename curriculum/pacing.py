"""Pacing functions: the share of the examples, easiest first, that the sampler may draw from at a step.

Competence-based curriculum (Platanios et al., 2019): competence c(t) grows from `start` at step 0 to 1 at the step
`full_at * total`, and stays 1 after. `none` keeps c = 1, which is plain random order over the whole pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from sentimerge.pipeline.core.registry import Registry

PacingFunction = Callable[[float, float], float]
"""(progress in [0, 1] of the ramp, start competence) -> competence in [start, 1]."""

PACINGS: Registry[PacingFunction] = Registry("pacing function")


@PACINGS.register("linear")
def linear(progress: float, start: float) -> float:
    return start + (1.0 - start) * progress


@PACINGS.register("sqrt")
def square_root(progress: float, start: float) -> float:
    """Grows fast at first and slowly later: hard examples arrive sooner than with `linear`."""
    return math.sqrt(start ** 2 + (1.0 - start ** 2) * progress)


@PACINGS.register("none")
def no_curriculum(progress: float, start: float) -> float:
    return 1.0


def competence(pacing: str, step: int, total_steps: int, *, start: float, full_at: float) -> float:
    """The competence at `step` (0-based) of a run of `total_steps` steps."""
    ramp = max(1.0, full_at * total_steps)
    progress = min(1.0, step / ramp)
    return min(1.0, max(start if pacing != "none" else 1.0, PACINGS.get(pacing)(progress, start)))


def task_shares(competence_value: float, tasks: int) -> list[float]:
    """Each task's share of a batch, in [0, 1], at a competence in [0, 1], for `tasks` tasks ranked easiest first:
    task r (0-based) enters when the competence reaches r / k and has its full share at (r + 1) / k, so at
    competence 1 every task has a full share. The easiest task always has a full share."""
    k = tasks
    return [1.0 if rank == 0 else min(1.0, max(0.0, competence_value * k - rank)) for rank in range(k)]


def batch_counts(shares: list[float], size: int) -> list[int]:
    """`size` batch slots split in proportion to `shares` (largest remainder, ties to the earlier task), so the
    counts always add up to `size`; a share of 0 gets no slot."""
    total = sum(shares)
    exact = [size * share / total for share in shares]
    counts = [int(value) for value in exact]
    remainders = sorted((i for i in range(len(shares)) if shares[i] > 0), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in remainders[:size - sum(counts)]:
        counts[i] += 1
    return counts
