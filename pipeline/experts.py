"""Stage 1, `sentimerge experts CONFIG`: one LoRA expert per task, instruction-tuned with a difficulty curriculum.

For each task: difficulty is computed per example from metadata signals (curriculum/signals.py) on a seeded pool of
training examples; a pacing function opens the pool easiest first (curriculum/pacing.py); the LoRA adapter learns the
answer tokens of the task's chat prompts under bf16 autocast, with warm-up and decay of the learning rate, periodic
dev evaluation and resumable checkpoints. The expert's folder (pipeline/rundir.py) ends with the peft adapter, its
resolved config, the metrics and schedule logs, the examples' difficulty, and `DONE.json`, written last.

A finished expert is skipped unless `--force`; an unfinished one resumes from its last checkpoint, which restores the
weights, optimizer, learning-rate step, sampler and RNG state, so it ends with the adapter an uninterrupted run gives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from sentimerge.curriculum.sampler import CurriculumSampler
from sentimerge.curriculum.signals import Difficulty, SignalInputs, TaskFacts, example_difficulty, task_difficulty
from sentimerge.experts.checkpoint import read_state, save_adapter
from sentimerge.experts.config import GivenExpert
from sentimerge.experts.given import check_adapter, check_checkpoint, content_hash, file_stats, install, resolve
from sentimerge.experts.hybrid import layer_coefficients, load_hybrid_model, record_attention
from sentimerge.experts.loop import Loop, run_loop
from sentimerge.experts.multitask import TaskBalancedSampler, multitask_lora_config, train_multitask
from sentimerge.experts.train import (
    answer_loss,
    answer_losses,
    collate,
    encode,
    evaluate_dev,
    learning_rate,
    load_lora_model,
    locality_kl,
)
from sentimerge.pipeline.core.config import RunConfig, dump_config
from sentimerge.pipeline.core.data import sample_examples
from sentimerge.pipeline.core.errors import ConfigError, ModelError, SentimergeError
from sentimerge.pipeline.core.isolation import run_isolated
from sentimerge.pipeline.core.models import check_against_base_model, merge_adapter_into, pick_device
from sentimerge.pipeline.core.prompts import answer_tokens, prompt_ids
from sentimerge.pipeline.core.rundir import (
    RunDir,
    append_jsonl,
    digest,
    fresh_dir,
    is_done,
    read_manifest,
    write_json_atomic,
    write_jsonl_atomic,
    write_manifest,
    write_text_atomic,
)
from sentimerge.pipeline.core.runtime import release_memory
from sentimerge.pipeline.core.tasks import TaskSpec
from sentimerge.pipeline.core.upstream import load_prepared, merge_base_path, prepared_key, prepared_model_path

log = logging.getLogger("sentimerge.experts")


@dataclass
class Expert:
    """A trained expert: the in-memory peft model and tokenizer, and its folder."""

    task: TaskSpec
    model: object
    tokenizer: object
    folder: Path


def main(cfg: RunConfig, *, force: bool = False, tasks: list[str] | None = None,
         on_step: Callable[[str, int], None] | None = None, backend: str | None = None,
         write_run_config: bool = True) -> dict[str, Path]:
    """Train the experts of `tasks` (default: every task of the run); returns task -> expert folder.

    With the Ray backend each unfinished expert trains as a Ray task running this same function for its task.
    """
    run = RunDir(cfg.resolved_run_dir)
    selected = select_tasks(cfg, tasks)
    check_against_base_model(cfg, prepared_model_path(run))  # the LoRA targets, also when they changed since prepare
    given = {task.name: cfg.experts.given[task.name] for task in selected if task.name in cfg.experts.given}
    # Each unit of model work below runs in a forked child where the command line allows it (`run_isolated`): the
    # shared adapter and every expert start from an idle process's memory (one expert alone peaks 2550 MB on the
    # demo, after the shared adapter and two experts in the same process 2937 MB and more), and this process does
    # no model math, so it can fork the next one.
    if given:  # checked all at once, before anything trains; then never trained
        run_isolated(import_given_experts, cfg, run, given, force=force)
        selected = [task for task in selected if task.name not in given]
    if cfg.experts.shared.examples and write_run_config:  # the driver trains it once, before any expert
        # `--force --tasks X` trains X's expert again on the shared adapter the other experts stand on; `--force`
        # alone trains the shared adapter again, and then every expert (all of them are forced)
        run_isolated(train_shared_adapter, cfg, run, force=force and not tasks)
    if cfg.experts.mode == "hybrid":
        if tasks:
            raise ConfigError("experts.mode hybrid trains every task's module together: drop --tasks")
        if write_run_config:
            write_text_atomic(run.config, dump_config(cfg))
        return train_hybrid_experts(cfg, run, force=force)
    if (backend or cfg.backend) == "ray":
        from sentimerge.pipeline.core.ray_backend import train_experts

        read_manifest(run.prepare)
        todo = [task.name for task in selected if force or not is_done(run.expert(task.name))]
        if todo:
            write_text_atomic(run.config, dump_config(cfg))
            train_experts(cfg, todo, train_one, force=force)
        return {**{name: run.expert(name) for name in given}, **{task.name: run.expert(task.name) for task in selected}}
    data = {task.name: (load_prepared(run, task.name, "train"), load_prepared(run, task.name, "dev"))
            for task in selected}
    base_path = merge_base_path(run, bool(cfg.experts.shared.examples))
    prepared = prepared_key(run)
    if write_run_config:  # Ray workers do not: the driver did, and workers write only their own task's files
        write_text_atomic(run.config, dump_config(cfg))
    folders = {name: run.expert(name) for name in given}
    for task in selected:
        folder = run.expert(task.name)
        fingerprint = expert_fingerprint(cfg, task, prepared)
        if is_done(folder) and not force:
            if read_manifest(folder).get("fingerprint") != fingerprint:
                raise SentimergeError(f"{folder}: expert {task.name} finished with another config or other prepared "
                                      f"data; run `sentimerge experts --force --tasks {task.name}` to train it again")
            log.info("expert %s: already done (%s)", task.name, folder)
            folders[task.name] = folder
            continue
        if force and folder.exists():
            shutil.rmtree(folder)
        train, dev = data[task.name]
        run_isolated(_train_expert_files, cfg, run, task, train, dev, base_path, fingerprint=fingerprint,
                     on_step=(lambda step, name=task.name: on_step(name, step)) if on_step else None)
        release_memory()  # in-process: the expert's model, optimizer and the allocator's free pages, before the next
        folders[task.name] = folder
    return folders


def _train_expert_files(*args, **kwargs) -> None:
    """`train_expert` for its files alone (what `run_isolated` hands back must pickle; a model does not)."""
    train_expert(*args, **kwargs)


def import_given_experts(cfg: RunConfig, run: RunDir, given: dict[str, GivenExpert], *, force: bool = False) -> None:
    """Install the experts given instead of trained (`experts.given`, `sentimerge.experts.given`): every one checked
    against the prepared base model first, all problems reported at once (ModelError, one line each, nothing
    written); an installed one is kept while its files are unchanged, refused when they changed (`--force`
    installs them again)."""
    base = Path(prepared_model_path(run))
    sources, problems = {}, []
    for name, spec in given.items():
        try:
            source = resolve(spec, cfg.resolved_cache_dir)
        except ModelError as error:
            problems.append(f"experts.given.{name}: {error}")
            continue
        check = check_checkpoint if spec.kind == "checkpoint" else check_adapter
        problems += [f"experts.given.{name}: {problem}" for problem in check(source, base)]
        sources[name] = source
    if problems:
        raise ModelError("\n".join(problems))
    for name, source in sources.items():
        spec, folder = given[name], run.expert(name)
        installed = read_manifest(folder).get("given") if is_done(folder) and not force else None
        sha256 = content_hash(source, spec.kind, installed)
        fingerprint = digest({"given": spec.kind, "sha256": sha256})
        if is_done(folder) and not force:
            if read_manifest(folder).get("fingerprint") != fingerprint:
                raise SentimergeError(f"{folder}: expert {name} was trained or installed from other files than "
                                      f"{spec.source}; run `sentimerge experts --force --tasks {name}` to install "
                                      "the given one")
            log.info("expert %s: given (%s), already installed", name, spec.source)
            continue
        with fresh_dir(folder, overwrite=force) as work:
            install(source, spec.kind, work)
            write_manifest(work, stage="experts", task=name, fingerprint=fingerprint,
                           given={"kind": spec.kind, "source": spec.source, "folder": str(source.resolve()),
                                  "sha256": sha256, "stats": file_stats(source, spec.kind)}, base_model=str(base))
        log.info("expert %s: given %s %s, installed in %s", name, spec.kind, spec.source, folder)


def shared_fingerprint(cfg: RunConfig, run: RunDir) -> str:
    """What decides the shared adapter: its settings and training config, the tasks, the seed, the prepared data."""
    training = multitask_lora_config(cfg, cfg.experts.shared.total_steps(len(cfg.tasks)), cfg.experts.shared.per_task)
    return digest({"shared": cfg.experts.shared.decisive(), "finetune": training.finetune.decisive(),
                   "tasks": [task.decisive() for task in cfg.tasks], "seed": cfg.seed, "prepared": prepared_key(run)})


def train_shared_adapter(cfg: RunConfig, run: RunDir, *, force: bool = False) -> Path:
    """The shared adapter (`experts.shared`): one LoRA trained on every task from the base model (resuming an
    interrupted training), merged into the base and saved as `<run>/shared/model`, the model every expert then
    trains on. Skipped when finished with the same settings; refused when finished with others (unless `force`).
    Its start (the base model) is not evaluated: the report's zero-shot row scores it."""
    settings = cfg.experts.shared
    key = shared_fingerprint(cfg, run)
    if is_done(run.shared) and not force:
        if read_manifest(run.shared).get("fingerprint") != key:
            raise SentimergeError(f"{run.shared}: the shared adapter finished with other settings or data; run "
                                  "`sentimerge experts --force` to train it (and the experts on it) again")
        log.info("shared adapter: already done (%s)", run.shared)
        return run.shared_model
    if force or is_done(run.shared):
        shutil.rmtree(run.shared, ignore_errors=True)
    steps = settings.total_steps(len(cfg.tasks))
    base = prepared_model_path(run)
    training = _finished_training(run.shared_training, key)  # a crash after the training lost nothing of it
    if training is None:
        log.info("shared adapter: %d steps x %d per task x %d tasks = %d examples, from %s", steps,
                 settings.per_task, len(cfg.tasks), steps * settings.per_task * len(cfg.tasks), base)
        training = train_multitask(multitask_lora_config(cfg, steps, settings.per_task),
                                   RunDir(run.root, finetune=run.shared_training), start=base, fingerprint=key,
                                   seed=cfg.seed, manifest={"stage": "shared adapter"}, evaluate_start=False,
                                   name="shared adapter")
        release_memory()  # the training's model, optimizer and activations, before the merge and the experts
    merge_adapter_into(run.shared_training / "adapter", run.shared_model, dtype=cfg.base_model.dtype)
    release_memory()  # the merge's two model copies: the experts then start from an idle process's memory
    write_manifest(run.shared, stage="shared adapter", fingerprint=key, base_model=base, steps=training["steps"],
                   examples=training["examples"], dev=training["dev"], zero_shot=training["zero_shot"])
    log.info("shared adapter: mean dev primary %.3f -> %s", training["dev"]["primary"], run.shared_model)
    return run.shared_model


