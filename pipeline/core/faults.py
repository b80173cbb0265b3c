"""Fault injection for the kill tests: make a run die with SIGKILL at a chosen write, the way a crash would.

Every write of the artifact layer (`core.rundir`, training checkpoints, adapters) passes a *fault point*: once
after the bytes are on disk under their temporary name and once after the rename (or after an append). Two
environment variables, both unset in normal use, act on those points:

- `SENTIMERGE_FAULT_TRACE=FILE` appends each point's name to FILE (the kill harness counts a stage's points this way);
- `SENTIMERGE_FAULT=kill@N` kills the process with SIGKILL at its N-th point (1-based): no cleanup, no `finally`,
  no flush, exactly like a power cut or the OOM killer.

The kill harness (`sentimerge.pipeline.killtest`, run by `benchmarks/kill_resume.py` and the tests) uses them to check that a run killed anywhere and
resumed ends with the same artifacts as an uninterrupted one.
"""

from __future__ import annotations

import os
import signal

_count = 0


def point(name: str) -> None:
    """A place where a crash must be survivable; `name` says which write it is (for the trace)."""
    global _count
    trace = os.environ.get("SENTIMERGE_FAULT_TRACE")
    fault = os.environ.get("SENTIMERGE_FAULT")
    if not trace and not fault:
        return
    _count += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(f"{name}\n")
    if fault and fault.startswith("kill@") and _count == int(fault[len("kill@"):]):
        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Start counting fault points from zero again (the kill harness runs several stages in one process)."""
    global _count
    _count = 0


def count() -> int:
    """The fault points passed so far in this process."""
    return _count


def set_count(value: int) -> None:
    """Continue counting from `value` (a forked child's count, `core.isolation`: one sequence, as in one process)."""
    global _count
    _count = value
