"""Stage 3, `sentimerge finetune CONFIG`: multi-task LoRA fine-tuning of the merged model with dynamic task weights.

Every step's batch holds `per_task` examples of every task (experts/multitask.py states the sampling rule); the
loss is the weighting strategy's combination of the per-task losses (pipeline/weighting.py documents `dao` and
its peers), and the weights actually used are logged per step and plotted. Regression tasks train on the
cross-entropy of the answer level nearest to the gold score, so their loss is on the same scale as classification.
Writes `<run>/finetune/`: the adapter, metrics.jsonl, weights.csv and weights.png, the resolved config and a
manifest written last. An interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sentimerge.experts.multitask import train_multitask
from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, digest, is_done, read_manifest
from sentimerge.pipeline.core.upstream import expert_deltas, merge_base_path, prepared_key, prepared_model_path

log = logging.getLogger("sentimerge.finetune")


def start_model_path(cfg: RunConfig, run: RunDir) -> str:
    """The model stage 3's adapter applies to: stage 2's merged model (default), the base model (`start: base`), or
    with `init: experts` the experts' base (base, or base + shared adapter), the adapter then holding the merge."""
    if cfg.finetune.start == "base":
        return prepared_model_path(run)
    if not is_done(run.search):
        raise SentimergeError(f"{run.search}: stage 2 has not finished; run `sentimerge search` first "
                              "(or set finetune.start: base)")
    if cfg.finetune.init == "experts":
        return merge_base_path(run, bool(cfg.experts.shared.examples))
    return str(run.search_merged)


