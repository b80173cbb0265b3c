"""Do a search's scores depend on the torch thread count? The same candidates, scored with each count, side by side.

    python benchmarks/thread_determinism.py RUN [--candidates 8] [--threads 2,1] [--float32 2] [--name NAME]

RUN holds a finished or started search (its `search/config.yaml`, weak sets and candidate log). Two parts:
- oneDNN's matmul alone: `torch.nn.functional.linear` of seeded random [rows, hidden] inputs with the model's
  gate_proj shape ([intermediate, hidden]), in bfloat16 and float32, for several row counts (a scoring batch is
  batch_size x prompt length rows): the share of outputs that differ between the thread counts, and by how much;
- the search: the first `--candidates` candidates of the log, merged in memory as the search merges them and scored
  on the search's weak sets with each thread count (bf16, the search's dtype), then the first `--float32` of them
  again with the model in float32. Per candidate: the fitness with each count, the difference, how many weak
  answers changed, and, where the log records the thread count that scored it, the logged fitness minus this
  process's at that count. Beside it, the spread (sd) of the same candidates' fitness: the differences CMA-ES ranks by.

This explains why a Ray search (each actor scores with `ray.cpus_per_actor` threads, 1 by default) and a local one
(all cores) part on a bf16 model (`benchmarks/ray_overhead.py`), and why `sentimerge search` warns when a bf16
search resumes with another thread count. Writes benchmarks/results/thread_determinism_<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine  # noqa: E402
from sentimerge.merge.engine import InMemoryMerge  # noqa: E402
from sentimerge.merge.fitness import evaluate  # noqa: E402
from sentimerge.merge.methods import get_method  # noqa: E402
from sentimerge.pipeline.core.candidates import load_search_inputs, load_weak_sets  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.evaluation import markdown_table  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl, write_json_atomic, write_text_atomic  # noqa: E402
from sentimerge.pipeline.core.runtime import setup_logging  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROWS = (256, 512, 768, 1024, 1280, 1536, 2048)


def matmul_rows(hidden: int, out: int, threads: list[int], seed: int = 0) -> list[dict]:
    """Per dtype and row count: outputs of one linear layer that differ between the first and each other count."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, hidden, generator=generator)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for count in ROWS:
            inputs = torch.randn(count, hidden, generator=generator)
            outputs = {}
            for number in threads:
                torch.set_num_threads(number)
                outputs[number] = torch.nn.functional.linear(inputs.to(dtype), weight.to(dtype)).float()
            reference = outputs[threads[0]]
            for number in threads[1:]:
                differ = reference != outputs[number]
                relative = ((reference - outputs[number]).abs() / reference.abs().clamp_min(1e-6))[differ]
                rows.append({"dtype": str(dtype).removeprefix("torch."), "rows": count, "shape": f"[{count}, {hidden}] "
                             f"x [{hidden}, {out}]", "threads": f"{threads[0]} vs {number}",
                             "differing": int(differ.sum()), "outputs": reference.numel(),
                             "share": float(differ.float().mean()),
                             "max_relative": float(relative.max()) if relative.numel() else 0.0})
    torch.set_num_threads(threads[0])
    return rows


