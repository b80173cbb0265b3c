"""Do a search's scores depend on the torch thread count? The same candidates, scored with each count, side by side.

    python benchmarks/thread_determinism.py RUN [--candidates 8] [--threads 2,1] [--float32 2] [--name NAME]

RUN holds a finished or started search (its `search/config.yaml`, weak sets and candidate log). Two parts:
- oneDNN's matmul alone: `torch.nn.functional.linear` of seeded random [rows, hidden] inputs with the model's
  gate_proj shape ([intermediate, hidden]), in bfloat16 and float32, for several row counts (a scoring batch is
  batch_size x prompt length rows): the share of outputs that differ between the thread counts, and by how much;
- the search: the first `--candidates` candidates of the log, merged in memory as the search merges them and scored
  on the search's weak sets (bf16, the search's dtype), then the first `--float32` of them again with the model in
  float32.

Each thread count runs in a fresh process of its own (set once, before any model math), so that nothing a process
computed with one count (oneDNN's primitive cache) carries over to another. Per candidate: the fitness with each
count, the difference, how many weak answers changed, and, where the log records the thread count that scored it,
the logged fitness minus this process's at that count. Beside it, the spread (sd) of the same candidates' fitness:
the differences CMA-ES ranks by.

This explains why a Ray search (each actor scores with `ray.cpus_per_actor` threads, 1 by default) and a local one
(all cores) part on a bf16 model (`benchmarks/ray_overhead.py`), and why `sentimerge search` warns when a bf16
search resumes with another thread count. Writes benchmarks/results/thread_determinism_<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
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


def matmul_outputs(hidden: int, out: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One linear layer on seeded random inputs, per dtype and row count (run in a worker: its thread count)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, hidden, generator=generator)
    outputs = {}
    for dtype in (torch.bfloat16, torch.float32):
        for count in ROWS:
            inputs = torch.randn(count, hidden, generator=generator)
            outputs[f"{str(dtype).removeprefix('torch.')}/{count}"] = torch.nn.functional.linear(
                inputs.to(dtype), weight.to(dtype)).float()
    return outputs


def matmul_rows(outputs: dict[int, dict[str, torch.Tensor]], threads: list[int], hidden: int, out: int) -> list[dict]:
    """Per dtype and row count: outputs that differ between the first thread count's worker and each other's."""
    rows = []
    for key, reference in outputs[threads[0]].items():
        dtype, count = key.split("/")
        for number in threads[1:]:
            other = outputs[number][key]
            differ = reference != other
            relative = ((reference - other).abs() / reference.abs().clamp_min(1e-6))[differ]
            rows.append({"dtype": dtype, "rows": int(count), "shape": f"[{count}, {hidden}] x [{hidden}, {out}]",
                         "threads": f"{threads[0]} vs {number}", "differing": int(differ.sum()),
                         "outputs": reference.numel(), "share": float(differ.float().mean()),
                         "max_relative": float(relative.max()) if relative.numel() else 0.0})
    return rows


def score_candidates(cfg, run: RunDir, logged: list[dict], float32: int) -> dict:
    """Run in a worker with its thread count set once: the `logged` candidates merged as the search merges them and
    scored on its weak sets in the search's dtype, the first `float32` again in float32; plus the matmul outputs."""
    scored = {}
    for dtype, candidates in ((cfg.search.dtype, logged), ("float32", logged[:float32])):
        # loaded in each dtype as the search loads it: `model.to(dtype)` would also cast RoPE's float32 `inv_freq`
        loaded = cfg.model_copy(update={"search": cfg.search.model_copy(update={"dtype": dtype})})
        model, tokenizer, adapters, genome = load_search_inputs(loaded, run)
        merger = InMemoryMerge(model, adapters, genome, get_method(cfg.search.method), density=cfg.search.density,
                               seed=cfg.seed if cfg.search.seed is None else cfg.search.seed)
        sets = load_weak_sets(run, cfg, tokenizer)
        scored[dtype] = []
        for row in candidates:
            merger.apply(np.asarray(row["coefficients"]))
            result = evaluate(model, tokenizer, sets, cfg.search.batch_size)
            scored[dtype].append({"fitness": result["fitness"], "predictions": result["predictions"]})
    shape = model.config
    return {"scores": scored, "kinds": {s.task.name: s.task.kind for s in sets},
            "classification_answers": sum(len(s.labels) for s in sets if s.task.kind == "classification"),
            "hidden": shape.hidden_size, "intermediate": shape.intermediate_size}


