"""The run config: one YAML file, validated once into frozen typed models.

Paths that point at inputs (data files, a local model, a tasks file, the data root) are relative to the file that
names them; `run_dir` and `cache_dir` are relative to the working directory.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from sentimerge.curriculum.config import TaskPacingConfig
from sentimerge.experts.config import ExpertsConfig, LoraSettings
from sentimerge.merge.config import SearchConfig
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.tasks import WHEN_SET, Frozen, PypiFile, TaskList, TaskSpec, check_unique_names


class TinyModel(Frozen):
    """A randomly initialised Llama with a tokenizer trained on the run's own texts (tests, smoke runs)."""

    num_layers: int = Field(2, ge=1)
    hidden_size: int = Field(64, ge=8)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    vocab_size: int = Field(512, ge=300)
    seed: int = Field(0, ge=0)


class ModelSpec(Frozen):
    """The base model: exactly one of a local HF directory, a hub id, a GGUF file in a PyPI package, or tiny."""

    path: str | None = None
    hub: str | None = None
    revision: str | None = None
    gguf: PypiFile | None = None
    tiny: TinyModel | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [name for name in ("path", "hub", "gguf", "tiny") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hub, gguf, tiny (got {', '.join(given) or 'none'})")
        return self


class EvaluateConfig(Frozen):
    """How `sentimerge evaluate` scores: batch size, split and an optional per-task cap."""

    split: Literal["train", "dev", "test"] = "dev"
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1, description="score at most this many examples per task (seeded sample)")


class WeightingSettings(Frozen):
    """Which task-weighting strategy stage 3 uses (pipeline/weighting.py), with its options."""

    name: str = "dao"
    options: dict[str, float] = Field(default_factory=dict, description="keyword arguments of the strategy")
    grad_norm_every: int = Field(1, ge=1, description="steps between per-task gradient-norm measurements (dao)")

    @model_validator(mode="after")
    def _known(self) -> WeightingSettings:
        from sentimerge.pipeline.core.weighting import WEIGHTINGS

        problem = WEIGHTINGS.problem(self.name)
        if problem:
            raise ValueError(problem)
        return self


class DistillSettings(Frozen):
    """Knowledge distillation from the task experts in stage 3 (`finetune.distill`), the way BAM trains one multi-task
    model from single-task teachers (Clark, Luong, Khandelwal, Manning and Le, "BAM! Born-Again Multi-Task Networks
    for Natural Language Understanding", ACL 2019, arXiv 1907.04829). Each training example's target is a mix of its
    gold answer and its task's expert's next-token distribution at every answer token (on the experts' base, the
    expert's own LoRA): loss = (1 - s) x cross-entropy + s x T^2 x KL(expert_T || model_T), where _T is the softmax
    at temperature T over the whole vocabulary and s the teacher's share. With `anneal: linear` (BAM's teacher
    annealing) s falls from `weight` at the first step to 0 at the last, so the model starts by imitating the experts
    and ends on the gold labels. The teachers score the examples the step trains on: no training examples are added,
    one no-gradient forward of the batch per step is (every row through its own expert's adapter). Regression tasks
    distil their answer levels' tokens the same way; with `regression_loss: expected_mse` their rows keep that loss
    alone."""

    weight: float = Field(0.0, ge=0, le=1, description="the teacher's share of each example's target at the first "
                                                       "step (0: off)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions in the KL term")
    anneal: Literal["linear", "none"] = Field("linear", description="`linear`: the share falls to 0 at the last "
                                                                    "step (teacher annealing); `none`: constant")