def hybrid_fingerprint(cfg: RunConfig, run: RunDir) -> str:
    """What decides the hybrid experts: the experts section, the tasks, the seed, the prepared data (and the shared
    adapter they train on)."""
    shared = read_manifest(run.shared).get("fingerprint") if cfg.experts.shared.examples else None
    return digest({"experts": cfg.experts.decisive(), "tasks": [task.decisive() for task in cfg.tasks],
                   "seed": cfg.seed, "prepared": prepared_key(run), "shared": shared})


def _hybrid_training_config(cfg: RunConfig) -> RunConfig:
    """The joint training's settings: the multi-task LoRA's (the experts' LoRA and learning rate, equal task
    weights), the experts' step count, batch (`hybrid.per_task` of every task) and evaluation schedule."""
    settings = cfg.experts
    training = multitask_lora_config(cfg, settings.total_steps, settings.hybrid.per_task)
    return training.model_copy(update={"finetune": training.finetune.model_copy(update={
        "dev_examples": settings.dev_examples, "evaluations": settings.evaluations,
        "checkpoint_every": settings.checkpoint_every, "eval_batch_size": settings.eval_batch_size})})


def train_hybrid_experts(cfg: RunConfig, run: RunDir, *, force: bool = False) -> dict[str, Path]:
    """Stage 1 in mode `hybrid` (Hybrid LoRA, `sentimerge.experts.hybrid`): every task's LoRA module trained together
    with attention over them, on `experts.examples` examples of each task; then each module is written as that
    task's expert (a plain peft adapter, with the ids of the rows it trained on) and the attention, averaged over
    each task's examples, as stage 2's per-layer coefficients (`<run>/hybrid/coefficients.json`)."""
    settings, names = cfg.experts, [task.name for task in cfg.tasks]
    key = hybrid_fingerprint(cfg, run)
    finished = [name for name in names if is_done(run.expert(name))]
    if len(finished) == len(names) and is_done(run.hybrid) and not force:
        if any(read_manifest(run.expert(name)).get("fingerprint") != key for name in names):
            raise SentimergeError(f"{run.experts}: the hybrid experts finished with another config or other data; "
                                  "run `sentimerge experts --force` to train them again")
        log.info("hybrid experts: already done (%s)", run.hybrid)
        return {name: run.expert(name) for name in names}
    if is_done(run.hybrid) and read_manifest(run.hybrid).get("fingerprint") != key and not force:
        raise SentimergeError(f"{run.hybrid}: the hybrid training finished with another config or other data; run "
                              "`sentimerge experts --force` to train it again")
    if force:
        shutil.rmtree(run.hybrid, ignore_errors=True)
    for name in finished:  # written again from the joint training below
        shutil.rmtree(run.expert(name))
    base_path = merge_base_path(run, bool(settings.shared.examples))
    train = {task.name: load_prepared(run, task.name, "train") for task in cfg.tasks}
    device = pick_device(cfg.device)
    built: dict = {}

    def build():
        model, tokenizer = load_hybrid_model(
            base_path, names, settings.lora, dim=settings.hybrid.router_dim, own_bias=settings.hybrid.own_bias,
            dtype=cfg.base_model.dtype, device=device, seed=cfg.seed,
            trust_remote_code=cfg.base_model.trust_remote_code)
        built["routing"] = model.hybrid_routing
        return model, tokenizer

    def after_training(model, tokenizer) -> None:
        sample = {task.name: sample_examples(train[task.name], settings.hybrid.coefficient_examples, cfg.seed,
                                             f"{task.name}/hybrid/coefficients")
                  if len(train[task.name]) > settings.hybrid.coefficient_examples else train[task.name]
                  for task in cfg.tasks}
        attention = record_attention(model, tokenizer, built["routing"], list(cfg.tasks), sample, device,
                                     batch_size=settings.eval_batch_size, use_autocast=settings.autocast)
        layers = model.get_base_model().config.num_hidden_layers
        coefficients = layer_coefficients(attention, names, layers)
        write_json_atomic(run.hybrid_coefficients, {
            "experts": names, "num_layers": layers, "parts": ["attention", "mlp"],
            "coefficients": np.round(coefficients, 6).tolist(),
            "attention": {name: np.round(mean, 6).tolist() for name, mean in attention.items()},
            "examples_per_task": {name: len(rows) for name, rows in sample.items()}})

    manifest = _finished_training(run.hybrid, key) or train_multitask(
        _hybrid_training_config(cfg), RunDir(run.root, finetune=run.hybrid), start=base_path, fingerprint=key,
        seed=cfg.seed, build_model=build, set_task=lambda task: built["routing"].set_task(task),
        after_training=after_training, manifest={"stage": "hybrid experts", "base_model": base_path},
        name="hybrid experts")
    trained = _drawn_ids(train, names, settings.hybrid.per_task, cfg.seed, manifest["steps"])
    for task in cfg.tasks:
        with fresh_dir(run.expert(task.name), overwrite=True) as folder:
            shutil.copytree(run.hybrid / "adapter" / task.name, folder / "adapter")
            write_json_atomic(folder / "train_ids.json", trained[task.name])
            write_manifest(folder, stage="experts", mode="hybrid", task=task.name, fingerprint=key,
                           base_model=base_path, steps=manifest["steps"],
                           examples=manifest["steps"] * settings.hybrid.per_task,
                           dev={"primary": manifest["dev"]["tasks"][task.name]["primary"]},
                           zero_shot={"primary": manifest["zero_shot"]["tasks"][task.name]["primary"]})
    log.info("hybrid experts: mean dev primary %.3f (zero-shot %.3f); coefficients in %s", manifest["dev"]["primary"],
             manifest["zero_shot"]["primary"], run.hybrid_coefficients)
    return {name: run.expert(name) for name in names}


