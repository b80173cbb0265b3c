"""The kill harness (`make kill-test`, `benchmarks/kill_resume.py`, the tests): run a stage, kill it with SIGKILL
at a seeded random fault point or after a random delay, resume it, and compare the run directory with an
uninterrupted run's. The fault points themselves live in `sentimerge.pipeline.core.faults`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sentimerge.pipeline.core import faults

STAGES = ("prepare", "experts", "search", "finetune", "export")
# Keys and files that record wall-clock time or host state: they differ between any two runs and are not compared.
VOLATILE_KEYS = re.compile(r"seconds|(^|_)(per_s|ex_s)$|_at$|(^|_)(ms|s)_per_")
VOLATILE_FILES = {"timing.json", ".lock"}
SKIPPED_SUFFIXES = {".png"}  # figures are drawn from the logs that are compared


def _without_volatile(value):
    if isinstance(value, dict):
        return {key: _without_volatile(item) for key, item in value.items() if not VOLATILE_KEYS.search(str(key))}
    if isinstance(value, list):
        return [_without_volatile(item) for item in value]
    return value


def snapshot(root: Path) -> dict[str, object]:
    """What a run directory holds, file by file, with wall-clock fields dropped (tensors stay tensors)."""
    import pandas as pd
    from safetensors.torch import load_file

    files: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or path.name in VOLATILE_FILES or path.suffix in SKIPPED_SUFFIXES:
            continue
        if path.suffix == ".safetensors":
            files[relative] = load_file(path)
        elif path.suffix == ".json":
            files[relative] = _without_volatile(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl":
            files[relative] = [_without_volatile(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
        elif path.suffix == ".csv":
            table = pd.read_csv(path)
            table = table.drop(columns=[c for c in table.columns if VOLATILE_KEYS.search(c)])
            files[relative] = table.astype(object).where(table.notna(), None).to_dict("list")  # NaN != NaN
        else:
            files[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def differences(expected: dict[str, object], actual: dict[str, object], *, atol: float = 1e-6) -> list[str]:
    """Human-readable differences between two snapshots (empty when the runs ended the same)."""
    import torch

    found = [f"missing: {name}" for name in sorted(set(expected) - set(actual))]
    found += [f"unexpected: {name}" for name in sorted(set(actual) - set(expected))]
    for name in sorted(set(expected) & set(actual)):
        want, got = expected[name], actual[name]
        if isinstance(want, dict) and want and all(torch.is_tensor(v) for v in want.values()):
            if want.keys() != got.keys():
                found.append(f"{name}: tensors {sorted(set(want) ^ set(got))[:3]} differ")
                continue
            worst = max((float((want[k].float() - got[k].float()).abs().max()) for k in want), default=0.0)
            if worst > atol:
                found.append(f"{name}: tensors differ by up to {worst:.3g}")
        elif want != got:
            found.append(f"{name}: content differs")
    return found


@dataclass
class Trial:
    """One kill-and-resume trial: which stage, where it was killed, and what the resumed run ended with."""

    index: int
    stage: str
    mode: str                 # "write": killed at the N-th write point; "time": killed after a random delay
    kill_at: float            # the write point N, or the delay in seconds
    killed: bool              # False when the stage finished before the kill landed
    writes_before_kill: int   # write points the killed attempt passed (0: it died before writing anything)
    resume_code: int
    differences: list[str]
    stray_files: list[str]    # temporary files or folders left behind after the resumed run

    @property
    def ok(self) -> bool:
        return self.resume_code == 0 and not self.differences and not self.stray_files


def sentimerge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sentimerge", *args]


def _run(args: list[str], env: dict[str, str], *, kill_after: float | None = None, log: Path | None = None) -> int:
    with open(log or os.devnull, "w") as output:
        process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            return process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            return process.wait()


def _run_in_process(argv: list[str], trace: Path) -> int:
    from sentimerge.pipeline.cli import main

    previous = os.environ.get("SENTIMERGE_FAULT_TRACE")
    os.environ["SENTIMERGE_FAULT_TRACE"] = str(trace)
    faults.reset()
    try:
        return main(argv)
    finally:
        if previous is None:
            os.environ.pop("SENTIMERGE_FAULT_TRACE")
        else:
            os.environ["SENTIMERGE_FAULT_TRACE"] = previous


def _restore(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    if source.exists():
        shutil.copytree(source, target)


def stray_files(root: Path) -> list[str]:
    """Leftovers of interrupted writes (`.name.tmp-PID`, `.name.old-PID`) after a finished run."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*") if re.search(r"\.(tmp|old)-\d+$", p.name))


