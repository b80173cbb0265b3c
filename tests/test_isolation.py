"""`core.isolation.run_isolated`: heavy work in a forked child behaves like an in-process call (value, exception,
fault counter, death by a signal), its memory stays out of the parent, and only the command line forks.

Each case runs in a fresh interpreter, as the command line does: this test process has run model math, and a child
forked from it would hang in its first parallel region (which is why only the entry point allows forking)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sentimerge.pipeline.core.isolation import isolation_available, run_isolated

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="isolation forks on Linux only")

PRELUDE = """
import json, os, signal, sys
import numpy as np
from sentimerge.pipeline.core import faults
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.isolation import allow_fork, run_isolated

def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

allow_fork()
"""


def _python(body: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          check=False, timeout=120, **kwargs)


def _result(body: str) -> dict:
    done = _python(body)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_work_runs_in_a_child_and_its_value_and_memory_come_back_as_they_should():
    result = _result("""
        import torch

        def work(megabytes):
            block = torch.ones(megabytes * 2**20 // 4)  # touched: resident; torch math in the child only
            return os.getpid(), float(block.sum()), float((torch.ones(256, 256) @ torch.ones(256, 256))[0, 0])

        before = resident_mb()
        pid, total, product = run_isolated(work, 300)
        print(json.dumps({"child": pid, "parent": os.getpid(), "total": total, "product": product,
                          "grew_mb": resident_mb() - before}))
    """)
    assert result["child"] != result["parent"] and result["total"] == 300 * 2**20 // 4 and result["product"] == 256
    assert result["grew_mb"] < 100  # the child's 300 MB never reached the parent


def test_the_childs_exception_is_raised_in_the_parent_with_its_type_and_message():
    result = _result("""
        def fail(message):
            raise SentimergeError(message)

        try:
            run_isolated(fail, "runs/x: finished with other settings")
        except SentimergeError as error:
            print(json.dumps({"message": str(error), "notes": error.__notes__}))
    """)
    assert result["message"] == "runs/x: finished with other settings"
    assert any("in the child process" in note and "SentimergeError" in note for note in result["notes"])


def test_the_fault_counter_continues_where_the_child_left_it(tmp_path):
    trace = tmp_path / "trace.txt"
    result = _result(f"""
        os.environ["SENTIMERGE_FAULT_TRACE"] = {str(trace)!r}
        faults.point("before")

        def points(count):
            for _ in range(count):
                faults.point("in the child")
            return faults.count()

        in_child = run_isolated(points, 3)
        faults.point("after")
        print(json.dumps({{"in_child": in_child, "after": faults.count()}}))
    """)
    assert result == {"in_child": 4, "after": 5} and len(trace.read_text().splitlines()) == 5


def test_a_child_killed_by_a_signal_kills_the_parent_the_same_way():
    """The kill tests' SIGKILL at a fault point (or the OOM killer) inside a stage ends the whole command, as it did
    when the stage ran in-process."""
    done = _python("""
        assert run_isolated(abs, -3) == 3
        run_isolated(lambda: os.kill(os.getpid(), signal.SIGKILL))
        print("not reached")
    """)
    assert done.returncode == -signal.SIGKILL and "not reached" not in done.stdout


def test_a_killed_parent_takes_its_child_with_it(tmp_path):
    """`sentimerge run` killed mid-stage leaves no child process writing into the run directory."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(f"""
        import time
        from pathlib import Path

        def work():
            Path({str(pid_file)!r}).write_text(str(os.getpid()))
            time.sleep(120)

        run_isolated(work)
    """)])
    try:
        deadline = time.time() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.time() < deadline and parent.poll() is None
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 30
        while _alive(child):
            assert time.time() < deadline, "the child outlived its killed parent"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_only_the_command_lines_entry_point_forks(monkeypatch):
    """Called from Python (this test process has run model math), the work runs here; `SENTIMERGE_ISOLATE=0` turns
    forking off even where the entry point allowed it."""
    assert not isolation_available() and run_isolated(os.getpid) == os.getpid()
    monkeypatch.setenv("SENTIMERGE_ISOLATE", "0")
    assert _result("print(json.dumps({'same': run_isolated(os.getpid) == os.getpid()}))") == {"same": True}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


def test_stage_1_trains_the_shared_adapter_and_each_expert_in_a_child_with_the_same_result(tmp_path, cache_dir):
    """`sentimerge experts` from the command line forks the shared adapter's training and each expert's (the stage's
    own process does no model math, so it can fork again): it finishes, without hanging in a child, with adapters
    equal to the bit to those trained in one process (`SENTIMERGE_ISOLATE=0`)."""
    from safetensors.torch import load_file

    from sentimerge.pipeline import prepare
    from sentimerge.pipeline.core.config import load_config
    from sentimerge.pipeline.core.rundir import RunDir
    from tests.conftest import write_tiny_config

    config = write_tiny_config(tmp_path, cache_dir=cache_dir,
                               experts={"steps": 2, "batch_size": 4, "dev_examples": 4,
                                        "shared": {"examples": 12, "per_task": 2}})
    prepare.main(load_config(config))
    adapters = {}
    for isolate in ("1", "0"):
        run_dir = tmp_path / f"run-{isolate}"
        shutil.copytree(tmp_path / "run", run_dir)
        done = subprocess.run([sys.executable, "-m", "sentimerge", "experts", str(config), "--run-dir", str(run_dir)],
                              capture_output=True, text=True, check=False, timeout=300,
                              env={**os.environ, "SENTIMERGE_ISOLATE": isolate})
        assert done.returncode == 0, done.stderr
        run = RunDir(str(run_dir))
        adapters[isolate] = {task: load_file(run.expert_adapter(task) / "adapter_model.safetensors")
                             for task in ("polarity", "aspect3", "intensity")}
        adapters[isolate]["shared"] = load_file(run.shared_model / "model.safetensors")
    for name, tensors in adapters["1"].items():
        assert tensors.keys() == adapters["0"][name].keys()
        assert all(torch.equal(value, adapters["0"][name][key]) for key, value in tensors.items()), name