def _finished_training(folder: Path, key: str) -> dict | None:
    """The manifest of a joint training (shared adapter, Hybrid LoRA) that finished with fingerprint `key`, so that a
    crash after it (merging, writing the experts) does not train it again; a finished one with another key is
    removed, None then."""
    if not is_done(folder):
        return None
    manifest = read_manifest(folder)
    if manifest.get("fingerprint") == key:
        return manifest
    shutil.rmtree(folder)
    return None


def _drawn_ids(train: dict[str, list[dict]], names: list[str], per_task: int, seed: int, steps: int) -> dict:
    """The ids of each task's rows the joint training drew (its sampler replayed), sorted."""
    sampler = TaskBalancedSampler([len(train[name]) for name in names], per_task, seed)
    drawn: dict[str, set] = {name: set() for name in names}
    for _ in range(steps):
        for task, index in sampler.next_batch():
            drawn[names[task]].add(train[names[task]][index]["id"])
    return {name: sorted(ids) for name, ids in drawn.items()}


def train_one(cfg: RunConfig, task: str, force: bool) -> str:
    """Stage 1 for one task, the local way (what each Ray task of `backend: ray` runs); returns its folder."""
    local = cfg.model_copy(update={"backend": "local"})
    return str(main(local, force=force, tasks=[task], write_run_config=False)[task])


