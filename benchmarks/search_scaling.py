"""How the cost of a search candidate grows with the number of experts and the layer-group size, and how long a
finished search took to reach 95% of its final fitness.

    python benchmarks/search_scaling.py configs/suite.yaml --run-dir SUITE_RUN [--search-run DEMO_RUN]

SUITE_RUN needs finished experts (the first 2, 4 and 8 are used). For each (experts, group size): the one-time
precompute, the median in-memory merge of 5 random candidates, and the scoring of one fixed 64-example set (scoring
does not depend on either knob, so it is measured once per expert count). `--search-run` reads a finished search log
and reports the wall time (sum of candidate seconds) until the best-so-far weak fitness first reached 95% of its final
value, and the number of candidates it took. Writes benchmarks/results/search_scaling.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine  # noqa: E402
from sentimerge.merge.cmaes import read_log  # noqa: E402
from sentimerge.merge.engine import InMemoryMerge  # noqa: E402
from sentimerge.merge.fitness import encode_set, evaluate  # noqa: E402
from sentimerge.merge.genome import Genome  # noqa: E402
from sentimerge.merge.lora import read_adapter  # noqa: E402
from sentimerge.merge.methods import get_method  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.models import load_model  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir  # noqa: E402
from sentimerge.pipeline.core.runtime import set_threads  # noqa: E402
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path

RESULTS = ROOT / "benchmarks" / "results"


def time_to_95(run_dir: Path) -> dict:
    rows = [row for row in read_log(RunDir(run_dir).search_candidates)]
    rows.sort(key=lambda row: (row["generation"], row["index"]))
    best, elapsed, trace = -np.inf, 0.0, []
    for row in rows:
        elapsed += row.get("seconds", 0.0)
        best = max(best, row["fitness"])
        trace.append((elapsed, best))
    final = trace[-1][1]
    target = 0.95 * final if final > 0 else final * 1.05
    reached = next(i for i, (_, value) in enumerate(trace) if value >= target)
    return {"candidates": len(rows), "final_best": final, "seconds_total": trace[-1][0],
            "seconds_to_95": trace[reached][0], "candidates_to_95": reached + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--search-run")
    parser.add_argument("--groups", default="1,6,30")
    args = parser.parse_args()
    cfg = load_config(args.config, run_dir=args.run_dir)
    set_threads(cfg.threads)
    run = RunDir(cfg.resolved_run_dir)
    model, tokenizer = load_model(prepared_model_path(run), dtype="bfloat16")
    names = [t.name for t in cfg.tasks]
    task = cfg.tasks[0]
    scored = [encode_set(tokenizer, task, load_prepared(run, task.name, "dev")[:64],
                         [e["label"] for e in load_prepared(run, task.name, "dev")[:64]])]
    method = get_method("task_arithmetic")
    rows = []
    for count in (2, 4, 8):
        if count > len(names):
            break
        adapters = {name: read_adapter(run.expert_adapter(name)) for name in names[:count]}
        score_seconds = None
        for group in (int(g) for g in args.groups.split(",")):
            genome = Genome(tuple(adapters), model.config.num_hidden_layers, group, False)
            clock = time.perf_counter()
            merger = InMemoryMerge(model, adapters, genome, method, density=0.5, seed=0)
            precompute = time.perf_counter() - clock
            rng = np.random.default_rng(0)
            merges = []
            for _ in range(5):
                candidate = np.clip(1.0 + 0.2 * rng.standard_normal(genome.size), 0, 1.5)
                clock = time.perf_counter()
                merger.apply(candidate)
                merges.append(time.perf_counter() - clock)
            if score_seconds is None:
                score_seconds = evaluate(model, tokenizer, scored, 32)["seconds"]
            rows.append({"experts": count, "group_size": group, "coefficients": genome.size,
                         "precompute_s": precompute, "merge_s": statistics.median(merges),
                         "score_64_s": score_seconds,
                         "merge_share": statistics.median(merges) / (statistics.median(merges) + score_seconds)})
            print(rows[-1], flush=True)
            del merger
    lines = ["| experts | group size | coefficients | precompute once | merge per candidate | scoring 64 examples | "
             "merge share |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['experts']} | {r['group_size']} | {r['coefficients']} | {r['precompute_s']:.2f} s | "
              f"{r['merge_s'] * 1000:.0f} ms | {r['score_64_s']:.2f} s | {r['merge_share']:.1%} |" for r in rows]
    convergence = time_to_95(Path(args.search_run)) if args.search_run else None
    text = (f"# Search cost scaling\n\n`python benchmarks/search_scaling.py {' '.join(sys.argv[1:])}`, "
            f"{time.strftime('%Y-%m-%d')}, {machine()}. Task arithmetic on the run's real experts (LoRA r=16 on "
            f"every projection of SmolLM2-135M's {model.config.num_hidden_layers} layers), bf16.\n\n"
            + "\n".join(lines) + "\n")
    if convergence:
        text += (f"\nTime to 95% of the final weak fitness ({args.search_run}): {convergence['seconds_to_95']:.0f} s of "
                 f"{convergence['seconds_total']:.0f} s of candidate time, {convergence['candidates_to_95']} of "
                 f"{convergence['candidates']} candidates (final best {convergence['final_best']:.4f}).\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_scaling.md").write_text(text)
    (RESULTS / "search_scaling.json").write_text(json.dumps({"rows": rows, "convergence": convergence}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
