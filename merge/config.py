"""The `search` section of a run config (stage 2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sentimerge.curriculum.config import check_polarities
from sentimerge.pipeline.core.tasks import WHEN_SET, Frozen


class WeakConfig(Frozen):
    """The weak-label set every candidate is scored on.

    Rule: per task, `per_task` rows are drawn (seeded) from `split`. From the train split, rows the task's expert
    trained on are excluded when the expert lists them in `<run>/experts/<task>/train_ids.json`; the dev split is
    never used (it is for gold reporting).
    """

    per_task: int = Field(32, ge=4, description="weak-labelled examples per task")
    split: Literal["train", "test"] = "train"
    labeller: str = Field("expert", description="weak labeller for every task: expert, lexicon or gold")
    labellers: dict[str, str] = Field(default_factory=dict, description="task -> labeller, overriding `labeller`")
    references: bool = Field(
        True, json_schema_extra=WHEN_SET,
        description="score the base model and each expert alone on the weak set, beside the merge baselines (what "
                    "`sentimerge inspect` shows of them: no choice of the search uses them, and the final tables "
                    "score them on gold either way); off, they are listed unscored (the demo: 4 of 8 baseline "
                    "scorings, 17 s). A multi-stage search's level-1 groups score their experts alone either way")
    weights: dict[str, float] = Field(default_factory=dict, description="task -> fitness weight (default 1)")
    label_polarity: dict[str, float] = Field(
        default_factory=dict, description="label -> polarity in [-1, 1] for the lexicon labeller, where VADER's own "
                                          "score of the label word is no guide (bearish: -1, bullish: 1) or gives two "
                                          "labels the same sign (very negative: -1, negative: -0.5)")

    @field_validator("labeller")
    @classmethod
    def _known_labeller(cls, value: str) -> str:
        return _registered("labeller", value)

    @field_validator("labellers")
    @classmethod
    def _known_labellers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value.values():
            _registered("labeller", name)
        return value

    @field_validator("label_polarity")
    @classmethod
    def _polarity_range(cls, value: dict[str, float]) -> dict[str, float]:
        return check_polarities(value)

    @field_validator("weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(task for task, weight in value.items() if not weight > 0)
        if bad:
            raise ValueError(f"task weights must be positive: {bad}")
        return value


class GoldConfig(Frozen):
    """Gold scoring: each generation's best on a dev sample, and the final tables (the search's, the export's and
    `sentimerge run`'s results) on the evaluation splits."""

    per_generation: int = Field(48, ge=0, description="dev examples per task for each generation's best (0: off)")
    final: int | None = Field(None, ge=1, description="examples per task in each split's final table (a seeded "
                                                     "sample; default: all)")
    experts: Literal["all", "own"] = Field(
        "all", json_schema_extra=WHEN_SET,
        description="the final tables score each expert on every task (all: how much it transfers) or on its own "
                    "task only (own: a third of the experts' scoring with 3 tasks; their mean is then blank, and the "
                    "weak-vs-gold Spearman is over the models scored on every task)")
    splits: tuple[Literal["dev", "test"], ...] | None = Field(
        None, min_length=1, json_schema_extra=WHEN_SET,
        description="the splits of the final tables (default: dev and, where every task has one, test); [test] "
                    "leaves out dev's tables (the demo: the scoring of 7 models on 450 examples), [dev] test's. "
                    "`sentimerge report` compares its variants on dev and needs it")

    @field_validator("splits")
    @classmethod
    def _distinct(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"each split once, got {list(value)}")
        return None if value is None else tuple(sorted(value))  # dev first, as the tables are written


class SelectConfig(Frozen):
    """Which candidate becomes the evolved merge.

    CMA-ES's best on the weak set is biased upward: it was picked among many candidates on the same few examples
    (the winner's curse). The `top` best candidates and the start point are scored again on a held-out weak set of
    `per_task` examples per task (same sampling pool and labeller, disjoint from the weak set); the best there is the
    evolved merge (the first of equal ones, in order of weak fitness, the start point last). When the weak set took
    every row a task has left, there is no held-out set: a warning, and the best on the weak set is chosen.
    """

    top: int = Field(5, ge=0, description="candidates re-scored on the held-out set (0: the best on the weak set)")
    per_task: int = Field(64, ge=4, description="held-out weak-labelled examples per task")