def candidate_rows(results: dict[int, dict], logged: list[dict], threads: list[int], dtype_of_search: str) -> list[dict]:
    """Per dtype, candidate and other thread count: fitness with each count, the classification answers that changed,
    the largest move of a regression prediction, and the logged fitness minus the rescoring at its logged count."""
    first = results[threads[0]]
    rows = []
    for dtype, reference_rows in first["scores"].items():
        for number, reference in enumerate(reference_rows):
            row = logged[number]
            logged_threads = row.get("threads")
            again = results[logged_threads]["scores"][dtype][number]["fitness"] \
                if dtype == dtype_of_search and logged_threads in results else None
            for threads_now in threads[1:]:
                other = results[threads_now]["scores"][dtype][number]
                changed, moved = 0, 0.0
                for task, kind in first["kinds"].items():
                    pairs = list(zip(reference["predictions"][task], other["predictions"][task]))
                    if kind == "classification":
                        changed += sum(a != b for a, b in pairs)
                    elif pairs:
                        moved = max(moved, max(abs(a - b) for a, b in pairs))
                rows.append({"dtype": dtype, "candidate": number, "generation": row["generation"],
                             "index": row["index"], "logged_fitness": row["fitness"],
                             "logged_threads": logged_threads,
                             "logged_minus_rescored": None if again is None else row["fitness"] - again,
                             f"fitness_{threads[0]}": reference["fitness"], "threads": threads_now,
                             "fitness_other": other["fitness"], "difference": other["fitness"] - reference["fitness"],
                             "answers_changed": changed, "answers": first["classification_answers"],
                             "regression_max_abs": moved})
    return rows


def worker(args: argparse.Namespace) -> None:
    """`--worker N`: set N torch threads once, score, and save everything for the parent to compare."""
    torch.set_num_threads(args.worker)
    run = RunDir(args.run)
    cfg = load_config(run.search / "config.yaml")
    logged = [row for row in read_jsonl(run.search_candidates) if row["status"] == "ok"][:args.candidates]
    result = score_candidates(cfg, run, logged, args.float32)
    result["matmul"] = matmul_outputs(result["hidden"], result["intermediate"])
    torch.save(result, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--threads", default="2,1", help="comma-separated torch thread counts; the first is the "
                        "reference")
    parser.add_argument("--float32", type=int, default=2, help="candidates scored again in float32")
    parser.add_argument("--name", help="results file suffix (default: the run folder's name)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_logging(False)
    if args.worker:
        worker(args)
        return
    threads = [int(part) for part in args.threads.split(",")]
    if len(threads) < 2:
        raise SystemExit("--threads: give at least two counts")
    run = RunDir(args.run)
    if not (run.search / "config.yaml").is_file():
        raise SystemExit(f"{run.search}: no search config; run `sentimerge search` first")
    cfg = load_config(run.search / "config.yaml")
    logged = [row for row in read_jsonl(run.search_candidates) if row["status"] == "ok"][:args.candidates]
    if not logged:
        raise SystemExit(f"{run.search_candidates}: no scored candidate")
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for number in dict.fromkeys(threads):  # one fresh process per count: nothing carries over between counts
            out = Path(folder) / f"threads{number}.pt"
            subprocess.run([sys.executable, __file__, str(args.run), "--worker", str(number), "--candidates",
                            str(args.candidates), "--float32", str(args.float32), "--out", str(out)], check=True)
            results[number] = torch.load(out)
    first = results[threads[0]]
    matmul = matmul_rows({n: r["matmul"] for n, r in results.items()}, threads, first["hidden"],
                         first["intermediate"])
    candidates = candidate_rows(results, logged, threads, cfg.search.dtype)
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
