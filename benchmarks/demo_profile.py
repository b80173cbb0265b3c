"""Where a pipeline run spends its time and memory: per stage, per kind of work, by sampling the running stack.

    python benchmarks/demo_profile.py configs/demo.yaml --run-dir RUN --label after [--interval 0.05] [--in-process]

Runs `sentimerge run CONFIG` from an empty run directory (refused otherwise: a skipped stage would measure nothing)
while a thread in the process that runs each stage (the stage's forked child, `core.isolation`, or this process with
`SENTIMERGE_ISOLATE=0`) samples, every `--interval` seconds, that process's main-thread Python stack and resident
memory (`/proc/self/statm`). Each sample is charged to the stage that is running and to one kind of work,
the first of these found anywhere on the stack:

    scoring       pipeline/core/scoring.py (every evaluation, weak label, candidate fitness, base-model loss)
    training      experts/loop.py, experts/multitask.py, experts/hybrid.py (forward, backward, optimizer)
    curriculum    curriculum/ (difficulty signals other than scoring)
    mergekit      the mergekit package (recipe check, export)
    merging       merge/engine.py, merge/lora.py, merge/methods.py (deltas and merged weights in memory)
    load/save     transformers' and peft's from_pretrained / save_pretrained, safetensors, gguf
    other         everything else (data, CMA-ES, logging, tables)

A sampling profiler adds no code to the pipeline and charges nested work to its innermost kind that matters (an
evaluation inside a training loop counts as scoring). Writes benchmarks/results/demo_profile_LABEL.json and
benchmarks/results/demo_profile.md, which puts every label's profile side by side (seconds and peak MB per stage
and per kind, and their ratios to the first label).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine

RESULTS = ROOT / "benchmarks" / "results"
KINDS = (  # (kind, path fragments), in priority order: the first kind found anywhere on the stack wins
    ("scoring", ("pipeline/core/scoring.py",)),
    ("training", ("experts/loop.py", "experts/multitask.py", "experts/hybrid.py")),
    ("curriculum", ("curriculum/",)),
    ("mergekit", ("site-packages/mergekit/",)),
    ("merging", ("merge/engine.py", "merge/lora.py", "merge/methods.py")),
    ("load/save", ("transformers/modeling_utils.py", "peft/peft_model.py", "peft/utils/save_and_load.py",
                   "safetensors/", "gguf/", "transformers/integrations/ggml.py")),
)
ORDER = [kind for kind, _ in KINDS] + ["other"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


def kind_of(frame) -> str:
    files = []
    while frame is not None:
        files.append(frame.f_code.co_filename.replace(os.sep, "/"))
        frame = frame.f_back
    for kind, fragments in KINDS:
        if any(fragment in name for name in files for fragment in fragments):
            return kind
    return "other"


def where(frame, depth: int = 3) -> list[str]:
    """The innermost frame on the stack, then the innermost `depth` frames of this project (the package, not the
    venv or the benchmark), as `path:line function`."""
    found: list[str] = []
    innermost = frame
    while frame is not None and len(found) < depth:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if name.startswith(str(ROOT)) and "/site-packages/" not in name and "/benchmarks/" not in name:
            found.append(f"{name.removeprefix(str(ROOT) + '/')}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    if innermost is not None:
        name = innermost.f_code.co_filename.replace(os.sep, "/").split("/site-packages/")[-1]
        top = f"{name.removeprefix(str(ROOT) + '/')}:{innermost.f_lineno} {innermost.f_code.co_name}"
        if not found or found[0] != top:
            found.insert(0, top)
    return found


class Sampler(threading.Thread):
    """Samples this process's main thread and resident memory, charging each sample to `stage` and a kind."""

    def __init__(self, interval: float, stage: str = "start"):
        super().__init__(daemon=True)
        self.interval, self.stage, self.stop = interval, stage, threading.Event()
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.peak: dict[tuple[str, str], float] = defaultdict(float)
        self.peak_where: dict[str, tuple[float, list[str]]] = {}  # stage -> (MB, the stack at the stage's peak)
        self.main = threading.main_thread().ident

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stop.wait(self.interval):
            now = time.perf_counter()
            frame = sys._current_frames().get(self.main)
            key = (self.stage, kind_of(frame) if frame is not None else "other")
            self.seconds[key] += now - last
            resident = rss_mb()
            self.peak[key] = max(self.peak[key], resident)
            if resident > self.peak_where.get(self.stage, (0.0, []))[0]:
                self.peak_where[self.stage] = (resident, where(frame))
            last = now

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        return {"seconds": [[stage, kind, value] for (stage, kind), value in self.seconds.items()],
                "peak": [[stage, kind, value] for (stage, kind), value in self.peak.items()],
                "peak_where": {stage: frames for stage, (_, frames) in self.peak_where.items()}}


WAITING = "(waiting for a stage's child process)"