class KillHarness:
    """Runs the stages of a config once uninterrupted (the reference, snapshotted after each stage), then trials.

    A trial restores the run directory as the reference left it before the stage, runs the stage with a kill, runs
    it again to resume, and compares the directory with the reference after the stage. The run directory path is the
    same for the reference and every trial (the config's `run_dir`), so artifacts that record paths compare equal.
    """

    def __init__(self, config: Path, run_dir: Path, work: Path, *, stages: tuple[str, ...] = STAGES,
                 in_process: bool = False):
        """`in_process` runs the reference in this process (saves the start-up of a Python per stage in tests)."""
        self.config, self.run_dir, self.work, self.stages = Path(config), Path(run_dir), Path(work), stages
        self.in_process = in_process
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.pop("SENTIMERGE_FAULT", None)
        self.points: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.reference: dict[str, dict[str, object]] = {}  # stage -> snapshot of the run directory after it

    def _command(self, stage: str) -> list[str]:
        return sentimerge_command(stage, str(self.config), "--run-dir", str(self.run_dir))

    def _after(self, stage: str) -> Path:
        return self.work / f"after-{stage}"

    def _before(self, stage: str) -> Path:
        index = self.stages.index(stage)
        return self._after(self.stages[index - 1]) if index else self.work / "empty"

    def prepare_reference(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            trace, log = self.work / f"trace-{stage}.txt", self.work / f"reference-{stage}.log"
            trace.unlink(missing_ok=True)
            started = time.perf_counter()
            if self.in_process:
                code = _run_in_process(self._command(stage)[3:], trace)
            else:
                code = _run(self._command(stage), {**self.env, "SENTIMERGE_FAULT_TRACE": str(trace)}, log=log)
            self.seconds[stage] = time.perf_counter() - started
            if code != 0:
                # in process, the command's error went to this process's stderr, not to a log
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else ["see stderr"]
                raise RuntimeError(f"reference run: `sentimerge {stage}` exited with {code}: {' | '.join(tail)}")
            self.points[stage] = len(trace.read_text().splitlines()) if trace.exists() else 0
            _restore(self.run_dir, self._after(stage))
            self.reference[stage] = snapshot(self.run_dir)

    def trial(self, index: int, stage: str, mode: str, rng) -> Trial:
        _restore(self._before(stage), self.run_dir)
        command = self._command(stage)
        trace = self.work / f"trial-{index}-trace.txt"
        trace.unlink(missing_ok=True)
        env = {**self.env, "SENTIMERGE_FAULT_TRACE": str(trace)}
        if mode == "write":
            kill_at = float(rng.randint(1, max(1, self.points[stage])))
            code = _run(command, {**env, "SENTIMERGE_FAULT": f"kill@{int(kill_at)}"})
        else:  # the first ~third of a tiny stage is Python starting up; kill within the rest
            kill_at = round(rng.uniform(0.35 * self.seconds[stage], self.seconds[stage]), 2)
            code = _run(command, env, kill_after=kill_at)
        killed = code == -signal.SIGKILL
        writes = len(trace.read_text().splitlines()) if trace.exists() else 0
        resume_code = _run(command, self.env, log=self.work / f"trial-{index}-resume.log")
        found = differences(self.reference[stage], snapshot(self.run_dir)) if resume_code == 0 else []
        return Trial(index, stage, mode, kill_at, killed, writes, resume_code, found, stray_files(self.run_dir))

    def trials(self, count: int, seed: int, *, modes: tuple[str, ...] = ("write", "time"),
               stages: tuple[str, ...] | None = None) -> Iterator[Trial]:
        """`count` trials, going round the stages (each mode in turn per round); kill points drawn from `seed`."""
        import random

        rng = random.Random(seed)
        stages = stages or self.stages
        plan = [(stages[i % len(stages)], modes[(i // len(stages)) % len(modes)]) for i in range(count)]
        for index, (stage, mode) in enumerate(plan):
            yield self.trial(index, stage, mode, rng)