def select_tasks(cfg: RunConfig, names: list[str] | None) -> list[TaskSpec]:
    if not names:
        return list(cfg.tasks)
    return [cfg.task(name) for name in names]  # cfg.task raises ConfigError with a suggestion


def task_seed(seed: int, task: str) -> int:
    """Each expert's own seed: independent of which other tasks the run trains, and in which order."""
    return int(hashlib.sha256(f"{seed}/{task}".encode()).hexdigest()[:8], 16)


def expert_fingerprint(cfg: RunConfig, task: TaskSpec, prepared: str | None) -> str:
    """Hash of what decides an expert: a checkpoint or expert made with another one is not silently reused."""
    experts = cfg.experts.decisive()
    experts.pop("given", None)  # which other tasks' experts are given does not change this one
    decisive = {"experts": experts, "task": task.decisive(),
                "seed": cfg.seed, "prepared": prepared}
    return digest(decisive)


def train_expert(cfg: RunConfig, run: RunDir, task: TaskSpec, train: list[dict], dev: list[dict], base_path: str, *,
                 fingerprint: str, on_step: Callable[[int], None] | None = None) -> Expert:
    """Train (or resume) one expert and write its folder; the manifest is written last."""
    settings, curriculum = cfg.experts, cfg.experts.curriculum
    folder, checkpoint_dir = run.expert(task.name), run.expert_checkpoint(task.name)
    seed = task_seed(cfg.seed, task.name)
    resuming = read_state(checkpoint_dir)
    if resuming is not None and resuming["fingerprint"] != fingerprint:
        raise SentimergeError(f"{checkpoint_dir}: a checkpoint of another config (experts section, task or data); "
                              "pass --force to start this expert again")
    if resuming is None and folder.exists():
        shutil.rmtree(folder)  # a leftover without a checkpoint: nothing to resume
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.expert_config(task.name), yaml.safe_dump(
        {"experts": settings.model_dump(mode="json"), "task": task.model_dump(mode="json"), "seed": seed,
         "base_model": base_path, "fingerprint": fingerprint}, sort_keys=False, allow_unicode=True))

    pool = train if curriculum.pool is None or len(train) <= curriculum.pool else sample_examples(
        train, curriculum.pool, seed, f"{task.name}/experts/pool")
    dev_sample = dev if settings.dev_examples is None or len(dev) <= settings.dev_examples else sample_examples(
        dev, settings.dev_examples, seed, f"{task.name}/experts/dev")
    device = pick_device(cfg.device)
    model, tokenizer = load_lora_model(base_path, settings.lora, dtype=cfg.base_model.dtype, device=device,
                                       seed=seed, trust_remote_code=cfg.base_model.trust_remote_code)
    encoded = encode(tokenizer, task, pool)
    answers = answer_tokens(tokenizer, task).answers if settings.answer_space == "answers" else None
    lengths = [len(ids) for ids, _ in encoded]
    evaluate = partial(evaluate_dev, model, tokenizer, task, dev_sample, device, use_autocast=settings.autocast,
                       batch_size=settings.eval_batch_size)

    difficulty = None
    if curriculum.pacing != "none":
        difficulty = pool_difficulty(cfg, run, task, pool, lengths, model, tokenizer, device, base_path)
        write_jsonl_atomic(run.expert_difficulty(task.name), difficulty.rows(pool))
    order = difficulty.order() if difficulty is not None else np.arange(len(pool))
    total = settings.total_steps
    replay = replay_pools(cfg, run, task, tokenizer, seed) if settings.replay.per_step else []
    sampler = CurriculumSampler(order, lengths, batch_size=settings.batch_size - settings.replay.per_step,
                                total_steps=total,
                                pacing=curriculum.pacing, start=curriculum.start, full_at=curriculum.full_at,
                                bucket=settings.bucket, seed=seed,
                                strata=[task.answer_index(example["label"]) for example in pool]
                                if curriculum.stratify and curriculum.pacing != "none" else None)
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    locality = settings.locality
    others = locality_prompts(cfg, run, task, tokenizer, seed) if locality.weight else []

    def train_step(step: int) -> dict:
        drawn = sampler.next_batch(step)
        tick = time.time()
        batch = collate([encoded[i] for i in drawn["indices"]], tokenizer.pad_token_id, share_prefix=True)
        loss = answer_loss(model, batch, device, use_autocast=settings.autocast, answers=answers)
        row = {"loss": round(loss.item(), 5)}
        own, replayed = len(drawn["indices"]), None
        if replay:  # the batch's other-task share: each example weighs as much as one of the task's own
            other, picked = replay_draw(replay, settings.replay.per_step, seed, step)
            other_loss = answer_loss(model, collate([other.encoded[i] for i in picked], tokenizer.pad_token_id,
                                                    share_prefix=True),
                                     device, use_autocast=settings.autocast, answers=other.answers)
            row["replay_loss"] = round(other_loss.item(), 5)
            loss = (own * loss + len(picked) * other_loss) / (own + len(picked))
            replayed = {"task": other.task.name, "ids": [other.rows[i]["id"] for i in picked]}
        if others:
            kl = locality_kl(model, locality_draw(others, locality.per_step, seed, step), tokenizer.pad_token_id,
                             device, use_autocast=settings.autocast)
            loss = loss + locality.weight * kl
            row["locality_kl"] = round(kl.item(), 5)
        loss.backward()
        schedule = _schedule_row(step + 1, drawn, pool, difficulty)
        append_jsonl(run.expert_schedule(task.name), schedule if replayed is None else {**schedule, "replay": replayed})
        examples = own + (len(replayed["ids"]) if replayed else 0)
        return {**row, "examples_per_s": round(examples / max(time.time() - tick, 1e-9), 2)}

    state = run_loop(Loop(
        name=f"expert {task.name}", total_steps=total, checkpoint_dir=checkpoint_dir,
        metrics_log=run.expert_metrics(task.name), logs_to_truncate=[run.expert_schedule(task.name)],
        fingerprint=fingerprint, step=train_step, learning_rate=partial(learning_rate, cfg=settings),
        evaluate=evaluate, eval_steps=evaluation_steps(total, settings.evaluations),
        checkpoint_every=settings.checkpoint_every, keep=settings.keep, max_grad_norm=settings.max_grad_norm,
        extra_state=sampler.state, load_extra_state=sampler.load_state, before_step=on_step or (lambda step: None),
    ), model, optimizer, device)
    kept, step = state["kept"], state["step"]
    save_adapter(model, run.expert_adapter(task.name))
    facts = TaskFacts(task, _average_text_tokens(tokenizer, task, pool), state["zero_shot"]["primary"])
    _write_manifest(folder, cfg, task, state, kept, difficulty, facts, fingerprint=fingerprint, base_path=base_path,
                    steps=step, pool=len(pool), dev_examples=len(dev_sample))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    trained = step * settings.batch_size
    log.info("expert %s: dev %s %.3f (zero-shot %.3f) after %d examples at %.1f ex/s -> %s", task.name, task.primary,
             kept["dev"]["primary"], state["zero_shot"]["primary"], trained,
             trained / max(state["train_seconds"], 1e-9), folder)
    return Expert(task, model, tokenizer, folder)


