"""Run one unit of heavy work (a stage, a training) in a forked child process, so that its memory is handed back
to the system when it ends.

A CPU training or scoring loop leaves a process's resident memory well above what it still holds: glibc keeps
fragmented heap that `malloc_trim` cannot return, and oneDNN keeps its kernels' scratch memory. On the demo, a stage
started in a process that had run the stages before it peaked 500-700 MB higher than the same stage in a fresh
process (finetune: 3015 against 2288 MB; `benchmarks/results/demo_profile.md`). `run_isolated` forks, runs the work in
the child and hands its return value (or its exception) back through a pipe; the parent has done no model math, so
every unit of work starts from the memory of an idle, already-imported process, without a new interpreter's imports.

Forking is safe only in a process that has run no model math yet: a fork copies the calling thread alone, and a
child of a process whose OpenMP team (torch's intra-op threads) has run a parallel region hangs in its first one
(seen: a stage forked from a test process that had run model math hung in its first matmul). So only the command
line forks: its entry point (`sentimerge ...`, `python -m sentimerge ...`) calls `allow_fork()` before anything, and
`sentimerge run` does no model math in its own process, only in the children. Called from Python (a notebook, the
tests, `cli.main([...])`), the work runs in the calling process, as before.

Behaviour is that of an in-process call: the same return value, the same exception (its type and message), and the
fault points' counter (`core.faults`) continues in the parent where the child left it. A child killed by a signal
(the kill tests' SIGKILL, the OOM killer) kills the parent with the same signal, as if it had been one process; a
parent that dies takes its child with it (Linux's parent-death signal), so no orphan writes into a run directory.
Off Linux (no `os.fork` on Windows; macOS's system libraries are not fork-safe either), or with
`SENTIMERGE_ISOLATE=0`, the work runs in the calling process.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from sentimerge.pipeline.core import faults

T = TypeVar("T")
ENV = "SENTIMERGE_ISOLATE"


_FORK_ALLOWED = False


def allow_fork() -> None:
    """Let `run_isolated` fork in this process: the command line's entry point calls it first, while the process
    has run no model math (see the module docstring)."""
    global _FORK_ALLOWED
    _FORK_ALLOWED = True


def isolation_available() -> bool:
    """True where `run_isolated` forks: Linux, a process whose entry point allowed it, `SENTIMERGE_ISOLATE` not 0."""
    return _FORK_ALLOWED and sys.platform.startswith("linux") and os.environ.get(ENV, "1") != "0"


def run_isolated(work: Callable[..., T], *args, **kwargs) -> T:
    """`work(*args, **kwargs)` in a forked child process (see the module docstring); its return value must pickle.

    Raises what `work` raised (the exception re-raised in the parent, its child traceback in `__notes__`), or
    ChildProcessError when the child ended without a result and not by a signal."""
    if not isolation_available():
        return work(*args, **kwargs)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        _child(work, args, kwargs, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):  # killed: die the same way, as one process would have
        os.kill(os.getpid(), os.WTERMSIG(status))
    if not payload:
        raise ChildProcessError(f"{getattr(work, '__qualname__', work)}: the child process exited with "
                                f"{os.waitstatus_to_exitcode(status)} and no result")
    kind, value, count = pickle.loads(payload)
    faults.set_count(count)
    if kind == "error":
        raise value
    return value


def _child(work: Callable, args: tuple, kwargs: dict, write_end: int) -> None:
    status = 0
    try:
        _die_with_parent()
        result = ("ok", work(*args, **kwargs), faults.count())
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
        import traceback

        status = 1
        error.add_note("in the child process:\n" + "".join(traceback.format_exception(error)).rstrip())
        result = ("error", error, faults.count())
    try:
        payload = pickle.dumps(result)
    except Exception as error:  # an unpicklable result or exception: say what it was
        payload = pickle.dumps(("error", ChildProcessError(f"{result[0]} that does not pickle: {result[1]!r} "
                                                           f"({error})"), faults.count()))
    try:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        _close_ray()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(status)  # no atexit handlers: they belong to the parent (its temporary folders, its Ray)


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux's prctl; `run_isolated` forks on Linux only): a killed
    `sentimerge run` leaves no child writing."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)


def _close_ray() -> None:
    """A Ray session the child started (a stage on the Ray backend) ends with it: os._exit skips Ray's atexit. (The
    parent had none: a process with Ray's threads is not forked.)"""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
