"""The `experts.curriculum` section: which difficulty signals count how much, and how fast hard examples arrive."""

from __future__ import annotations

from pydantic import Field, field_validator

from sentimerge.curriculum.pacing import PACINGS
from sentimerge.curriculum.signals import SIGNALS, TASK_SIGNALS
from sentimerge.pipeline.core.tasks import Frozen


class CurriculumConfig(Frozen):
    """Difficulty = weighted mean of rank-normalised signals; a pacing function opens the pool easiest first."""

    signals: dict[str, float] = Field(
        default_factory=lambda: {"agreement": 1.0, "length": 0.5, "rarity": 0.5, "lexicon": 1.0, "base_loss": 1.0},
        description="example difficulty signal -> weight (0 turns it off); signals that do not apply are skipped")
    task_signals: dict[str, float] = Field(
        default_factory=lambda: {"labels": 1.0, "regression": 1.0, "length": 1.0, "zero_shot": 1.0},
        description="task difficulty signal -> weight; the task's difficulty is recorded with its expert")
    pacing: str = Field("sqrt", description="competence function: linear, sqrt, or none (random order)")
    start: float = Field(0.25, gt=0, le=1, description="competence at step 0: the easiest share drawn from first")
    full_at: float = Field(0.7, gt=0, le=1, description="share of the budget after which every example is available")
    stratify: bool = Field(True, description="open the pool easiest-first within each answer (label, or level of a "
                                              "regression task), so that every answer is in play from the first "
                                              "step; off: one easiest-first order over the whole pool")
    pool: int | None = Field(1000, ge=1, description="difficulty is computed on a seeded sample of this many training "
                                                      "examples, which training draws from (default all)")
    label_polarity: dict[str, float] = Field(
        default_factory=dict, description="label -> polarity in [-1, 1] for the lexicon signal, where VADER's own "
                                          "score of the label word is no guide (e.g. bearish: -1, bullish: 1)")

    @field_validator("signals")
    @classmethod
    def _known_signals(cls, value: dict[str, float]) -> dict[str, float]:
        return _check(SIGNALS, value)

    @field_validator("task_signals")
    @classmethod
    def _known_task_signals(cls, value: dict[str, float]) -> dict[str, float]:
        return _check(TASK_SIGNALS, value)

    @field_validator("pacing")
    @classmethod
    def _known_pacing(cls, value: str) -> str:
        return check_pacing(value)

    @field_validator("label_polarity")
    @classmethod
    def _polarity_range(cls, value: dict[str, float]) -> dict[str, float]:
        return check_polarities(value)


def check_pacing(value: str) -> str:
    """A registered pacing function's name (`curriculum.pacing.PACINGS`)."""
    if value not in PACINGS:
        raise ValueError(PACINGS.problem(value))
    return value


def check_polarities(value: dict[str, float]) -> dict[str, float]:
    """A `label_polarity` map: every polarity in [-1, 1]."""
    bad = [label for label, polarity in value.items() if not -1.0 <= polarity <= 1.0]
    if bad:
        raise ValueError(f"polarities must lie in [-1, 1]: {', '.join(bad)}")
    return value


def _check(registry, weights: dict[str, float]) -> dict[str, float]:
    problems = [registry.problem(name) for name in weights if name not in registry]
    problems += [f"weight of {name!r} must be >= 0" for name, weight in weights.items() if weight < 0]
    if problems:
        raise ValueError("; ".join(problems))
    return weights


class TaskPacingConfig(Frozen):
    """Stage 3's task-level curriculum (`finetune.task_pacing`; MEM-MCL's easiest-first task order): tasks enter the
    multi-task batches in ascending task difficulty (the one each expert's manifest records), and a task's share of
    every batch grows from 0 to a full share as the competence passes its turn. Batches keep their size, so the
    budget in examples is unchanged. `pacing: none` (the default) puts every task in every batch from the start."""

    pacing: str = Field("none", description="competence function over the steps: linear, sqrt, or none (all tasks "
                                            "from step 0)")
    start: float = Field(0.0, ge=0, le=1, description="competence at step 0 (at least one task's turn, 1/k)")
    full_at: float = Field(0.5, gt=0, le=1, description="share of the steps after which every task has its full "
                                                        "share")

    @field_validator("pacing")
    @classmethod
    def _known_pacing(cls, value: str) -> str:
        return check_pacing(value)
