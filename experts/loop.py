"""The resumable training loop shared by the training stages: learning-rate schedule, optimizer steps, periodic
evaluation, best/last selection, JSON Lines metrics, progress, and checkpoints that resume exactly.

Numeric faults: a step whose loss or gradient norm is not finite is skipped (no optimizer update, no `after_step`,
so task weights never see it), logged with `skipped` and counted in the state; `max_skipped_in_a_row` such steps in
a row stop the run with an error, keeping the last checkpoint.

The stage supplies what differs: `step(step) -> row` computes the loss of one step and back-propagates it (the loop
then clips, steps the optimizer and calls `after_step`), `evaluate() -> metrics` scores a dev sample, and `extra`
state (sampler, task weights, ...) that must survive a crash.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sentimerge.experts.checkpoint import (
    load_trainable_state,
    read_state,
    restore_checkpoint,
    save_checkpoint,
    trainable_state,
)
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import append_jsonl, read_jsonl, write_jsonl_atomic

log = logging.getLogger("sentimerge.train")


@dataclass
class Loop:
    """What a training run needs from its stage."""

    name: str
    total_steps: int
    checkpoint_dir: Path
    metrics_log: Path
    fingerprint: str
    step: Callable[[int], dict]
    learning_rate: Callable[[int], float]
    evaluate: Callable[[], dict]
    eval_steps: set[int]
    checkpoint_every: int
    keep: str = "last"
    max_grad_norm: float | None = 1.0
    after_step: Callable[[int], None] = lambda step: None
    extra_state: Callable[[], dict] = dict
    load_extra_state: Callable[[dict], None] = lambda state: None
    logs_to_truncate: list[Path] = field(default_factory=list)
    before_step: Callable[[int], None] = lambda step: None  # e.g. a test that kills the run at a given step
    max_skipped_in_a_row: int = 5
    evaluate_start: bool = True  # False: no evaluation before the first step (`zero_shot` is None)


def run_loop(loop: Loop, model, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """Train to `loop.total_steps`, resuming from the checkpoint if there is one; returns the final state.

    The state holds `zero_shot` (metrics before training; None with `loop.evaluate_start` off), `last` and `best`
    ({step, dev}), and seconds spent.
    With `keep: best` the model ends with the best evaluated weights loaded.
    """
    trainable = [param for param in model.parameters() if param.requires_grad]
    state = read_state(loop.checkpoint_dir)
    best = None
    if state is not None:
        if state["fingerprint"] != loop.fingerprint:
            raise SentimergeError(f"{loop.checkpoint_dir}: a checkpoint of another config; pass --force to start again")
        state, best = restore_checkpoint(loop.checkpoint_dir, model=model, optimizer=optimizer, device=device)
        loop.load_extra_state(state["extra"])
        for path in [loop.metrics_log, *loop.logs_to_truncate]:
            truncate_log(path, state["step"])
        log.info("%s: resuming at step %d of %d", loop.name, state["step"], loop.total_steps)
        threads = torch.get_num_threads()
        if state.get("threads", threads) != threads:
            log.warning("%s: resumed with %d torch thread(s) where it started with %d; bf16 math rounds some "
                        "outputs differently with the thread count, so the result may differ slightly from an "
                        "uninterrupted run's (set `threads: %d` to match it)", loop.name, threads, state["threads"],
                        state["threads"])
    else:  # a fresh start: rows logged by an attempt that died before its first checkpoint are void
        for path in [loop.metrics_log, *loop.logs_to_truncate]:
            truncate_log(path, -1)
        started = time.time()
        zero_shot = loop.evaluate() if loop.evaluate_start else None
        state = {"step": 0, "fingerprint": loop.fingerprint, "zero_shot": zero_shot, "train_seconds": 0.0,
                 "eval_seconds": time.time() - started, "best": None, "last": None,
                 "threads": torch.get_num_threads()}
        if zero_shot is not None:
            append_jsonl(loop.metrics_log, {"step": 0, "dev": zero_shot})

    model.train()
    step = state["step"]
    in_a_row = 0
    progress = tqdm(total=loop.total_steps, initial=step, desc=loop.name, unit="step", mininterval=2.0,
                    dynamic_ncols=True)
    while step < loop.total_steps:
        loop.before_step(step)
        lr = loop.learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tick = time.time()
        row = loop.step(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, loop.max_grad_norm or math.inf)
        fault = _numeric_fault(row, grad_norm)
        if fault is None:
            optimizer.step()
            loop.after_step(step)
            in_a_row = 0
        else:  # skip the update; the batch counts as consumed so a resumed run stays in step with this one
            row = {**_finite_or_none(row), "skipped": fault}
            state["skipped_steps"] = [*state.get("skipped_steps", []), step + 1]
            in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - tick
        state["train_seconds"] += seconds
        step += 1
        row = {"step": step, **row, "lr": lr, "seconds": round(seconds, 3)}
        if fault is not None:
            log.warning("%s: step %d skipped (%s)", loop.name, step, fault)
            if in_a_row >= loop.max_skipped_in_a_row:
                append_jsonl(loop.metrics_log, row)
                raise SentimergeError(
                    f"{loop.name}: {in_a_row} steps in a row with a {fault} (the last at step {step}); the last "
                    f"checkpoint in {loop.checkpoint_dir} is kept: lower the learning rate or check the data")
        if step in loop.eval_steps:
            tick = time.time()
            row["dev"] = loop.evaluate()
            state["eval_seconds"] += time.time() - tick
            if loop.keep == "best" and (state["best"] is None or row["dev"]["primary"] > state["best"]["primary"]):
                state["best"] = {"step": step, "primary": row["dev"]["primary"], "dev": row["dev"]}
                best = trainable_state(model)
            state["last"] = {"step": step, "dev": row["dev"]}
            progress.write(f"{loop.name}: step {step} dev primary={row['dev']['primary']:.3f}", file=sys.stderr)
        append_jsonl(loop.metrics_log, row)
        loss = row.get("loss")
        progress.set_postfix(loss="skipped" if loss is None else f"{loss:.3f}", lr=f"{lr:.1e}",
                             **({"ex_s": f"{row['examples_per_s']:.1f}"} if "examples_per_s" in row else {}))
        progress.update(1)
        if step % loop.checkpoint_every == 0 and step < loop.total_steps:
            save_checkpoint(loop.checkpoint_dir, model=model, optimizer=optimizer, best=best,
                            state={**state, "step": step, "extra": loop.extra_state()})
    progress.close()
    if loop.keep == "best" and best is not None:
        load_trainable_state(model, {name: tensor.to(device) for name, tensor in best.items()})
    state["step"] = step
    state["kept"] = state["best"] if loop.keep == "best" and state["best"] else state["last"]
    return state


def _numeric_fault(row: dict, grad_norm: torch.Tensor) -> str | None:
    """Why this step must not update the weights, or None: a non-finite loss, or a non-finite gradient norm."""
    loss = row.get("loss")
    if loss is not None and not math.isfinite(loss):
        return "non-finite loss"
    if not bool(torch.isfinite(grad_norm)):
        return "non-finite gradient"
    return None


def _finite_or_none(value):
    """`value` with NaN and inf replaced by None, so the log stays strict JSON."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_log(path: Path, step: int) -> None:
    """Drop rows written after the checkpoint we resume from (they will be written again)."""
    if path.is_file():
        write_jsonl_atomic(path, [row for row in read_jsonl(path) if row["step"] <= step])
