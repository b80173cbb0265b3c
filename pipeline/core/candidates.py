"""The search's inputs and the scoring of one merge candidate: shared by the local search (`sentimerge search`) and
the Ray actors of `backend: ray` (`ray_backend.ScoringWorker`), so both score a candidate the same way."""

from __future__ import annotations

import time

import numpy as np
import torch

from sentimerge.merge.engine import InMemoryMerge
from sentimerge.merge.fitness import ScoredSet, encode_set, evaluate
from sentimerge.merge.genome import Genome
from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.models import load_model
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl
from sentimerge.pipeline.core.upstream import expert_deltas, merge_base_path


def load_search_inputs(cfg: RunConfig, run: RunDir):
    """(resident scoring model, tokenizer, expert adapters, genome): what the driver and each Ray actor load. The
    resident model is the experts' base: the prepared base model, or base + shared adapter."""
    settings = cfg.search
    base_path = merge_base_path(run, bool(cfg.experts.shared.examples))
    model, tokenizer = load_model(base_path, dtype=settings.dtype)
    adapters = {task.name: expert_deltas(run, task.name, base_path) for task in cfg.tasks}
    return model, tokenizer, adapters, search_genome(cfg, tuple(adapters), model.config.num_hidden_layers)


def search_genome(cfg: RunConfig, experts: tuple[str, ...], num_layers: int) -> Genome:
    """The search space of `cfg.search` over `experts` (the tasks' order) on a model of `num_layers` decoder layers:
    what the search's coefficients index, so whoever reads them (stage 3's `init: experts`) builds the same one."""
    return Genome(experts, num_layers, cfg.search.layer_group_size, cfg.search.split_attention_mlp)


def load_weak_sets(run: RunDir, cfg: RunConfig, tokenizer, path_for=None) -> list[ScoredSet]:
    """The labelled weak sets on disk, tokenised: what every candidate is scored on (here or on a Ray actor)."""
    sets = []
    for task in cfg.tasks:
        rows = read_jsonl((path_for or run.search_weak)(task.name))
        sets.append(encode_set(tokenizer, task, rows, [row["label"] for row in rows],
                               cfg.search.weak.weights.get(task.name, 1.0)))
    return sets


def score_candidate(merger: InMemoryMerge, model, tokenizer, sets: list[ScoredSet], candidate: np.ndarray, settings) -> dict:
    """Merge `candidate` into the resident model and score it; a failure is a row with the penalty, not a crash.

    The row records `threads`, the torch CPU threads that scored it: in bfloat16, oneDNN's matmuls round some
    outputs differently with another thread count (`scoring_threads`), so two rows of the same candidate are equal
    digit for digit only when their `threads` are."""
    clock = time.perf_counter()
    merge_seconds = 0.0
    threads = torch.get_num_threads()
    try:
        merger.apply(candidate)
        merge_seconds = time.perf_counter() - clock
        result = evaluate(model, tokenizer, sets, settings.batch_size)
    except Exception as error:  # any failing candidate: log it, penalise it, go on
        return {"status": "failed", "coefficients": candidate.tolist(), "fitness": settings.failure_penalty,
                "error": f"{type(error).__name__}: {error}", "merge_seconds": merge_seconds,
                "score_seconds": time.perf_counter() - clock - merge_seconds,
                "seconds": time.perf_counter() - clock, "threads": threads}
    return {"status": "ok", "coefficients": candidate.tolist(), "fitness": result["fitness"], "tasks": result["tasks"],
            "examples": result["examples"], "merge_seconds": merge_seconds, "score_seconds": result["seconds"],
            "seconds": time.perf_counter() - clock, "threads": threads}


def scoring_threads(cfg: RunConfig, backend: str) -> int:
    """The torch CPU threads that score a search's candidates: this process's on the local backend (the command set
    them to `threads`, else torch's default); on Ray each actor's, `threads` if set, else `ray.cpus_per_actor`
    rounded (at least 1).

    Why it matters: oneDNN's bfloat16 matmuls split their work by thread count, and at some row counts (768 to 1280
    and 2048 in `benchmarks/thread_determinism.py`) a few outputs in 100,000 round to the neighbouring bf16 value.
    Through SmolLM2-135M's 30 layers that flips a weak answer now and then (suite: 3 of 8 candidates' fitness moved
    by 0.004 between 2 threads and 1); float32 is the same for every count, and a bf16 rescoring at the logged count
    reproduces the log exactly. So a bf16 search is reproducible digit for digit, across a resume or between
    backends, at the same `scoring_threads`."""
    if backend == "ray":
        return cfg.threads or max(1, round(cfg.ray.cpus_per_actor))
    return torch.get_num_threads()
