"""`benchmarks/results/summary.json`: the headline figures under stable keys, each with its date, machine and command.

Each benchmark script calls `record(...)` for the keys it measures; a key keeps its latest measurement.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

SUMMARY = Path(__file__).resolve().parent / "results" / "summary.json"
KEYS = ("candidate_speedup_vs_mergekit", "merge_share_of_candidate_time", "scoring_flop_utilization",
        "training_speedup_vs_plain_peft", "demo_wall_seconds", "demo_peak_rss_mb", "retention_evolved",
        "retention_final", "weak_gold_spearman")


def cpu_model() -> str:
    """The CPU's model name, its clock and whether it has AMX (bf16 tiles), from /proc/cpuinfo (Linux; '' elsewhere):
    the same seed trains to other numbers on other CPUs (bf16 kernels round differently), so results say which."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""
    fields = dict(line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    amx = ", AMX" if "amx_bf16" in fields.get("flags", "").split() else ""
    return f"{fields.get('model name', '?')} {float(fields.get('cpu MHz', 0)):.0f} MHz{amx}, "


def machine() -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), {cpu_model()}"
            f"{platform.system()} {platform.release()}, torch {torch.__version__}"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))


def record(values: dict[str, float], *, command: str | None = None, notes: str | None = None) -> None:
    """Merge `values` into summary.json, stamping each with today's date, this machine and the command."""
    summary = json.loads(SUMMARY.read_text()) if SUMMARY.is_file() else {}
    command = command or "python " + shlex.join([os.path.relpath(sys.argv[0], SUMMARY.parents[2]), *sys.argv[1:]])
    for key, value in values.items():
        summary[key] = {"value": round(float(value), 4), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                        "command": command, **({"notes": notes} if notes else {})}
    ordered = {key: summary[key] for key in [*KEYS, *sorted(set(summary) - set(KEYS))] if key in summary}
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps(ordered, indent=2) + "\n")


def finished_search(config: str, run_dir: str):
    """(config, run) of a benchmark that reads a finished search: a one-line exit when the search is not finished;
    logging and the config's torch threads set up as the stages do."""
    from sentimerge.pipeline.core.config import load_config
    from sentimerge.pipeline.core.rundir import RunDir, is_done
    from sentimerge.pipeline.core.runtime import set_threads, setup_logging

    setup_logging()
    cfg = load_config(config, run_dir=run_dir)
    run = RunDir(cfg.resolved_run_dir)
    if not is_done(run.search):
        raise SystemExit(f"{run.search}: no finished search; run `sentimerge search {config}` first")
    set_threads(cfg.threads)
    return cfg, run
