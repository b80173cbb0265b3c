"""Ray overhead: the same stage-2 search run locally and on a local Ray, side by side, plus the bytes each design
sends (once per actor, per candidate), from which the scaling to N GPUs follows on paper.

    python benchmarks/ray_overhead.py configs/demo.yaml --run-dir RUN [--generations 2] [--actors 2]
    python benchmarks/ray_overhead.py RUN/config.yaml --run-dir RUN --stages groups \
        --groups "sentiment=sst5,fpb,fin_tweets; aspect=absa,fin_headlines" [--group-generations 2]

RUN must have finished experts. Both searches start from a copy of RUN without its search (same seed, same weak
set, no mergekit export, a small final gold table), so they score the same candidates; the script checks that their
logs agree, and names the first row where they part. In bfloat16 they agree only at the same scoring thread count
(each actor scores with `ray.cpus_per_actor` threads, the local search with all cores; oneDNN rounds some bf16
matmul outputs differently by thread count, `benchmarks/thread_determinism.py`); in float32 always. Writes
benchmarks/results/ray_overhead.{md,json}. `--stages groups` times a multi-stage search instead (MEM-MCL's level 1:
one CMA-ES per task group, which the Ray backend runs at once, one driver thread each, their candidates sharing the
actors; then level 2), with the level 1 and level 2 seconds of each backend, into ray_overhead_groups.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.multistage import parse_groups  # noqa: E402
from benchmarks.summary import machine  # noqa: E402
from sentimerge.pipeline import search  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl  # noqa: E402
from sentimerge.pipeline.core.runtime import set_threads, setup_logging  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def logs_agree(local: list[dict], ray: list[dict], tolerance: float = 1e-3) -> tuple[bool, str]:
    """Whether two candidate logs hold the same candidates in the same order with fitness within `tolerance`; if not,
    where they part (the first row that differs, and by what)."""
    for number, (a, b) in enumerate(zip(local, ray)):
        name = f"row {number} ({a.get('level', 'level 2' if local[0].get('level') else 'flat')} generation " \
               f"{a['generation']} candidate {a['index']})"
        if a["coefficients"] != b["coefficients"]:
            return False, f"{name}: other coefficients (an earlier choice differed)"
        if abs(a["fitness"] - b["fitness"]) >= tolerance:
            threads = (a.get("threads"), b.get("threads"))
            why = f", scored with {threads[0]} and {threads[1]} torch threads (bf16 matmuls round differently with " \
                  "the thread count)" if None not in threads and threads[0] != threads[1] else ""
            return False, f"{name}: fitness {a['fitness']:.4f} locally, {b['fitness']:.4f} on Ray{why}"
    if len(local) != len(ray):
        return False, f"{len(local)} rows locally, {len(ray)} on Ray"
    return True, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--stages", choices=["flat", "groups"], default="flat")
    parser.add_argument("--groups", help="NAME=task,task; ... (default: the tasks' `group` fields)")
    parser.add_argument("--group-generations", type=int, default=2)
    args = parser.parse_args()
    setup_logging(False)
    base = load_config(args.config, run_dir=args.run_dir)
    set_threads(base.threads)
    settings = base.search.model_copy(update={
        "generations": args.generations, "export": False,
        "gold": base.search.gold.model_copy(update={"per_generation": 0, "final": 8})})
    if args.stages == "groups":
        groups = parse_groups(args.groups) if args.groups else {}
        settings = type(settings).model_validate({**settings.model_dump(), "stages": "groups", "groups": groups,
                                                  "group_generations": args.group_generations})
        base = type(base).model_validate({**base.model_dump(), "search": settings.model_dump()})
    ray_settings = base.ray.model_copy(update={"actors": args.actors, "num_cpus": args.actors})
    timings, logs = {}, {}
    with tempfile.TemporaryDirectory(prefix="sentimerge-ray-") as work:
        for backend in ("local", "ray"):
            target = Path(work) / backend
            shutil.copytree(base.resolved_run_dir, target, ignore=shutil.ignore_patterns("search", "finetune", "report",
                                                                                         "export", "eval"))
            cfg = base.model_copy(update={"run_dir": str(target), "search": settings, "ray": ray_settings})
            started = time.perf_counter()
            search.main(cfg, backend=backend)
            timings[backend] = time.perf_counter() - started
            rows = read_jsonl(RunDir(target).search_candidates)
            if args.stages == "groups":  # level 1's logs first, group by group
                levels = sorted(RunDir(target).search_levels.glob("*.jsonl"))
                rows = [row for path in levels for row in read_jsonl(path)] + rows
            logs[backend] = rows
            report = json.loads(RunDir(target).search_report.read_text())
            timings[f"{backend}_phases"] = report["seconds"]
        payload = {"config": len(pickle.dumps(cfg)),
                   "candidate": len(pickle.dumps((0, 0, logs["local"][0]["coefficients"]))),
                   "row": int(np.median([len(pickle.dumps(row)) for row in logs["local"]]))}
    agree, where = logs_agree(logs["local"], logs["ray"])
    candidates = len(logs["local"])
    search_local = timings["local_phases"].get("search_scoring", 0) + timings["local_phases"].get("search_merge", 0)
    name = "ray_overhead" if args.stages == "flat" else "ray_overhead_groups"
    levels = ""
    if args.stages == "groups":
        plan = [f"{group} ({', '.join(tasks)})" for group, tasks in (settings.groups or {}).items()]
        level_one = {backend: timings[f"{backend}_phases"].get("search_level_one", float("nan"))
                     for backend in ("local", "ray")}
        levels = f"""
