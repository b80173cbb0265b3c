"""Where a pipeline run spends its time and memory: per stage, per kind of work, by sampling the running stack.

    python benchmarks/demo_profile.py configs/demo.yaml --run-dir RUN --label after [--interval 0.05]

Runs `sentimerge run CONFIG` in this process from an empty run directory (refused otherwise: a skipped stage would
measure nothing) while a thread samples, every `--interval` seconds, the main thread's Python stack and the process's
resident memory (`/proc/self/statm`). Each sample is charged to the stage that is running and to one kind of work,
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


class Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.stage, self.stop = interval, "start", threading.Event()
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.peak: dict[tuple[str, str], float] = defaultdict(float)
        self.main = threading.main_thread().ident

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stop.wait(self.interval):
            now = time.perf_counter()
            frame = sys._current_frames().get(self.main)
            key = (self.stage, kind_of(frame) if frame is not None else "other")
            self.seconds[key] += now - last
            self.peak[key] = max(self.peak[key], rss_mb())
            last = now


def profile(config: str, run_dir: str, interval: float) -> dict:
    from sentimerge.pipeline import cli, run

    if Path(run_dir).exists() and any(Path(run_dir).iterdir()):
        raise SystemExit(f"{run_dir}: not empty; the profile needs a run from nothing (every stage runs)")
    sampler = Sampler(interval)
    original = run.stages

    def staged():
        def wrap(name, stage):
            def call(cfg):
                sampler.stage = name
                try:
                    return stage(cfg)
                finally:
                    sampler.stage = "results"
            return call
        return [(name, wrap(name, stage)) for name, stage in original()]

    run.stages = staged
    sampler.start()
    started = time.perf_counter()
    try:
        code = cli.main(["run", config, "--run-dir", run_dir])
    finally:
        sampler.stop.set()
        sampler.join()
        run.stages = original
    if code:
        raise SystemExit(f"sentimerge run exited with {code}")
    wall = time.perf_counter() - started
    stages = list(dict.fromkeys(stage for stage, _ in sampler.seconds))
    info = json.loads((Path(run_dir) / "run.json").read_text())
    return {
        "config": config, "wall_seconds": round(wall, 1), "peak_rss_mb": info["peak_rss_mb"],
        "interval": interval, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "seconds": {stage: {kind: round(sampler.seconds[stage, kind], 1) for kind in ORDER
                            if (stage, kind) in sampler.seconds} for stage in stages},
        "peak_mb": {stage: {kind: round(sampler.peak[stage, kind]) for kind in ORDER
                            if (stage, kind) in sampler.peak} for stage in stages},
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
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True, help="an empty or missing directory")
    parser.add_argument("--label", required=True, help="the column's name, e.g. before or after")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    args = parser.parse_args()
    if args.interval <= 0:
        parser.error("--interval must be positive")
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