class SearchConfig(Frozen):
    """How stage 2 searches layer-wise merge coefficients with CMA-ES."""

    method: str = Field("task_arithmetic", description="merge method searched (see merge.methods)")
    density: float = Field(0.5, gt=0, le=1, description="ties/dare: share of each delta kept")
    layer_group_size: int = Field(6, ge=1, description="layers sharing one coefficient (1: every layer)")
    split_attention_mlp: bool = Field(False, description="separate coefficients for attention and MLP")
    bounds: tuple[float, float] = Field((0.0, 1.5), description="coefficient range; below 0 allowed if asked")
    init: float | Literal["auto", "hybrid"] = Field(
        1.0, description="start point of every coefficient, also the uniform baseline's weight; `auto`: the value of "
                         "`init_grid` whose uniform merge scores best on the weak set; `hybrid` (with experts.mode "
                         "hybrid): the per-layer coefficients of the Hybrid LoRA attention, uniform chosen as with "
                         "`auto`")
    init_grid: tuple[float, ...] = Field((0.125, 0.25, 0.5, 0.75, 1.0), min_length=1,
                                         description="uniform coefficients tried when `init` is auto")
    sigma0: float = Field(0.2, gt=0, description="CMA-ES initial step size")
    population: int = Field(8, ge=2)
    generations: int = Field(8, ge=1)
    seed: int | None = Field(None, ge=0, description="default: the run's seed")
    failure_penalty: float = Field(-2.0, description="fitness of a candidate whose merge or scoring fails")
    batch_size: int = Field(32, ge=1)
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="the resident scoring copy")
    compile: bool = Field(True, description="torch.compile the searched dense method's combine (ties, dare): one "
                                            "fused pass per weight; eager, with a warning, where compiling fails")
    export: bool = Field(True, description="write the best merge to <run>/search/merged (stage 3 starts there)")
    writer: Literal["mergekit", "in_memory"] = Field(
        "mergekit", json_schema_extra=WHEN_SET,
        description="who writes <run>/search/merged: mergekit runs the recipe (and the search measures its distance "
                    "to the in-memory merge); in_memory saves the in-memory merge with transformers, equal to "
                    "mergekit's output (tested) without mergekit's peak memory (3.1 GB for 3 experts on "
                    "SmolLM2-135M: it writes each LoRA merge in float32)")
    weak: WeakConfig = WeakConfig()
    gold: GoldConfig = GoldConfig()
    select: SelectConfig = SelectConfig()
    stages: Literal["flat", "groups"] = Field(
        "flat", json_schema_extra=WHEN_SET,
        description="flat: one CMA-ES over every expert; groups: MEM-MCL's multi-stage merge (merge/stages.py), one "
                    "CMA-ES per task group of two experts or more, then one over the group models (`generations`)")
    groups: dict[str, list[str]] = Field(
        default_factory=dict, json_schema_extra=WHEN_SET,
        description="stages groups: group -> tasks, overriding the tasks' `group` field (every task in one group)")
    group_generations: int = Field(3, ge=1, json_schema_extra=WHEN_SET,
                                   description="stages groups: CMA-ES generations of each level-1 group search")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _registered("method", value)

    @model_validator(mode="after")
    def _stages(self) -> SearchConfig:
        if self.stages == "groups" and self.method != "task_arithmetic":
            raise ValueError("search.stages groups composes the two levels as products of task-arithmetic "
                             f"coefficients; method {self.method!r} does not compose: use task_arithmetic")
        if self.groups and self.stages != "groups":
            raise ValueError("search.groups is read with search.stages: groups")
        if self.stages == "groups" and not self.bounds[0] <= 1.0 <= self.bounds[1]:
            raise ValueError(f"search.stages groups starts level 2 at 1 (the group models as found): bounds "
                             f"{list(self.bounds)} must include it")
        return self

    @model_validator(mode="after")
    def _bounds(self) -> SearchConfig:
        low, high = self.bounds
        if not low < high:
            raise ValueError(f"bounds must be [low, high] with low < high (got {list(self.bounds)})")
        starts = self.init_grid if self.init in ("auto", "hybrid") else (self.init,)
        outside = [value for value in starts if not low <= value <= high]
        if outside:
            raise ValueError(f"init {outside[0]} is outside bounds {list(self.bounds)}")
        return self


def _registered(kind: str, name: str) -> str:
    """Check `name` against its registry (imported here: the registries import torch)."""
    if kind == "method":
        from sentimerge.merge.methods import METHODS as registry
    else:
        from sentimerge.merge.labellers import LABELLERS as registry
    problem = registry.problem(name)
    if problem:
        raise ValueError(problem)
    return name