class FinetuneConfig(Frozen):
    """Stage 3: multi-task LoRA fine-tuning of the merged model with dynamic task weights."""

    start: Literal["merged", "base"] = Field("merged", description="fine-tune stage 2's merged model, or the base")
    init: Literal["fresh", "experts"] = Field(
        "fresh", json_schema_extra=WHEN_SET,
        description="stage 3's LoRA: `fresh` (lora.r, seeded) on the merged model, or `experts`: the merge itself "
                    "as the LoRA to train, the experts' factors stacked and scaled by the chosen coefficients "
                    "(rank: the sum of theirs, scale lora.alpha / lora.r) on the experts' base, so every expert's "
                    "module keeps training on all tasks (needs start: merged, LoRA experts, search.method "
                    "task_arithmetic)")
    lora: LoraSettings = LoraSettings()
    weighting: WeightingSettings = WeightingSettings()
    steps: int = Field(60, ge=1)
    per_task: int = Field(2, ge=1, description="examples of every task in each step's batch")
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    autocast: bool = True
    dev_examples: int | None = Field(100, ge=1, description="dev sample per task for the periodic evaluation")
    evaluations: int = Field(2, ge=1)
    keep: Literal["last", "best"] = "last"
    checkpoint_every: int = Field(20, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    seed: int | None = Field(None, ge=0, json_schema_extra=WHEN_SET,
                             description="training seed (LoRA init, batch order, dropout); default the run's. The dev "
                                         "sample stays the run's")
    regression_loss: str = Field("level_ce", json_schema_extra=WHEN_SET,
                                 description="training loss of regression tasks (experts/losses.py): level_ce, "
                                             "expected_mse, or level_ce+expected_mse")
    mse_weight: float = Field(1.0, ge=0, json_schema_extra=WHEN_SET,
                              description="weight of expected_mse in level_ce+expected_mse")
    task_pacing: TaskPacingConfig = Field(TaskPacingConfig(), json_schema_extra=WHEN_SET,
                                          description="tasks enter the batches easiest first (off by default)")
    distill: DistillSettings = Field(DistillSettings(), json_schema_extra=WHEN_SET,
                                     description="distillation from the task experts (off by default)")

    @field_validator("regression_loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        from sentimerge.experts.losses import REGRESSION_LOSSES

        problem = REGRESSION_LOSSES.problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @property
    def total_steps(self) -> int:
        return self.steps


class ExportConfig(Frozen):
    """The single checkpoint users take away."""

    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    source: Literal["finetune", "search"] = Field("finetune", description="export stage 3's model or stage 2's merge")


class RayConfig(Frozen):
    """Where and with what resources the Ray backend runs (`backend: ray`; needs `pip install sentimerge[ray]`)."""

    address: str | None = Field(None, description="a running cluster (`auto`, `ray://host:10001`); "
                                                   "default: start a local Ray on this machine")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray started when `address` is unset")
    cpus_per_expert: float = Field(1.0, gt=0, description="stage 1: CPUs each expert's training task asks for")
    gpus_per_expert: float = Field(0.0, ge=0, description="stage 1: GPUs each expert's training task asks for")
    actors: int | None = Field(None, ge=1, description="stage 2: scoring actors (default: as many as fit)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    retries: int = Field(1, ge=0, description="stage 2: a candidate whose actor died is retried this many times on a "
                                               "fresh actor, then logged as failed with the penalty")


class RunConfig(Frozen):
    """Everything one run needs: base model, tasks, and one section per stage."""

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0)
    data_seed: int | None = Field(
        None, ge=0, json_schema_extra=WHEN_SET,
        description="seed of the data: carved splits, capped samples and the evaluation samples (final tables, dev "
                    "samples); default: `seed`. Fix it to train with several seeds on the same examples")
    run_dir: str | None = Field(None, description="default: runs/<name>")
    cache_dir: str | None = Field(None, description="default: $SENTIMERGE_CACHE or ~/.cache/sentimerge")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="attention kernel of every model the run loads; auto: eager on CPU (faster there for "
                            "short prompts), transformers' default (sdpa) on GPU")
    base_model: ModelSpec
    data_root: str | None = None
    tasks: list[TaskSpec] = Field(min_length=1)
    evaluate: EvaluateConfig = EvaluateConfig()
    experts: ExpertsConfig = ExpertsConfig()
    search: SearchConfig = SearchConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    export: ExportConfig = ExportConfig()
    backend: Literal["local", "ray"] = Field("local", description="where stage 1 trains and stage 2 scores")
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        """What one section asks of another: unique tasks, given experts and groups naming them, unlabelled pools."""
        check_unique_names(self.tasks)
        unknown = [name for name in self.experts.given if name not in {task.name for task in self.tasks}]
        if unknown:
            raise ValueError(f"experts.given: no task named {', '.join(map(repr, unknown))} (tasks: "
                             f"{', '.join(task.name for task in self.tasks)})")
        for task in self.tasks:
            if not task.source.unlabelled_train:
                continue
            if task.name not in self.experts.given:
                raise ValueError(f"task {task.name}: source.unlabelled_train, but stage 1 would train its expert on "
                                 "those labels: give its expert (experts.given)")
            if self.search.weak.labellers.get(task.name, self.search.weak.labeller) == "gold":
                raise ValueError(f"task {task.name}: source.unlabelled_train has no gold labels for the weak set: use "
                                 "the expert or lexicon labeller")
        if self.search.groups:
            listed = [name for members in self.search.groups.values() for name in members]
            names = [task.name for task in self.tasks]
            wrong = sorted({n for n in listed if n not in names} | {n for n in names if listed.count(n) != 1})
            if wrong:
                raise ValueError(f"search.groups must put every task in exactly one group ({', '.join(wrong)})")
        if self.search.init == "hybrid" and self.experts.mode != "hybrid":
            raise ValueError("search.init hybrid starts from the Hybrid LoRA attention: set experts.mode: hybrid")
        if self.finetune.init == "experts":
            if self.finetune.start != "merged":
                raise ValueError("finetune.init experts starts stage 3 as stage 2's merge: set finetune.start: merged")
            if self.search.method != "task_arithmetic":
                raise ValueError(f"finetune.init experts needs a merge that is a sum of the experts' LoRA factors "
                                 f"(search.method task_arithmetic), not {self.search.method}")
        return self

    @property
    def resolved_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.default_cache_dir()

    @staticmethod
    def default_cache_dir() -> Path:
        return Path(os.environ.get("SENTIMERGE_CACHE") or Path.home() / ".cache" / "sentimerge")

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"no task named {name!r}{suggest(name, [t.name for t in self.tasks])}")