@dataclass
class ReplayPool:
    """One other task's rows an expert replays (`experts.replay`), encoded as that task asks them."""

    task: TaskSpec
    rows: list[dict]
    encoded: list[tuple[list[int], list[int]]]
    answers: tuple[tuple[int, ...], ...] | None  # the task's answers, with `experts.answer_space: answers`


def replay_pools(cfg: RunConfig, run: RunDir, task: TaskSpec, tokenizer, seed: int) -> list[ReplayPool]:
    """The labelled rows `task`'s expert replays: up to `experts.replay.pool` training rows of every other task (a
    seeded sample), in the run's task order. Raises ConfigError when no other task has labelled training rows."""
    settings = cfg.experts
    pools = []
    for other in cfg.tasks:
        if other.name == task.name or other.source.unlabelled_train:
            continue
        rows = load_prepared(run, other.name, "train")
        if len(rows) > settings.replay.pool:
            rows = sample_examples(rows, settings.replay.pool, seed, f"{task.name}/experts/replay/{other.name}")
        answers = answer_tokens(tokenizer, other).answers if settings.answer_space == "answers" else None
        pools.append(ReplayPool(other, rows, encode(tokenizer, other, rows), answers))
    if not pools:
        raise ConfigError(f"experts.replay: task {task.name} has no other task with labelled training rows to replay")
    return pools


