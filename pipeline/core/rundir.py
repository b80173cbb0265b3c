"""The run directory: the one module that knows where each stage's files live, and how they are written.

Layout of a run directory::

    config.yaml                 resolved config of the last command that wrote here
    .lock                       held while a command writes (holder's pid, host and command inside)
    prepare/                    base model reference, canonical data per task and split, data report
    experts/<task>/adapter/     stage 1: one peft LoRA adapter per task (plus logs and a manifest)
    search/                     stage 2
    finetune/                   stage 3
    export/                     the merged checkpoint users take away
    eval/<name>/                tables from `sentimerge evaluate`
    report/                     `sentimerge report`: the other stage 3 variants it trains, their scores, the report

Every finished folder holds a `DONE.json` manifest written last: its presence, and only that, means finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sentimerge.pipeline.core import faults
from sentimerge.pipeline.core.errors import SentimergeError

log = logging.getLogger("sentimerge.rundir")

MANIFEST = "DONE.json"
EXPORT_TASKS = "sentimerge_tasks.yaml"  # in an export directory: the task specs `predict` answers with


class RunDir:
    """Paths inside one run directory; `finetune` places stage 3 elsewhere (the report's other variants)."""

    def __init__(self, root: str | Path, finetune: str | Path | None = None):
        self.root = Path(root)
        self._finetune = Path(finetune) if finetune is not None else None

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_info(self) -> Path:
        """`sentimerge run`'s wall time per stage and peak memory."""
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def prepare(self) -> Path:
        return self.root / "prepare"

    def data(self, task: str, split: str) -> Path:
        return self.prepare / "data" / task / f"{split}.jsonl"

    @property
    def base_model(self) -> Path:
        """JSON file naming the prepared base model directory."""
        return self.prepare / "model.json"

    @property
    def data_report(self) -> Path:
        return self.prepare / "data_report.json"

    @property
    def shared(self) -> Path:
        """Stage 1's shared adapter (`experts.shared`): `training/` (the adapter, trained on every task), `model/`
        (base + shared adapter, the model the experts train on and stage 2 merges onto), DONE.json last."""
        return self.root / "shared"

    @property
    def shared_training(self) -> Path:
        return self.shared / "training"

    @property
    def shared_model(self) -> Path:
        return self.shared / "model"

    @property
    def hybrid(self) -> Path:
        """Stage 1 in mode `hybrid`: the joint training of the task modules and their routers (adapter/<task>/,
        metrics, `coefficients.json`: the attention averaged into stage 2's per-layer coefficients)."""
        return self.root / "hybrid"

    @property
    def hybrid_coefficients(self) -> Path:
        return self.hybrid / "coefficients.json"

    @property
    def experts(self) -> Path:
        return self.root / "experts"

    def expert(self, task: str) -> Path:
        return self.experts / task

    def expert_adapter(self, task: str) -> Path:
        """The finished expert's LoRA adapter, in peft's own format (`PeftModel.from_pretrained` loads it)."""
        return self.expert(task) / "adapter"

    def expert_config(self, task: str) -> Path:
        """The expert's resolved config: the `experts` section and the task spec it was trained with."""
        return self.expert(task) / "config.yaml"

    def expert_metrics(self, task: str) -> Path:
        """JSON Lines: one row per step (loss, lr, examples/s) and per dev evaluation."""
        return self.expert(task) / "metrics.jsonl"

    def expert_schedule(self, task: str) -> Path:
        """JSON Lines: the curriculum actually followed (step, competence, difficulty of the examples drawn)."""
        return self.expert(task) / "schedule.jsonl"

    def expert_difficulty(self, task: str) -> Path:
        """JSON Lines: every pool example's difficulty and signals, easiest first."""
        return self.expert(task) / "difficulty.jsonl"

    def expert_checkpoint(self, task: str) -> Path:
        """Resumable training state of an unfinished expert (removed when it finishes)."""
        return self.expert(task) / "checkpoint"

    def base_loss_cache(self, task: str) -> Path:
        """The base model's loss per training example (a curriculum signal), kept across `--force` retrains."""
        return self.experts / ".cache" / task / "base_loss.json"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def search_candidates(self) -> Path:
        """Stage 2's append-only log: one JSON line per scored candidate."""
        return self.search / "candidates.jsonl"

    @property
    def search_generations(self) -> Path:
        return self.search / "generations.csv"

    @property
    def search_gold(self) -> Path:
        """One JSON line per generation: its best candidate scored on a gold dev sample."""
        return self.search / "gold.jsonl"

    @property
    def search_best(self) -> Path:
        return self.search / "best.json"

    @property
    def search_baselines(self) -> Path:
        return self.search / "baselines.json"

    @property
    def search_state(self) -> Path:
        """What the search was started with (a resumed search must match it)."""
        return self.search / "state.json"

    def search_weak(self, task: str) -> Path:
        return self.search / "weak" / f"{task}.jsonl"

    @property
    def search_levels(self) -> Path:
        """A multi-stage search's level-1 logs, one per group."""
        return self.search / "levels"

    def search_level_log(self, group: str) -> Path:
        """The level-1 log of `group`: one JSON line per scored candidate (like the flat log)."""
        return self.search_levels / f"{group}.jsonl"

    @property
    def search_level_plan(self) -> Path:
        """The groups of a multi-stage search in the order they enter, with their experts."""
        return self.search_levels / "plan.json"

    @property
    def search_level_models(self) -> Path:
        """group -> the level-1 candidate chosen as its group model, of every group chosen so far."""
        return self.search_levels / "group_models.json"

    def search_level_baselines(self, group: str) -> Path:
        """A level-1 group's baselines on its weak sets (its start point, each of its experts alone)."""
        return self.search_levels / "baselines" / f"{group}.json"

    def search_level_selection(self, group: str) -> Path:
        """A level-1 group's held-out selection log (its top candidates and its start, re-scored)."""
        return self.search_levels / "selection" / f"{group}.jsonl"

    def search_level_logs(self) -> dict[str, Path]:
        """group -> its level-1 log, of every group logged so far; {} for a flat search."""
        folder = self.search_levels
        return {path.stem: path for path in sorted(folder.glob("*.jsonl"))} if folder.is_dir() else {}

    def search_select_weak(self, task: str) -> Path:
        """The held-out weak set that picks the evolved merge among the best candidates."""
        return self.search / "weak-select" / f"{task}.jsonl"

    @property
    def search_selection(self) -> Path:
        """JSON Lines: each re-scored candidate's fitness on the held-out weak set (appended as scored)."""
        return self.search / "selection.jsonl"

    @property
    def search_selected(self) -> Path:
        """The evolved merge: the candidate the held-out weak set chose (written once the search is done)."""
        return self.search / "selected.json"

    @property
    def search_final_predictions(self) -> Path:
        """Every model of the final gold dev table's predictions, per task (for paired comparisons)."""
        return self.search_final_predictions_of("dev")

    def search_final_predictions_of(self, split: str) -> Path:
        """The final table's predictions on `split` (dev: `final_predictions.jsonl`, test: `..._test.jsonl`)."""
        return self.search / ("final_predictions.jsonl" if split == "dev" else f"final_predictions_{split}.jsonl")

    def search_final_table(self, split: str = "dev") -> Path:
        """The final gold table on `split`: every model of stage 2 on the same examples (`final.csv`, `final_test.csv`)."""
        return self.search / ("final.csv" if split == "dev" else f"final_{split}.csv")

    @property
    def search_report(self) -> Path:
        return self.search / "report.json"

    @property
    def search_recipe(self) -> Path:
        return self.search / "recipe.yml"

    @property
    def search_merged(self) -> Path:
        """The best merge, written by mergekit."""
        return self.search / "merged"

    @property
    def search_plots(self) -> Path:
        return self.search / "plots"

    @property
    def finetune(self) -> Path:
        return self._finetune if self._finetune is not None else self.root / "finetune"

    @property
    def finetune_adapter(self) -> Path:
        """Stage 3's LoRA adapter on the start model (peft format)."""
        return self.finetune / "adapter"

    @property
    def finetune_metrics(self) -> Path:
        """JSON Lines: per step the loss, each task's loss and weight, lr; per evaluation each task's dev metrics."""
        return self.finetune / "metrics.jsonl"

    @property
    def finetune_checkpoint(self) -> Path:
        return self.finetune / "checkpoint"

    @property
    def finetune_config(self) -> Path:
        return self.finetune / "config.yaml"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def export_eval(self, split: str = "dev") -> Path:
        """The exported model's metrics on `split`, on the final table's examples (`eval.csv`, `eval_test.csv`)."""
        return self.export / ("eval.csv" if split == "dev" else f"eval_{split}.csv")

    def evaluation(self, name: str) -> Path:
        return self.root / "eval" / name

    @property
    def report(self) -> Path:
        return self.root / "report"

    def report_finetune(self, weighting: str) -> Path:
        """Stage 3 trained with another task-weighting strategy than the run's, for the report."""
        return self.report / f"finetune-{weighting}"

    @property
    def report_multitask(self) -> Path:
        """A multi-task LoRA trained directly on the base model, the report's alternative to merging."""
        return self.report / "multitask-base"

    def report_eval(self, variant: str) -> Path:
        """One fine-tuned variant's metrics on the report's dev examples (a cache: re-scored only when stale)."""
        return self.report / f"eval-{variant}.csv"


def digest(decisive: Any) -> str:
    """A stage's fingerprint: a short hash of what decides its output (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def sweep_leftovers(final: Path) -> None:
    """Remove what a killed writer of `final` left (`.name.tmp-PID`, `.name.old-PID` of another process).

    Safe because the run directory's lock admits one command at a time, and the workers of one command (Ray tasks)
    write disjoint files."""
    mine = str(os.getpid())
    for leftover in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = leftover.name[len(final.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and pid != mine:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    faults.point(f"written {path.name}")
    os.replace(tmp, path)
    faults.point(f"renamed {path.name}")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_csv_atomic(path: Path, table) -> None:
    """A pandas table as CSV, written atomically."""
    write_text_atomic(path, table.to_csv(index=False))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row to an append-only JSON Lines log, flushed and synced so a crash loses at most this row.

    A torn last line left by a crash mid-append is cut off first, so the new row never lands on its end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    faults.point(f"appended {path.name}")


def _drop_torn_tail(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        handle.truncate(handle.read().rfind(b"\n") + 1)  # rare: only after a crash
    log.warning("%s: dropped a torn last line (a crash mid-write)", path)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines file. A last line without its newline is what a crash mid-append leaves: it is
    dropped (the row is written again on resume). Any other line that does not parse is an error naming it."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    torn = lines.pop()  # "" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise SentimergeError(f"{path}:{number}: corrupted line ({error.msg}); fix or remove it") from None
    if torn.strip():
        log.warning("%s: dropping a torn last line (a crash mid-write): %.60s", path, torn)
    return rows


def save_figure(figure, path: Path) -> Path:
    """Write a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def is_done(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SentimergeError(f"{folder}: not finished (no {MANIFEST}); run the stage that writes it first") from None
    except json.JSONDecodeError as error:
        raise SentimergeError(f"{path}: corrupted manifest ({error.msg} at line {error.lineno})") from None


def write_manifest(folder: Path, **info: Any) -> None:
    """Mark `folder` finished. Call it last, after everything else in the folder is written."""
    from sentimerge.pipeline.core import __version__

    write_json_atomic(folder / MANIFEST, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "version": __version__, **info})


@contextlib.contextmanager
def fresh_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place when the block succeeds.

    A finished folder (one with a manifest) is only replaced when `overwrite` is set; a half-written
    leftover from a crash is never reused.
    """
    if is_done(final) and not overwrite:
        raise SentimergeError(f"{final}: already finished; pass --force to redo it")
    sweep_leftovers(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    faults.point(f"built {final.name}/")
    if final.exists():
        stale = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    faults.point(f"renamed {final.name}/")


@contextlib.contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """Hold the run directory's lock; a second writer gets a clear error naming the holder."""
    created = not run.root.exists()
    run.root.mkdir(parents=True, exist_ok=True)
    handle = open(run.lock, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SentimergeError(f"{run.root}: in use by {holder}; wait for it to finish") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv[:3])}")
        handle.flush()
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        if created and [p.name for p in run.root.iterdir()] == [run.lock.name]:  # a failed first command: no trace
            run.lock.unlink()
            run.root.rmdir()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