Multi-stage search (MEM-MCL): level 1 runs one CMA-ES per task group ({'; '.join(plan) or "the tasks' groups"}),
{args.group_generations} generations each; level 2 {args.generations} generations over the group models. Locally the
groups are searched one after the other; on Ray at once, one driver thread per group, their candidates sharing the
actors.

| backend | level 1 seconds (all groups) | rest of the search seconds |
|---|---|---|
| local | {level_one['local']:.1f} | {timings['local'] - level_one['local']:.1f} |
| ray ({args.actors} actors) | {level_one['ray']:.1f} | {timings['ray'] - level_one['ray']:.1f} |

Ray / local, level 1: {level_one['ray'] / level_one['local']:.2f}x. With {args.actors} actors on this machine's
{os.cpu_count()} CPU cores the actors share the cores the local run uses alone, so the
parallel groups cannot run faster here; on N machines (or GPUs) the groups' candidates are scored N at a time.
"""
    text = f"""# Ray overhead{'' if args.stages == 'flat' else ': multi-stage search'}

`python benchmarks/ray_overhead.py {shlex.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d')}, {machine()}.

Stage 2 on the same experts, {args.generations} generations x {base.search.population} candidates ({candidates} in
all), no export, 8 dev examples per task in the final table; Ray: a local cluster with {args.actors} actors of 1 CPU.

| backend | wall seconds (whole `search`) |
|---|---|
| local (one process, {base.threads or 'torch default'} threads) | {timings['local']:.1f} |
| ray ({args.actors} actors) | {timings['ray']:.1f} |

Ray / local wall time: {timings['ray'] / timings['local']:.2f}x. Logs agree (same candidates, fitness within 1e-3):
{'yes' if agree else 'NO, ' + where}. Local candidate scoring+merging: {search_local:.1f} s of {timings['local']:.1f} s.

What each design sends (pickled bytes, measured):
- once per actor: the run config, {payload['config']} bytes; each actor then reads the base model, the expert
  adapters and the weak sets from the run directory (shared storage);
- per candidate: {payload['candidate']} bytes to the actor (generation, index and {len(logs['local'][0]['coefficients'])}
  coefficients), a log row of about {payload['row']} bytes back.

On paper, N GPU actors score a generation of P candidates in ceil(P / N) candidate times plus one round trip each
(~{payload['candidate'] + payload['row']} bytes): with P = 8 and N = 8 a generation costs one candidate time, against
eight locally. What does not shrink: the driver's CMA-ES step and gold scoring, and each actor's one-time load of
the base model and the deltas from shared storage (for a 7B model, ~14 GB in bf16 per actor, read once).
""" + levels
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"seconds": {k: v for k, v in timings.items() if not k.endswith("phases")}, "phases": {
            k: v for k, v in timings.items() if k.endswith("phases")}, "bytes": payload, "logs_agree": agree,
         "logs_part": where, "candidates": candidates, "actors": args.actors}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
