"""The CMA-ES loop over merge coefficients, with its state on disk.

Every scored candidate is appended to a JSON Lines log at once (flushed and synced). Resuming replays the log:
a fresh CMA-ES with the same seed asks for the same generations, logged candidates are told their logged fitness,
and only the candidates missing from the log are scored. CMA-ES draws its samples from its own seeded generator, so an
interrupted-then-resumed search asks for exactly the candidates an uninterrupted one does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import append_jsonl, read_jsonl

log = logging.getLogger("sentimerge.search")

Evaluate = Callable[[int, int, np.ndarray], dict]
# (generation, [(index, candidate), ...]) -> the rows, in the order given; a pool may score them in parallel
EvaluateMany = Callable[[int, list[tuple[int, np.ndarray]]], Iterator[dict]]
OnGeneration = Callable[[int, list[dict], float], None]


@dataclass(frozen=True)
class Strategy:
    """What decides the sequence of candidates: start point, step size, bounds, population and seed."""

    x0: np.ndarray
    sigma0: float
    bounds: tuple[float, float]
    population: int
    seed: int

    def create(self):
        import cma

        rng = np.random.default_rng(self.seed)
        options = {"bounds": list(self.bounds), "popsize": self.population, "seed": np.nan,
                   "randn": lambda *shape: rng.standard_normal(shape), "verbose": -9, "verb_log": 0,
                   "verb_disp": 0, "maxiter": 10**9}
        return cma.CMAEvolutionStrategy(self.x0.tolist(), self.sigma0, options)


def read_log(path: Path) -> list[dict]:
    """The logged candidates (none before the first); a torn last line (a crash while writing it) is left out."""
    return read_jsonl(path) if path.is_file() else []


def one_by_one(evaluate: Evaluate) -> EvaluateMany:
    """The local path: score the candidates in turn (lazily, so each is logged as soon as it is scored)."""
    return lambda generation, pending: (evaluate(generation, index, candidate) for index, candidate in pending)


def run_cma(strategy: Strategy, generations: int, evaluate: EvaluateMany, log_path: Path, *,
            on_generation: OnGeneration | None = None, max_evaluations: int | None = None,
            decode: Callable[[np.ndarray], np.ndarray] | None = None) -> bool:
    """Run (or resume) the search; True when every generation is done, False when `max_evaluations` stopped it.

    `evaluate` gets each generation's candidates that the log lacks and yields their rows in order; each row is
    appended to the log as it arrives. Local and parallel evaluators therefore write the same log. With `decode`,
    CMA-ES searches a smaller vector (a level of a multi-stage merge) and `evaluate` and the log get the flat genome
    `decode(x)` it stands for.
    """
    decode = decode or (lambda candidate: candidate)
    logged = {(row["generation"], row["index"]): row for row in read_log(log_path)}
    es = strategy.create()
    scored_now = 0
    for generation in range(generations):
        solutions = es.ask()
        decoded = [decode(np.asarray(candidate, dtype=float)) for candidate in solutions]
        pending = [(index, candidate) for index, candidate in enumerate(decoded) if (generation, index) not in logged]
        budget_left = None if max_evaluations is None else max_evaluations - scored_now
        fresh = evaluate(generation, pending[:budget_left] if budget_left is not None else pending)
        rows = []
        for index, candidate in enumerate(decoded):
            row = logged.get((generation, index))
            if row is None:
                if max_evaluations is not None and scored_now >= max_evaluations:
                    return False
                row = next(fresh)
                append_jsonl(log_path, row)
                scored_now += 1
            elif not np.array_equal(np.asarray(row["coefficients"], dtype=float), candidate):
                raise SentimergeError(f"{log_path}: generation {generation} candidate {index} differs from what "
                                      "CMA-ES asks now (was the log written with another seed or config?); use --force")
            rows.append(row)
        es.tell(solutions, [-row["fitness"] for row in rows])
        if on_generation is not None:
            on_generation(generation, rows, float(es.sigma))
    return True
