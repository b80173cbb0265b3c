"""The curriculum sampler: batches drawn from the easiest `competence` share of the pool, with little padding.

With strata (the answer of each example), the easiest share is taken within each stratum: an easiest-first order
over the whole pool tends to open with one answer only (the majority class is the easiest by base-model loss and
rarity), which teaches a constant answer first; measured on the suite, that left 4 of 8 experts below zero-shot.

Every `bucket` steps the sampler takes `bucket * batch_size` examples from the available prefix of the
easiest-first order (least-used first, ties broken at random, so nothing repeats before the available examples are
used up), sorts them by length and cuts them into batches of similar length, served in a random order. With the
`none` pacing the prefix is the whole pool, which makes it plain random order with the same batching. Its whole
state is JSON, so an interrupted run resumes with the same batches.
"""

from __future__ import annotations

import math

import numpy as np

from sentimerge.curriculum.pacing import competence


class CurriculumSampler:
    def __init__(self, order: np.ndarray, lengths: list[int], *, batch_size: int, total_steps: int, pacing: str,
                 start: float, full_at: float, bucket: int, seed: int, strata: list[int] | None = None):
        """`strata` (one per pool example, e.g. its answer): open each stratum's easiest share, not the pool's."""
        self.order = np.asarray(order, dtype=int)
        self.strata = None if strata is None else np.asarray(strata)[self.order]  # in difficulty order
        self.lengths = np.asarray(lengths, dtype=int)
        self.batch_size, self.total_steps, self.bucket = batch_size, total_steps, bucket
        self.pacing, self.start, self.full_at = pacing, start, full_at
        self.rng = np.random.default_rng(seed)
        self.uses = np.zeros(len(self.order), dtype=int)
        self.pending: list[dict] = []

    def competence(self, step: int) -> float:
        return competence(self.pacing, step, self.total_steps, start=self.start, full_at=self.full_at)

    def next_batch(self, step: int) -> dict:
        """{"indices": pool indices of the batch, "competence": c, "available": size of the prefix drawn from}."""
        if not self.pending:
            self._refill(step)
        return self.pending.pop(0)

    def _refill(self, step: int) -> None:
        level = self.competence(step)
        available = min(len(self.order), max(self.batch_size, math.ceil(level * len(self.order))))
        candidates = self.order[:available] if self.strata is None else self._stratified(level, available)
        available = len(candidates)
        count = max(self.batch_size, min(self.bucket * self.batch_size, available) // self.batch_size * self.batch_size)
        tie_break = self.rng.random(available)
        chosen = candidates[np.lexsort((tie_break, self.uses[candidates]))[:count]]
        if len(chosen) < count:  # a pool smaller than one batch: repeat examples
            chosen = np.resize(chosen, count)
        self.uses[chosen] += 1
        chosen = chosen[np.argsort(self.lengths[chosen], kind="stable")]
        batches = [chosen[i:i + self.batch_size] for i in range(0, count, self.batch_size)]
        for position in self.rng.permutation(len(batches)):
            self.pending.append({"indices": [int(i) for i in batches[position]], "competence": round(level, 6),
                                 "available": int(available)})

    def _stratified(self, level: float, at_least: int) -> np.ndarray:
        """The easiest `level` share of every stratum (at least one each), in difficulty order; topped up with the
        easiest of the rest when that is fewer than `at_least`."""
        open_ = np.zeros(len(self.order), dtype=bool)
        for stratum in np.unique(self.strata):
            positions = np.flatnonzero(self.strata == stratum)
            open_[positions[:max(1, math.ceil(level * len(positions)))]] = True
        missing = at_least - int(open_.sum())
        if missing > 0:
            open_[np.flatnonzero(~open_)[:missing]] = True
        return self.order[open_]

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "uses": self.uses.tolist(), "pending": self.pending}

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.uses = np.asarray(state["uses"], dtype=int)
        self.pending = [dict(batch) for batch in state["pending"]]