def replay_draw(pools: list[ReplayPool], count: int, seed: int, step: int) -> tuple[ReplayPool, list[int]]:
    """Step `step`'s replayed task (the tasks take turns) and `count` of its rows, without replacement; a function
    of (seed, step), so a resumed run draws what the uninterrupted one did."""
    pool = pools[step % len(pools)]
    rng = np.random.default_rng([seed, step, 0x2E91A])
    return pool, sorted(rng.choice(len(pool.rows), size=min(count, len(pool.rows)), replace=False).tolist())


def locality_prompts(cfg: RunConfig, run: RunDir, task: TaskSpec, tokenizer, seed: int) -> list[list[int]]:
    """The prompts `experts.locality` holds `task`'s expert to its start model on: token ids of up to
    `experts.locality.pool` training inputs of every other task (a seeded sample; their labels are not read), each
    asked as that task asks it. Raises ConfigError when the run has no other task."""
    settings = cfg.experts.locality
    prompts = []
    for other in cfg.tasks:
        if other.name == task.name:
            continue
        rows = load_prepared(run, other.name, "train")
        if len(rows) > settings.pool:
            rows = sample_examples(rows, settings.pool, seed, f"{task.name}/experts/locality/{other.name}")
        prompts += [prompt_ids(tokenizer, other, row, demonstrations=False) for row in rows]
    if not prompts:
        raise ConfigError(f"experts.locality: task {task.name} has no other task whose prompts it could keep")
    return prompts