def candidate_rows(cfg, run: RunDir, inputs: tuple, logged: list[dict], threads: list[int],
                   float32: int) -> list[dict]:
    """The `logged` candidates scored with each thread count (the search's dtype), the first `float32` also in
    float32: fitness per count and answers that changed against the first count."""
    model, tokenizer, adapters, genome = inputs
    merger = InMemoryMerge(model, adapters, genome, get_method(cfg.search.method), density=cfg.search.density,
                           seed=cfg.seed if cfg.search.seed is None else cfg.search.seed)
    sets = load_weak_sets(run, cfg, tokenizer)
    rows = []
    for dtype, candidates in ((cfg.search.dtype, logged), ("float32", logged[:float32])):
        model.to(getattr(torch, dtype))
        for number, row in enumerate(candidates):
            scored = {}
            for threads_now in threads:
                torch.set_num_threads(threads_now)
                merger.apply(np.asarray(row["coefficients"]))
                scored[threads_now] = evaluate(model, tokenizer, sets, cfg.search.batch_size)
            reference = scored[threads[0]]
            logged_threads = row.get("threads")
            again = scored[logged_threads]["fitness"] if dtype == cfg.search.dtype and logged_threads in scored \
                else None
            for threads_now in threads[1:]:
                other = scored[threads_now]
                changed, moved = 0, 0.0
                for scored_set in sets:
                    pairs = list(zip(reference["predictions"][scored_set.task.name],
                                     other["predictions"][scored_set.task.name]))
                    if scored_set.task.kind == "classification":
                        changed += sum(a != b for a, b in pairs)
                    elif pairs:
                        moved = max(moved, max(abs(a - b) for a, b in pairs))
                rows.append({"dtype": dtype, "candidate": number, "generation": row["generation"],
                             "index": row["index"], "logged_fitness": row["fitness"],
                             "logged_threads": logged_threads,
                             "logged_minus_rescored": None if again is None else row["fitness"] - again,
                             f"fitness_{threads[0]}": reference["fitness"], "threads": threads_now,
                             "fitness_other": other["fitness"], "difference": other["fitness"] - reference["fitness"],
                             "answers_changed": changed, "answers": sum(len(scored_set.labels) for scored_set in sets
                                                                        if scored_set.task.kind == "classification"),
                             "regression_max_abs": moved})
        merger.restore()
    torch.set_num_threads(threads[0])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--threads", default="2,1", help="comma-separated torch thread counts; the first is the "
                        "reference")
    parser.add_argument("--float32", type=int, default=2, help="candidates scored again in float32")
    parser.add_argument("--name", help="results file suffix (default: the run folder's name)")
    args = parser.parse_args()
    setup_logging(False)
    threads = [int(part) for part in args.threads.split(",")]
    if len(threads) < 2:
        raise SystemExit("--threads: give at least two counts")
    run = RunDir(args.run)
    if not (run.search / "config.yaml").is_file():
        raise SystemExit(f"{run.search}: no search config; run `sentimerge search` first")
    started = time.perf_counter()
    cfg = load_config(run.search / "config.yaml")
    logged = [row for row in read_jsonl(run.search_candidates) if row["status"] == "ok"][:args.candidates]
    if not logged:
        raise SystemExit(f"{run.search_candidates}: no scored candidate")
    inputs = load_search_inputs(cfg, run)
    shape = inputs[0].config
    matmul = matmul_rows(shape.hidden_size, shape.intermediate_size, threads)
    candidates = candidate_rows(cfg, run, inputs, logged, threads, args.float32)
    frame = pd.DataFrame(candidates)
    summary = []
    for dtype, group in frame.groupby("dtype", sort=False):
        summary.append({"dtype": dtype, "candidates": len(group),
                        "mean_abs_difference": float(group["difference"].abs().mean()),
                        "max_abs_difference": float(group["difference"].abs().max()),
                        "answers_changed_mean": float(group["answers_changed"].mean()),
                        "answers": int(group["answers"].iloc[0]),
                        "regression_max_abs": float(group["regression_max_abs"].max()),
                        "logged_minus_rescored_max_abs": float(group["logged_minus_rescored"].abs().max())
                        if group["logged_minus_rescored"].notna().any() else None,
                        "fitness_sd_over_candidates": float(group[f"fitness_{threads[0]}"].std(ddof=1))
                        if len(group) > 1 else float("nan")})
    name = args.name or args.run.name
    command = "python benchmarks/thread_determinism.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    payload = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
               "seconds": round(time.perf_counter() - started, 1), "matmul": matmul, "candidates": candidates,
               "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"thread_determinism_{name}.json", payload)
    lines = [f"# Scores against the torch thread count: {name}", "",
             f"`{command}`, {payload['date']}, {payload['machine']}.", "",
             "oneDNN's linear layer alone (seeded random inputs, the model's gate_proj shape): outputs that differ "
             f"between {threads[0]} and the other thread counts.", "", markdown_table(pd.DataFrame(matmul)), "",
             f"The search's first logged candidates, merged and scored on its weak sets with {threads[0]} threads "
             "and with each other count (`fitness_other`); `answers_changed`: weak answers of the classification "
             "tasks (`answers` of them) predicted differently; `regression_max_abs`: the largest change of a "
             "regression prediction; `logged_minus_rescored`: the logged fitness minus this process's at the "
             "thread count the log records (the same scoring in another process).", "", markdown_table(frame), "",
             "Summary per dtype: the mean and largest |difference| of fitness between thread counts, beside the "
             "sd of the same candidates' fitness (what CMA-ES ranks).", "", markdown_table(pd.DataFrame(summary)),
             ""]
    write_text_atomic(RESULTS / f"thread_determinism_{name}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