def merge_as_adapter(cfg: RunConfig, run: RunDir, start: str, seed: int):
    """(peft model, tokenizer) for `finetune.init: experts`: on the experts' base `start`, one LoRA that is stage 2's
    chosen merge (`merge_as_lora`: the experts' factors stacked, scaled by the selected coefficients), with
    `finetune.lora`'s scale (alpha / r) and dropout and the experts' target modules. Its rank is the sum of the
    experts' ranks, so every expert's module keeps training, on every task (the cross-task sharing a fresh LoRA on
    the merged weights starts without). Raises ModelError for experts that are not LoRA factors."""
    from sentimerge.experts.train import load_lora_model
    from sentimerge.merge.engine import merge_as_lora
    from sentimerge.pipeline.core.candidates import search_genome
    from sentimerge.pipeline.core.models import pick_device

    settings = cfg.finetune
    experts = {task.name: expert_deltas(run, task.name, start) for task in cfg.tasks}
    selected = json.loads(run.search_selected.read_text(encoding="utf-8"))
    layers = json.loads((Path(start) / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    genome = search_genome(cfg, tuple(experts), layers)
    scale = settings.lora.alpha / settings.lora.r
    factors, rank = merge_as_lora(experts, genome, np.asarray(selected["coefficients"]), scale)
    modules = sorted({weight.split(".")[-2] for weight in factors})  # peft's fresh LoRA elsewhere: B = 0, no change
    lora = settings.lora.model_copy(update={"r": rank, "alpha": scale * rank, "target_modules": modules})
    model, tokenizer = load_lora_model(start, lora, dtype=cfg.base_model.dtype, device=pick_device(cfg.device),
                                       seed=seed, trust_remote_code=cfg.base_model.trust_remote_code)
    modules_by_name = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for weight, (a, b) in factors.items():
            layer = modules_by_name[weight.removesuffix(".weight")]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    log.info("finetune: stage 3's LoRA starts as the merge (rank %d: the experts' factors scaled by the chosen "
             "coefficients) on %s", rank, start)
    return model, tokenizer


def check_teachers(cfg: RunConfig, run: RunDir) -> None:
    """Raises SentimergeError when `finetune.distill` is on and a task's expert has not finished."""
    missing = [task.name for task in cfg.tasks if not is_done(run.expert(task.name))]
    if cfg.finetune.distill.weight > 0 and missing:
        raise SentimergeError(f"{run.expert(missing[0])}: finetune.distill learns from the task experts, and the "
                              f"expert of {missing[0]} has not finished; run `sentimerge experts` first")


def expert_teachers(cfg: RunConfig, run: RunDir):
    """The task experts as stage 3's teachers (`finetune.distill`, `sentimerge.experts.distill.ExpertTeachers`), on
    the experts' base (base, or base + shared adapter). Raises SentimergeError when an expert has not finished."""
    from sentimerge.experts.distill import ExpertTeachers
    from sentimerge.pipeline.core.models import pick_device
    from sentimerge.pipeline.core.upstream import given_source

    check_teachers(cfg, run)
    checkpoints, adapters = {}, {}
    for task in cfg.tasks:
        given = given_source(run, task.name)
        if given and given["kind"] == "checkpoint":
            checkpoints[task.name] = Path(given["folder"])
        else:
            adapters[task.name] = run.expert_adapter(task.name)
    base = merge_base_path(run, bool(cfg.experts.shared.examples))
    log.info("finetune: distilling the experts of %s (share %.2f, %s, temperature %g)", ", ".join(
        task.name for task in cfg.tasks), cfg.finetune.distill.weight, cfg.finetune.distill.anneal,
        cfg.finetune.distill.temperature)
    return ExpertTeachers(base, adapters=adapters, checkpoints=checkpoints, dtype=cfg.base_model.dtype,
                          device=pick_device(cfg.device), trust_remote_code=cfg.base_model.trust_remote_code)


def upstream_key(cfg: RunConfig, run: RunDir) -> str | None:
    """What stage 3 hashes of the stages it reads from: stage 2's fingerprint (start: merged), else the prepared
    data's. Kept in the manifest: a finished stage 3 whose upstream changed is refused, not reported as done."""
    if cfg.finetune.start == "base":
        return prepared_key(run)
    if not run.search_state.is_file():
        return None
    return json.loads(run.search_state.read_text(encoding="utf-8"))["fingerprint"]


def task_order(cfg: RunConfig, run: RunDir) -> list[str]:
    """The tasks easiest first, for `finetune.task_pacing`: by the task difficulty their experts' manifests record
    (`curriculum.signals.task_difficulty`; a task without a finished expert or a given expert records none: 0), then
    by name. Multi-stage merging orders its groups by the same numbers."""
    difficulty = {task.name: (read_manifest(run.expert(task.name)).get("task_difficulty", {}).get("difficulty", 0.0)
                              if is_done(run.expert(task.name)) else 0.0)
                  for task in cfg.tasks}
    return sorted(difficulty, key=lambda name: (difficulty[name], name))


def fingerprint(cfg: RunConfig, start: str, order: list[str] | None = None, *, legacy: bool = False) -> str:
    """What decides stage 3: its settings, the seed, the tasks, the start model, (with task pacing) the task order and
    (with distillation) the experts' fingerprints.

    A start model inside the run counts by its place in the run (`run:search/merged`), so a run that was moved or
    copied keeps its finished stage 3; what that model holds is checked by `upstream_key`. `legacy` hashes the path
    as given, the key of runs made before 2026-12-07 (accepted by `finished_with`)."""
    decisive = {"finetune": cfg.finetune.decisive(), "seed": cfg.seed,
                "start": start if legacy else _within_run(start, cfg), "tasks": [task.decisive() for task in cfg.tasks]}
    if cfg.finetune.task_pacing.pacing != "none":  # only then does the order decide anything
        decisive["task_order"] = order
    if cfg.finetune.distill.weight > 0:  # the teachers decide it too: each expert's own fingerprint
        run = RunDir(cfg.resolved_run_dir)
        decisive["teachers"] = {task.name: read_manifest(run.expert(task.name)).get("fingerprint")
                                if is_done(run.expert(task.name)) else None for task in cfg.tasks}
    return digest(decisive)


def _within_run(start: str, cfg: RunConfig) -> str:
    """`run:<path in the run>` for a start model inside the run directory, else `start` itself (a hub id, the base)."""
    try:
        return "run:" + Path(start).resolve().relative_to(Path(cfg.resolved_run_dir).resolve()).as_posix()
    except (ValueError, OSError):
        return start


def finished_with(manifest: dict, cfg: RunConfig, start: str, order: list[str] | None = None) -> bool:
    """Whether a finished stage 3's manifest was trained with this config and start (either key of `fingerprint`)."""
    return manifest.get("fingerprint") in {fingerprint(cfg, start, order), fingerprint(cfg, start, order, legacy=True)}


def main(cfg: RunConfig, *, force: bool = False, before_step: Callable[[int], None] | None = None,
         folder: Path | None = None) -> dict:
    """Train (or resume, or skip when finished) stage 3 into `folder` (default: the run's `finetune/`)."""
    run = RunDir(cfg.resolved_run_dir, finetune=folder)
    settings = cfg.finetune
    seed = cfg.seed if settings.seed is None else settings.seed  # training; the dev sample stays the run's
    start = start_model_path(cfg, run)
    order = task_order(cfg, RunDir(cfg.resolved_run_dir))
    key = fingerprint(cfg, start, order)
    upstream = upstream_key(cfg, RunDir(cfg.resolved_run_dir))
    if is_done(run.finetune) and not force:
        manifest = read_manifest(run.finetune)
        if not finished_with(manifest, cfg, start, order):
            raise SentimergeError(f"{run.finetune}: finished with another config; pass --force to train it again")
        if "upstream" in manifest and manifest["upstream"] != upstream:  # runs made before it was kept: no check
            raise SentimergeError(f"{run.finetune}: trained on another stage 2 merge or other prepared data; run "
                                  "`sentimerge finetune --force` to train it again")
        log.info("finetune: already done in %s", run.finetune)
        return read_manifest(run.finetune)
    check_teachers(cfg, RunDir(cfg.resolved_run_dir))  # before a finished stage 3 is replaced
    if force or is_done(run.finetune):
        shutil.rmtree(run.finetune, ignore_errors=True)

    paced = settings.task_pacing.pacing != "none"
    if paced:
        log.info("finetune: tasks enter easiest first (%s pacing): %s", settings.task_pacing.pacing, ", ".join(order))
    build = (lambda: merge_as_adapter(cfg, RunDir(cfg.resolved_run_dir), start, seed)) \
        if settings.init == "experts" else None
    teachers = expert_teachers(cfg, RunDir(cfg.resolved_run_dir)) if settings.distill.weight > 0 else None
    manifest = train_multitask(cfg, run, start=start, fingerprint=key, seed=seed, before_step=before_step,
                               task_order=order, build_model=build, teachers=teachers,
                               manifest={"stage": "finetune", "upstream": upstream, "init": settings.init,
                                         **({"task_order": order} if paced else {})})
    log.info("finetune (%s): mean dev primary %.3f (start %.3f) -> %s", settings.weighting.name,
             manifest["dev"]["primary"], manifest["zero_shot"]["primary"], run.finetune)
    return read_manifest(run.finetune)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="train again even if stage 3 finished")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, force=args.force)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("finetune")