def locality_draw(prompts: list[list[int]], count: int, seed: int, step: int) -> list[list[int]]:
    """Step `step`'s `count` locality prompts, without replacement; a function of (seed, step), so a resumed run
    draws what the uninterrupted one did."""
    rng = np.random.default_rng([seed, step, 0x10CA1])
    return [prompts[i] for i in rng.choice(len(prompts), size=min(count, len(prompts)), replace=False)]


def evaluation_steps(total: int, evaluations: int) -> set[int]:
    """Steps after which the dev sample is scored: spread evenly, the last one at the end."""
    return {round(total * k / evaluations) for k in range(1, evaluations + 1)}


def _write_manifest(folder: Path, cfg: RunConfig, task: TaskSpec, state: dict, kept: dict,
                    difficulty: Difficulty | None, facts: TaskFacts, *, fingerprint: str, base_path: str, steps: int,
                    pool: int, dev_examples: int) -> None:
    """The expert's DONE.json: budget, speed, zero-shot and kept dev metrics, curriculum and task difficulty."""
    settings = cfg.experts
    trained = steps * settings.batch_size
    write_manifest(folder, stage="experts", task=task.name, fingerprint=fingerprint, base_model=base_path,
                   steps=steps, examples=trained, pool=pool, dev_examples=dev_examples,
                   keep=settings.keep, kept_step=kept["step"], primary_metric=task.primary,
                   zero_shot=state["zero_shot"], dev=kept["dev"],
                   gain=round(kept["dev"]["primary"] - state["zero_shot"]["primary"], 4),
                   train_seconds=round(state["train_seconds"], 1), eval_seconds=round(state["eval_seconds"], 1),
                   examples_per_s=round(trained / max(state["train_seconds"], 1e-9), 2),
                   curriculum={"pacing": settings.curriculum.pacing,
                               "signals": difficulty.weights if difficulty else {},
                               "skipped_signals": difficulty.skipped if difficulty else []},
                   task_difficulty=task_difficulty(settings.curriculum.task_signals, facts))


