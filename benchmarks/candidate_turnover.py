"""Candidate turnover: one candidate evaluated in memory vs the alternatives a user would otherwise pick.

1. in memory (sentimerge): write the candidate's merged weights into the resident bf16 scoring copy, score; for a
   dense method (ties, dare) the merge is timed with its compiled combine (what the search runs, `search.compile`)
   and with the eager one, side by side; the one-time compile is reported apart;
2. mergekit to disk: `run_merge` writes the merged model, it is loaded and scored (how mergekit-evolve evaluates a
   candidate); mergekit gets a warm LoRA-merge cache (one untimed merge first), as a long search would have;
3. peft: load the base, load the adapters, `add_weighted_adapter` (`cat` for task arithmetic, `ties` for TIES) and
   `merge_and_unload` (it consumes the model, so each candidate reloads), score. peft takes one weight per adapter,
   so this path merges with each expert's mean coefficient: it cannot express layer-wise coefficients at all.

All paths score the same weak set with the shared scorer, interleaved per repeat. Usage (on a run whose experts are
finished):

    python benchmarks/candidate_turnover.py configs/demo.yaml --run-dir RUN [--methods task_arithmetic,ties]

Writes benchmarks/results/candidate_turnover-<method>.json and .md, and the summary keys (from task arithmetic).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.summary import machine, record  # noqa: E402
from sentimerge.merge.engine import InMemoryMerge  # noqa: E402
from sentimerge.merge.fitness import encode_set, evaluate  # noqa: E402
from sentimerge.merge.genome import Genome  # noqa: E402
from sentimerge.merge.methods import get_method  # noqa: E402
from sentimerge.merge.recipe import build_recipe, run_mergekit  # noqa: E402
from sentimerge.merge.weak import sample_weak_set  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.models import load_model  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, write_json_atomic, write_text_atomic  # noqa: E402
from sentimerge.pipeline.core.runtime import set_threads, setup_logging  # noqa: E402
from sentimerge.pipeline.core.upstream import expert_deltas, expert_reference, prepared_model_path

RESULTS = Path(__file__).resolve().parent / "results"


def peft_merge(base_path: str, run: RunDir, genome: Genome, candidate: np.ndarray, method: str, settings):
    """The peft path: base + every adapter, one weighted adapter (each expert's mean coefficient), merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, settings.dtype))
    names = list(genome.experts)
    model = PeftModel.from_pretrained(base, str(run.expert_adapter(names[0])), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(run.expert_adapter(name)), adapter_name=name)
    weights = genome.layer_coefficients(candidate).mean(axis=(1, 2)).tolist()
    kind = {"task_arithmetic": "cat", "ties": "ties"}[method]
    extra = {"density": settings.density} if kind == "ties" else {}
    model.add_weighted_adapter(names, weights, "candidate", combination_type=kind, **extra)
    model.set_adapter("candidate")
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir")
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config, run_dir=args.run_dir)
    set_threads(cfg.threads)
    run, settings = RunDir(cfg.resolved_run_dir), cfg.search
    base_path = prepared_model_path(run)

    sets_examples = {task.name: sample_weak_set(run, settings.weak, task, cfg.seed)[0] for task in cfg.tasks}
    model, tokenizer = load_model(base_path, dtype=settings.dtype)
    sets = [encode_set(tokenizer, task, sets_examples[task.name], [e["label"] for e in sets_examples[task.name]])
            for task in cfg.tasks]  # gold labels: the fitness value is not the point, the time is
    adapters = {task.name: expert_deltas(run, task.name, base_path) for task in cfg.tasks}
    summary = {}
    for name in args.methods.split(","):
        method = get_method(name)
        genome = Genome(tuple(adapters), model.config.num_hidden_layers, settings.layer_group_size,
                        settings.split_attention_mlp)
        start = 1.0 if settings.init == "auto" else settings.init
        candidate = np.clip(start + 0.2 * np.random.default_rng(0).standard_normal(genome.size), *settings.bounds)
        clock = time.perf_counter()
        merger = InMemoryMerge(model, adapters, genome, method, density=settings.density, seed=cfg.seed,
                               compile=settings.compile)
        precompute = time.perf_counter() - clock
        eager, compile_once = None, None
        if merger.compiled is None:  # a dense method: compile now (timed apart), and keep an eager merger beside it
            eager = InMemoryMerge(model, adapters, genome, method, density=settings.density, seed=cfg.seed)
            clock = time.perf_counter()
            merger.apply(candidate)
            compile_once = time.perf_counter() - clock

        recipe = build_recipe(base_path, {t: expert_reference(run, t, base_path) for t in adapters}, genome,
                              candidate, method, density=settings.density, out_dtype=settings.dtype)
        work = Path(tempfile.mkdtemp(prefix="turnover-"))
        in_memory, on_disk, via_peft = [], [], []
        try:
            clock = time.perf_counter()
            run_mergekit(recipe, work / "warmup", cache=work / "cache")  # merges each base+LoRA once into the cache
            warmup = time.perf_counter() - clock
            for repeat in range(args.repeats):  # interleaved, so a busy machine slows both paths alike
                eager_merge = None
                if eager is not None:
                    clock = time.perf_counter()
                    eager.apply(candidate)
                    eager_merge = time.perf_counter() - clock
                clock = time.perf_counter()
                merger.apply(candidate)
                merged = time.perf_counter() - clock
                result = evaluate(model, tokenizer, sets, settings.batch_size)
                in_memory.append({"merge": merged, "eager_merge": eager_merge, "score": result["seconds"],
                                  "fitness": result["fitness"]})

                out = work / f"candidate-{repeat}"
                clock = time.perf_counter()
                run_mergekit(recipe, out, cache=work / "cache")
                merged = time.perf_counter() - clock
                clock = time.perf_counter()
                loaded, _ = load_model(str(out), dtype=settings.dtype)
                load = time.perf_counter() - clock
                result = evaluate(loaded, tokenizer, sets, settings.batch_size)
                on_disk.append({"merge_to_disk": merged, "load": load, "score": result["seconds"],
                                "fitness": result["fitness"]})
                del loaded
                shutil.rmtree(out)

                clock = time.perf_counter()
                loaded = peft_merge(base_path, run, genome, candidate, method.name, settings)
                merged = time.perf_counter() - clock
                result = evaluate(loaded, tokenizer, sets, settings.batch_size)
                via_peft.append({"load_and_merge": merged, "score": result["seconds"], "fitness": result["fitness"]})
                del loaded
        finally:
            shutil.rmtree(work, ignore_errors=True)

        def median(rows, key):
            return statistics.median(row[key] for row in rows)

        memory_total = median(in_memory, "merge") + median(in_memory, "score")
        peft_total = median(via_peft, "load_and_merge") + median(via_peft, "score")
        disk_total = median(on_disk, "merge_to_disk") + median(on_disk, "load") + median(on_disk, "score")
        report = {
            "config": args.config, "run_dir": str(run.root), "method": method.name, "genome_size": genome.size,
            "weak_examples": sum(len(s.examples) for s in sets), "repeats": args.repeats,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
            "in_memory": {"precompute_once_s": precompute, "merge_s": median(in_memory, "merge"),
                          "score_s": median(in_memory, "score"), "total_s": memory_total,
                          "fitness": in_memory[0]["fitness"], "compiled": bool(merger.compiled)},
            "mergekit": {"lora_cache_warmup_once_s": warmup, "merge_to_disk_s": median(on_disk, "merge_to_disk"),
                         "load_s": median(on_disk, "load"), "score_s": median(on_disk, "score"), "total_s": disk_total,
                         "fitness": on_disk[0]["fitness"]},
            "peft": {"load_and_merge_s": median(via_peft, "load_and_merge"), "score_s": median(via_peft, "score"),
                     "total_s": peft_total, "fitness": via_peft[0]["fitness"], "layer_wise": False},
            "ratio_mergekit_over_in_memory": disk_total / memory_total,
            "ratio_peft_over_in_memory": peft_total / memory_total,
            "merge_share_in_memory": median(in_memory, "merge") / memory_total,
            "ratio_excluding_scoring": (median(on_disk, "merge_to_disk") + median(on_disk, "load"))
                                       / median(in_memory, "merge"),
        }
        if eager is not None:
            report["in_memory"].update(compile_once_s=compile_once, eager_merge_s=median(in_memory, "eager_merge"))
            report["ratio_eager_over_compiled_merge"] = median(in_memory, "eager_merge") / median(in_memory, "merge")
        RESULTS.mkdir(exist_ok=True)
        write_json_atomic(RESULTS / f"candidate_turnover-{method.name}.json", report)
        lines = [f"# Candidate turnover ({method.name}, {report['weak_examples']} weak examples, "
                 f"median of {args.repeats})", "",
                 "| path | merge | load | scoring | total |", "|---|---|---|---|---|",
                 f"| in memory | {report['in_memory']['merge_s'] * 1000:.0f} ms | - | {report['in_memory']['score_s']:.2f} s "
                 f"| {memory_total:.2f} s |",
                 *([f"| in memory, eager combine (`search.compile: false`) | "
                    f"{report['in_memory']['eager_merge_s'] * 1000:.0f} ms | - | (same weights) | "
                    f"{report['in_memory']['eager_merge_s'] + report['in_memory']['score_s']:.2f} s |"]
                   if eager is not None else []),
                 f"| mergekit to disk + reload | {report['mergekit']['merge_to_disk_s']:.2f} s | "
                 f"{report['mergekit']['load_s']:.2f} s | {report['mergekit']['score_s']:.2f} s | {disk_total:.2f} s |",
                 f"| peft add_weighted_adapter + merge_and_unload (one weight per expert) | "
                 f"{report['peft']['load_and_merge_s']:.2f} s (load + merge) | - | {report['peft']['score_s']:.2f} s | "
                 f"{peft_total:.2f} s |",
                 "", f"`{' '.join(['python', 'benchmarks/candidate_turnover.py', *sys.argv[1:]])}`, "
                 f"{time.strftime('%Y-%m-%d')}, {machine()}.", "",
                 f"Whole candidate vs in memory: mergekit {report['ratio_mergekit_over_in_memory']:.2f}x, peft "
                 f"{report['ratio_peft_over_in_memory']:.2f}x slower. The merge is "
                 f"{report['merge_share_in_memory']:.1%} of an in-memory candidate's time.",
                 *([f"Compiled combine: merge {report['ratio_eager_over_compiled_merge']:.1f}x faster than eager "
                    f"(compiled: {report['in_memory']['compiled']}; compiling once took {compile_once:.1f} s)."]
                   if eager is not None else []),
                 "", f"Ratio (mergekit / in memory), whole candidate: {report['ratio_mergekit_over_in_memory']:.2f}x; "
                 f"merge only (merge+write+load vs in-memory merge): {report['ratio_excluding_scoring']:.0f}x.",
                 f"One-time costs: in-memory precompute {precompute:.2f} s; mergekit LoRA-merge cache warm-up "
                 f"{warmup:.2f} s. Fitness in memory {report['in_memory']['fitness']:.4f}, "
                 f"via mergekit {report['mergekit']['fitness']:.4f}.", ""]
        write_text_atomic(RESULTS / f"candidate_turnover-{method.name}.md", "\n".join(lines))
        print("\n".join(lines))
        summary[method.name] = report
    if "task_arithmetic" in summary:
        report = summary["task_arithmetic"]
        record({"candidate_speedup_vs_mergekit": report["ratio_mergekit_over_in_memory"],
                "merge_share_of_candidate_time": report["in_memory"]["merge_s"] / report["in_memory"]["total_s"]},
               notes="task arithmetic; whole candidate (merge + load + score) via mergekit / in memory")


if __name__ == "__main__":
    main()