def load_config(path: str | Path, *, data_root: str | None = None, run_dir: str | None = None) -> RunConfig:
    """Read and validate a run config; `data_root` and `run_dir` override the file's values."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = dict(raw)
    if isinstance(raw.get("tasks"), str):
        tasks_path = _relative_to(path, raw["tasks"])
        task_list = load_tasks_file(tasks_path)
        raw["tasks"] = list(task_list.tasks)
        if task_list.data_root is not None and "data_root" not in raw:
            raw["data_root"] = task_list.data_root
    elif isinstance(raw.get("tasks"), list):
        raw["tasks"] = [_resolve_task_paths(path, task) for task in raw["tasks"]]
    if isinstance(raw.get("data_root"), str) and not (data_root is not None):
        raw["data_root"] = str(_relative_to(path, raw["data_root"]))
    if data_root is not None:
        raw["data_root"] = str(Path(data_root).absolute())
    if run_dir is not None:
        raw["run_dir"] = str(run_dir)
    given = raw.get("experts", {}).get("given") if isinstance(raw.get("experts"), dict) else None
    if isinstance(given, dict):  # local expert folders are relative to this file, like every input path
        raw["experts"] = {**raw["experts"], "given": {
            task: {**source, **{key: str(_relative_to(path, source[key])) for key in ("path", "checkpoint")
                                if isinstance(source.get(key), str)}} if isinstance(source, dict) else source
            for task, source in given.items()}}
    if isinstance(raw.get("base_model"), dict) and isinstance(raw["base_model"].get("path"), str):
        raw["base_model"] = {**raw["base_model"], "path": str(_relative_to(path, raw["base_model"]["path"]))}
    return _validate(RunConfig, raw, path)


def load_tasks_file(path: str | Path) -> TaskList:
    """Read and validate a tasks file (a YAML mapping with `tasks:` and optionally `data_root:`).

    A run config is accepted too: its `tasks` and `data_root` are used.
    """
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or "tasks" not in raw:
        raise ConfigError(f"{path}: expected a mapping with a `tasks` list")
    if isinstance(raw["tasks"], str):
        return load_tasks_file(_relative_to(path, raw["tasks"]))
    tasks = raw["tasks"]
    if isinstance(tasks, list):
        tasks = [_resolve_task_paths(path, task) for task in tasks]
    data_root = raw.get("data_root")
    if isinstance(data_root, str):
        data_root = str(_relative_to(path, data_root))
    return _validate(TaskList, {"tasks": tasks, "data_root": data_root}, path)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, written next to every stage's output; `load_config` reads it back to an equal
    config (an experts budget given as `steps` is written without the unused `examples` default, which the two
    together would be refused)."""
    dumped = config.model_dump(mode="json")
    if isinstance(dumped.get("experts"), dict) and dumped["experts"].get("steps") is not None:
        dumped["experts"].pop("examples", None)
    return yaml.safe_dump(dumped, sort_keys=False, allow_unicode=True)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None


def _relative_to(config_path: Path, value: str) -> Path:
    candidate = Path(os.path.expanduser(value))
    return candidate if candidate.is_absolute() else (config_path.parent / candidate).resolve()


def _resolve_task_paths(config_path: Path, task: Any) -> Any:
    """Make a task's local data path absolute, relative to the file that names it (one that starts with
    `{data_root}` is relative to the data root instead; `{task}/{split}.jsonl` to the file, not the working folder)."""
    if not isinstance(task, dict) or not isinstance(task.get("source"), dict):
        return task
    source = dict(task["source"])
    path = source.get("path")
    if isinstance(path, str) and not path.startswith("{data_root}") and not Path(path).is_absolute():
        source["path"] = str((config_path.parent / path).resolve())
    return {**task, "source": source}


def _validate(model: type[BaseModel], raw: dict, path: Path):
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(model, raw, item) for item in error.errors()]
        raise ConfigError("\n".join(f"{path}: {problem}" for problem in problems)) from None


def _describe(model: type[BaseModel], raw: dict, item: dict) -> str:
    loc = item["loc"]
    key = _key_path(raw, loc)
    if item["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        return f"{key}: unknown key{suggest(str(loc[-1]), known)}"
    if item["type"] == "missing":
        return f"{key}: required key is missing"
    message = item["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" if key else message


def _key_path(raw: Any, loc: tuple) -> str:
    """`tasks[2](sst5).source.path`-style key path, naming tasks where the raw data lets us."""
    parts: list[str] = []
    node = raw
    for part in loc:
        if isinstance(part, int):
            name = node[part].get("name") if isinstance(node, list) and part < len(node) and isinstance(node[part], dict) else None
            parts[-1] += f"[{part}]" + (f"({name})" if name else "")
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            if not _is_field_name(part):  # pydantic's union/tag labels, not keys of the file
                continue
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)


def _is_field_name(part: str) -> bool:
    return not any(ch in part for ch in "[]() ,")


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model reached by walking `loc` from `model` (for suggestions)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        current = _model_in(field.annotation) if field else None
    return list(current.model_fields) if current else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if known else ""


def positive_int(text: str) -> int:
    """argparse type of a count option (`--batch-size`, `--limit`, ...): an integer of at least 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