def pool_difficulty(cfg: RunConfig, run: RunDir, task: TaskSpec, pool: list[dict], lengths: list[int], model,
                    tokenizer, device: torch.device, base_path: str) -> Difficulty:
    """Combine the curriculum's signals on the pool; the base model's losses come from the run dir's cache."""
    settings = cfg.experts

    def base_losses() -> np.ndarray:
        with model.disable_adapter():
            return cached_base_losses(run.base_loss_cache(task.name), base_path, pool, lambda missing: answer_losses(
                model, tokenizer, task, missing, device, use_autocast=settings.autocast,
                batch_size=settings.eval_batch_size))

    inputs = SignalInputs(task, pool, lengths, base_loss=base_losses,
                          label_polarity=settings.curriculum.label_polarity)
    difficulty = example_difficulty(settings.curriculum.signals, inputs)
    if difficulty.skipped:
        log.info("expert %s: difficulty signals that do not apply here: %s", task.name, ", ".join(difficulty.skipped))
    return difficulty


def cached_base_losses(path: Path, model_ref: str, examples: list[dict],
                       compute: Callable[[list[dict]], np.ndarray]) -> np.ndarray:
    """The base model's loss per example, computed once per (model, example) and kept in `path`.

    Keyed by the example's content (id, text, aspect, label), not its id alone: aspect-based files give every
    aspect of a sentence the sentence's id, and each has its own loss."""
    cache = {}
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("model") == model_ref and stored.get("key") == "content":
            cache = stored["losses"]
    keys = [example_key(example) for example in examples]
    missing = {key: example for key, example in zip(keys, examples) if key not in cache}
    if missing:
        log.info("base-model loss of %d examples (cached in %s)", len(missing), path)
        for key, loss in zip(missing, compute(list(missing.values()))):
            cache[key] = round(float(loss), 6)
        write_json_atomic(path, {"model": model_ref, "key": "content", "losses": cache})
    return np.array([cache[key] for key in keys])


def example_key(example: dict) -> str:
    """A short hash of what an example is (id, text, aspect, label)."""
    content = [example["id"], example["text"], example.get("aspect"), example["label"]]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]


def _schedule_row(step: int, drawn: dict, pool: list[dict], difficulty: Difficulty | None) -> dict:
    row = {"step": step, "competence": drawn["competence"], "available": drawn["available"]}
    if difficulty is not None:
        scores = difficulty.scores[drawn["indices"]]
        row |= {"difficulty_mean": round(float(scores.mean()), 4), "difficulty_max": round(float(scores.max()), 4)}
    return row | {"ids": [pool[i]["id"] for i in drawn["indices"]]}


def _average_text_tokens(tokenizer, task: TaskSpec, examples: list[dict]) -> float:
    counts = [min(len(tokenizer(example["text"], add_special_tokens=False).input_ids), task.max_text_tokens)
              for example in examples]
    return float(np.mean(counts))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="retrain finished experts (kept otherwise); without --tasks also the shared adapter")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task of the config)")
    parser.add_argument("--backend", choices=["local", "ray"], help="train here, one expert after another, or as "
                                                                   "Ray tasks (default: the config's `backend`)")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    if args.tasks is not None and not tasks:
        raise ConfigError("--tasks: give at least one task name")
    main(cfg, force=args.force, tasks=tasks, backend=args.backend)  # the CLI holds the run directory's lock


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("experts")