def profile(config: str, run_dir: str, interval: float) -> dict:
    """Profile `sentimerge run CONFIG` as it runs: each stage in the process that runs it (the forked child of
    `core.isolation`, or this one where isolation is off), with a sampler of its own started there."""
    import tempfile

    from sentimerge.pipeline import cli, run
    from sentimerge.pipeline.core.isolation import isolation_available

    if Path(run_dir).exists() and any(Path(run_dir).iterdir()):
        raise SystemExit(f"{run_dir}: not empty; the profile needs a run from nothing (every stage runs)")
    parts = Path(tempfile.mkdtemp(prefix="demo-profile-"))
    names = {stage: name for name, stage in run.stages()}
    sampler = Sampler(interval)
    original = run.run_isolated

    def in_stage_process(stage, cfg):
        name = names[stage]
        inner = Sampler(interval, stage=name)
        inner.start()
        try:
            return stage(cfg)
        finally:
            (parts / f"{name}.json").write_text(json.dumps(inner.finish()))

    def isolated(stage, cfg):
        sampler.stage = WAITING
        try:
            return original(in_stage_process, stage, cfg)
        finally:
            sampler.stage = "results"

    run.run_isolated = isolated
    sampler.start()
    started = time.perf_counter()
    try:
        code = cli.main(["run", config, "--run-dir", run_dir])
    finally:
        own = sampler.finish()
        run.run_isolated = original
    if code:
        raise SystemExit(f"sentimerge run exited with {code}")
    wall = time.perf_counter() - started
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    peak: dict[tuple[str, str], float] = defaultdict(float)
    peak_where: dict[str, list[str]] = {}
    for data in [own, *(json.loads(path.read_text()) for path in sorted(parts.glob("*.json")))]:
        for stage, kind, value in data["seconds"]:
            seconds[stage, kind] += value
        for stage, kind, value in data["peak"]:
            peak[stage, kind] = max(peak[stage, kind], value)
        peak_where.update(data["peak_where"])
    order = ["start", *names.values(), "results"]
    stages = [stage for stage in order if any(key[0] == stage for key in seconds)]
    info = json.loads((Path(run_dir) / "run.json").read_text())
    return {
        "config": config, "wall_seconds": round(wall, 1), "peak_rss_mb": info["peak_rss_mb"],
        "interval": interval, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "isolated_stages": isolation_available(),
        "seconds": {stage: {kind: round(seconds[stage, kind], 1) for kind in ORDER
                            if (stage, kind) in seconds} for stage in stages},
        "peak_mb": {stage: {kind: round(peak[stage, kind]) for kind in ORDER
                            if (stage, kind) in peak} for stage in stages},
        "peak_where": {stage: peak_where[stage] for stage in stages if stage in peak_where},
    }


def side_by_side(profiles: dict[str, dict]) -> str:
    labels = list(profiles)
    first = labels[0]
    lines = [f"# Where the demo's time and memory go: {' vs '.join(labels)}", "",
             "`python benchmarks/demo_profile.py CONFIG --run-dir EMPTY --label LABEL` per column; seconds from a "
             "sampling profiler (the running stage and the kind of work on the stack), peak resident MB per stage. "
             f"Ratios are against `{first}`.", ""]
    for label, data in profiles.items():
        lines.append(f"- `{label}`: {data['config']}, {data['date']}, {data['machine']}; wall {data['wall_seconds']} s, "
                     f"peak {data['peak_rss_mb']:.0f} MB")
    columns = [f"{label} s" for label in labels] + [f"{label}/{first}" for label in labels[1:]]
    lines += ["", "| stage | kind | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    stages = list(dict.fromkeys(stage for data in profiles.values() for stage in data["seconds"]))
    for stage in stages:
        for kind in [*ORDER, "all"]:
            values = [sum(data["seconds"].get(stage, {}).values()) if kind == "all"
                      else data["seconds"].get(stage, {}).get(kind) for data in profiles.values()]
            if all(v is None or v < 0.5 for v in values):
                continue
            ratios = [f"{v / values[0]:.2f}" if v and values[0] else "-" for v in values[1:]]
            lines.append(f"| {stage} | {'**all**' if kind == 'all' else kind} | "
                         + " | ".join(["-" if v is None else f"{v:.1f}" for v in values] + ratios) + " |")
    lines += ["", "| stage | " + " | ".join(f"{label} peak MB" for label in labels) + " |",
              "|---|" + "---|" * len(labels)]
    for stage in stages:
        values = [max(data["peak_mb"].get(stage, {}).values(), default=None) for data in profiles.values()]
        lines.append(f"| {stage} | " + " | ".join("-" if v is None else f"{v:.0f}" for v in values) + " |")
    lines += ["", "Where each stage's peak was reached (the innermost frame, then this project's innermost frames, innermost first):",
              "", "| label | stage | where |", "|---|---|---|"]
    for label, data in profiles.items():
        for stage, frames in data.get("peak_where", {}).items():
            lines.append(f"| {label} | {stage} | {' < '.join(f'`{f}`' for f in frames) or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True, help="an empty or missing directory")
    parser.add_argument("--label", required=True, help="the column's name, e.g. before or after")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("--in-process", action="store_true",
                        help="run every stage in this process (as before 2026-12-02), not in a child per stage")
    args = parser.parse_args()
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if not args.in_process:  # this process has run no model math: it may fork a child per stage, as the CLI does
        from sentimerge.pipeline.core.isolation import allow_fork

        allow_fork()
    data = profile(args.config, args.run_dir, args.interval)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"demo_profile_{args.label}.json").write_text(json.dumps(data, indent=2) + "\n")
    found = sorted(RESULTS.glob("demo_profile_*.json"), key=lambda path: path.stat().st_mtime)
    profiles = {path.stem.removeprefix("demo_profile_"): json.loads(path.read_text()) for path in found}
    if "before" in profiles:
        profiles = {"before": profiles.pop("before"), **profiles}
    (RESULTS / "demo_profile.md").write_text(side_by_side(profiles))
    print(side_by_side(profiles))


if __name__ == "__main__":
    main()
