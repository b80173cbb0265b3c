"""The `experts` section of a run config (stage 1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sentimerge.curriculum.config import CurriculumConfig
from sentimerge.pipeline.core.tasks import WHEN_SET, Frozen

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(Frozen):
    """peft LoRA hyper-parameters (peft's own names)."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout; off by default: on CPU its random masks cost "
                                                         "~30% of a training step, and the budgets here are short")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(ALL_LINEAR),
        description="module names, or peft's `all-linear` (default: every attention and MLP projection)")


class SharedAdapterConfig(Frozen):
    """A shared adapter: one LoRA trained on every task at once from the base model before the experts, then merged
    into it; the experts train on base + shared, and stage 2 merges their deltas onto base + shared (the simple form
    of cross-task sharing; Hybrid LoRA's attention over task modules is the other). Trained like the multi-task
    LoRA baseline: the experts' LoRA and learning rate, `per_task` examples of every task per step, equal task
    weights. Its examples count in the pipeline's budget."""

    examples: int = Field(0, ge=0, description="training examples in all (0: no shared adapter); optimizer steps = "
                                               "examples / (per_task x tasks), rounded up")
    per_task: int = Field(2, ge=1, description="examples of every task in each step's batch")

    def total_steps(self, tasks: int) -> int:
        return -(-self.examples // (self.per_task * tasks)) if self.examples else 0


class HybridSettings(Frozen):
    """Hybrid LoRA training (`experts.mode: hybrid`; Beiranvand, Sarhadi, Salimi Sartakhti, JECEI 2025): one LoRA
    module per task on every target layer, trained together on all tasks, and per layer an attention over the task
    modules' outputs, so every input draws on every task's module. `sentimerge.experts.hybrid` documents the routing
    and how its attention becomes stage 2's per-layer coefficients."""

    per_task: int = Field(2, ge=1, description="examples of every task in each step's batch; optimizer steps = "
                                               "experts.examples / per_task, rounded up")
    router_dim: int = Field(16, ge=1, description="width of each layer's query and keys")
    own_bias: float = Field(2.0, ge=0, description="initial preference of a task's inputs for its own module, in "
                                                   "logits (2.0 with 3 tasks: 79%); learned from there")
    coefficient_examples: int = Field(64, ge=1, description="training examples per task the attention is averaged "
                                                            "over for stage 2's coefficients")


class LocalitySettings(Frozen):
    """Output locality of each expert (`experts.locality`): besides its own task's cross-entropy, an expert is held
    to its start model's next-token distribution on prompts of the other tasks, with the KL divergence
    KL(start || expert) at the position where their answer begins, so that its task vector changes little what the
    merged model answers to the other tasks. This is the regulariser of learning without forgetting (Li and Hoiem,
    ECCV 2016) applied to the other tasks' inputs, aimed at the property task arithmetic needs: each task vector
    changes the function only where its own task's inputs are ("weight disentanglement", Ortiz-Jimenez, Favero and
    Frossard, NeurIPS 2023). It reads the other tasks' inputs, never their labels. Each step adds `per_step`
    prompts, a forward without the adapter (the start model) and one with it; they are not training examples. The
    expert's `metrics.jsonl` logs the KL as `locality_kl` beside `loss`, which stays the task's cross-entropy."""

    weight: float = Field(0.0, ge=0, description="weight of the KL term beside the task's cross-entropy (0: off)")
    per_step: int = Field(4, ge=1, description="prompts of the other tasks in each optimizer step")
    pool: int = Field(64, ge=1, description="prompts drawn (seeded) from each other task's training split")


class ReplaySettings(Frozen):
    """Replay of the other tasks' labelled examples in each expert's training (`experts.replay`): `per_step` of
    every step's `batch_size` examples are another task's (the tasks take turns, one per step), asked as that task
    asks them and scored with its answers; the expert's own task, in curriculum order, fills the rest. So an expert
    still spends most of its budget on its task but keeps answering the others, the interference its task vector
    brings into a merge, and every expert learns from every task's labels (rehearsal against forgetting, Robins,
    Connection Science 1995; mixing other tasks' data into each fine-tuning before a merge). The budget stays
    steps x batch_size: replayed examples are training examples. The expert's `metrics.jsonl` keeps `loss` as its
    own task's cross-entropy and logs `replay_loss` beside it; `schedule.jsonl` lists the replayed ids, which the
    other tasks' weak sets then exclude."""

    per_step: int = Field(0, ge=0, description="other tasks' examples in each step's batch (0: off); fewer than "
                                               "batch_size")
    pool: int = Field(64, ge=1, description="labelled training rows drawn (seeded) from each other task")


class GivenExpert(Frozen):
    """An expert given instead of trained (`experts.given.TASK`): exactly one of a local peft LoRA adapter folder
    (`path`), a LoRA adapter on the Hugging Face hub (`hub`, with a pinned `revision`), or a full checkpoint of the
    run's base model (`checkpoint`: a folder saved with `save_pretrained`), whose task vector, weights minus the
    base's, is the expert. Local paths are relative to the config file that names them."""

    path: str | None = Field(None, description="a local peft adapter folder (adapter_config.json and "
                                               "adapter_model.safetensors)")
    hub: str | None = Field(None, description="a hub repository id of a peft adapter")
    revision: str | None = Field(None, description="the hub revision (a commit hash, tag or branch): required with "
                                                   "`hub`, so that a run is reproducible")
    checkpoint: str | None = Field(None, description="a full fine-tuned checkpoint folder of the same base model")

    @model_validator(mode="after")
    def _one_source(self) -> GivenExpert:
        sources = [name for name in ("path", "hub", "checkpoint") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(f"give exactly one of path, hub, checkpoint (got {', '.join(sources) or 'none'})")
        if self.hub is not None and not self.revision:
            raise ValueError(f"hub {self.hub}: give a `revision` (a commit hash or tag), so the run can be repeated")
        if self.revision is not None and self.hub is None:
            raise ValueError("`revision` goes with `hub`")
        return self

    @property
    def kind(self) -> Literal["adapter", "checkpoint"]:
        return "checkpoint" if self.checkpoint is not None else "adapter"

    @property
    def source(self) -> str:
        """What the expert comes from, for messages and manifests."""
        return self.checkpoint or self.path or f"{self.hub}@{self.revision}"


class ExpertsConfig(Frozen):
    """How stage 1 trains one LoRA expert per task."""

    lora: LoraSettings = LoraSettings()
    curriculum: CurriculumConfig = CurriculumConfig()
    examples: int | None = Field(512, ge=1, description="training budget per expert in examples (or give `steps`)")
    steps: int | None = Field(None, ge=1, description="training budget per expert in optimizer steps")
    batch_size: int = Field(8, ge=1)
    bucket: int = Field(4, ge=1, description="batches drawn together and grouped by length, to cut padding")
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="share of the steps with a linear learning-rate warm-up")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the decay ends at this share of the learning rate")
    max_grad_norm: float | None = Field(1.0, gt=0)
    autocast: bool = Field(True, description="bf16 autocast for the model's math (CPU and CUDA)")
    dev_examples: int | None = Field(200, ge=1, description="dev sample (seeded) for the periodic evaluation")
    evaluations: int = Field(2, ge=1, description="dev evaluations spread over training (the last at the end)")
    keep: Literal["last", "best"] = Field(
        "last", description="last: the adapter after the last step; best: the evaluated step with the highest "
                            "primary dev metric (the earliest on ties; step 0, the base model, is not a candidate)")
    checkpoint_every: int = Field(20, ge=1, description="steps between resumable checkpoints")
    eval_batch_size: int = Field(16, ge=1)
    answer_space: Literal["vocabulary", "answers"] = Field(
        "vocabulary", json_schema_extra=WHEN_SET,
        description="the softmax of each answer token's cross-entropy: the whole vocabulary, or only the tokens "
                    "that continue the gold answer's prefix into one of the task's answers, so that an expert does "
                    "not push down answers its task never gives (a binary task's `neutral`); measured no better on "
                    "the demo (README)")
    locality: LocalitySettings = Field(
        LocalitySettings(), json_schema_extra=WHEN_SET,
        description="hold each expert to its start model's answers on the other tasks' prompts (off by default)")
    replay: ReplaySettings = Field(
        ReplaySettings(), json_schema_extra=WHEN_SET,
        description="train each expert on some labelled examples of the other tasks too (off by default)")
    mode: Literal["separate", "hybrid"] = Field(
        "separate", json_schema_extra=WHEN_SET,
        description="separate: one expert per task, each on its own data with a curriculum; hybrid: the task "
                    "modules trained together with attention over them (Hybrid LoRA), same example budget")
    hybrid: HybridSettings = Field(HybridSettings(), json_schema_extra=WHEN_SET)
    shared: SharedAdapterConfig = Field(SharedAdapterConfig(), json_schema_extra=WHEN_SET,
                                        description="a shared adapter the experts train on (off by default)")
    given: dict[str, GivenExpert] = Field(
        default_factory=dict, json_schema_extra=WHEN_SET,
        description="per task, an expert given instead of trained: {path: DIR} (a peft LoRA adapter), {hub: ID, "
                    "revision: REV}, or {checkpoint: DIR} (a full checkpoint of the same base); such a task is not "
                    "trained, and its examples do not count in the budget")

    @model_validator(mode="after")
    def _one_budget(self) -> ExpertsConfig:
        if self.steps is not None and "examples" in self.model_fields_set:
            raise ValueError("give the budget as `examples` or `steps`, not both")
        if self.given and self.mode == "hybrid":
            raise ValueError("experts.given: Hybrid LoRA trains every task's module together; use mode separate")
        if self.locality.weight and self.mode == "hybrid":
            raise ValueError("experts.locality holds separate experts to their start model; Hybrid LoRA trains every "
                             "task's module together: use mode separate or drop locality")
        if self.replay.per_step and self.mode == "hybrid":
            raise ValueError("experts.replay mixes other tasks into separate experts' batches; Hybrid LoRA already "
                             "trains on every task: use mode separate or drop replay")
        if self.replay.per_step >= self.batch_size:
            raise ValueError(f"experts.replay.per_step ({self.replay.per_step}) must be below experts.batch_size "
                             f"({self.batch_size}): the expert's own task needs a place in every batch")
        if self.given and self.shared.examples:
            raise ValueError("experts.given: a given expert was not trained on the shared adapter (experts.shared), "
                             "so its delta does not apply to base + shared; drop one of them")
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps of each expert (mode `separate`), or of the joint training (mode `hybrid`)."""
        if self.mode == "hybrid":
            return self.steps if self.steps is not None else max(1, -(-self.examples // self.hybrid.per_task))
        if self.steps is not None:
            return self.steps
        return max(1, -(-self.examples // self.batch_size))

    @property
    def examples_per_task(self) -> int:
        """Training examples each task's expert (or task module) sees."""
        return self.total_steps * (self.hybrid.per_task if self.mode == "hybrid" else self.batch_size)
