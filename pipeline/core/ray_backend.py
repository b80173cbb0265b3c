"""The Ray backend (`backend: ray`, or `--backend ray` on `experts` and `search`): stage 1 trains each expert as a Ray
task, stage 2 scores each generation's candidates on a pool of Ray actors.

The driver keeps everything that decides a result: CMA-ES, the candidate log, resume, the best candidate, the gold
tables. Workers only compute, and write where the local path writes (the run directory must be on storage every
node sees). So a local and a Ray run with the same seed write the same log, and a Ray search resumes like a local one.

What crosses the wire:
- stage 1, once per expert: the run config (a few KB) and the task name; the worker reads the prepared data and the
  base model from the run directory and writes the expert folder there;
- stage 2, once per actor: the run config; the actor loads the base model, the expert adapters and the labelled weak
  sets from the run directory and keeps one resident scoring copy of the model;
- stage 2, per candidate: the coefficient vector (8 bytes per coefficient) to the actor, one log row (about 1 KB)
  back. `benchmarks/ray_overhead.py` measures the bytes and the overhead against the local path.

A worker that dies mid-candidate (OOM, a lost node) is replaced by a fresh actor; its candidate is retried on it
`ray.retries` times (default once), then logged as failed with the search's failure penalty, and the search goes on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from sentimerge.pipeline.core.config import RunConfig
from sentimerge.pipeline.core.errors import SentimergeError

log = logging.getLogger("sentimerge.ray")

# Tests set this to a fault spec (`kill@N`, see core.faults) that the first actors get as SENTIMERGE_FAULT,
# so that a worker dies mid-candidate; replacement actors start without it.
WORKER_FAULT_ENV = "SENTIMERGE_RAY_WORKER_FAULT"


def require_ray():
    try:
        import ray
    except ImportError:
        raise SentimergeError("backend ray: Ray is not installed; pip install 'sentimerge[ray]'") from None
    return ray


def init_ray(cfg: RunConfig):
    """Connect to `ray.address`, or start a local Ray with `ray.num_cpus` CPUs (once per process)."""
    ray = require_ray()
    if not ray.is_initialized():
        local = cfg.ray.address is None
        ray.init(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus if local else None, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
        log.info("ray: %s with %s", "started a local cluster" if local else f"connected to {cfg.ray.address}",
                 {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
    return ray


def _unwrap(error: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error, when there is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, SentimergeError) else error


# --- stage 1 -------------------------------------------------------------------------------------------------

def _on_worker(train: Callable[[RunConfig, str, bool], str], cfg: RunConfig, task: str, force: bool) -> str:
    """Runs on a Ray worker: set the process up as the driver's, then `train` one task (same seeds, same files)."""
    from sentimerge.pipeline.core.runtime import seed_everything, set_threads, setup_logging

    setup_logging(False)
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    return train(cfg, task, force)


def train_experts(cfg: RunConfig, tasks: list[str], train: Callable[[RunConfig, str, bool], str], *,
                  force: bool) -> dict[str, Path]:
    """Train the experts of `tasks` as Ray tasks, each with `ray.cpus_per_expert` CPUs and `gpus_per_expert` GPUs.

    `train(cfg, task, force)` trains one expert on the worker and returns its folder (stage 1's `train_one`: the
    stage passes it down, so this module never imports a stage)."""
    ray = init_ray(cfg)
    remote = ray.remote(_on_worker).options(num_cpus=cfg.ray.cpus_per_expert,
                                                     num_gpus=cfg.ray.gpus_per_expert, max_retries=0)
    refs = {task: remote.remote(train, cfg, task, force) for task in tasks}
    log.info("ray: %d expert(s) submitted (%g CPU, %g GPU each)", len(refs), cfg.ray.cpus_per_expert,
             cfg.ray.gpus_per_expert)
    folders, failures = {}, []
    for task, ref in refs.items():
        try:
            folders[task] = Path(ray.get(ref))
        except Exception as error:  # report every task's failure, then raise the first
            failures.append((task, _unwrap(error)))
    if failures:
        task, error = failures[0]
        if isinstance(error, SentimergeError):
            raise error
        raise SentimergeError(f"expert {task}: training failed on Ray: {str(error).strip().splitlines()[-1]}")
    return folders


# --- stage 2 -------------------------------------------------------------------------------------------------

class ScoringWorker:
    """A Ray actor: the base model, the experts' deltas and one resident scoring copy; scores candidates."""

    def __init__(self, cfg: RunConfig, seed: int):
        from sentimerge.merge.engine import InMemoryMerge
        from sentimerge.merge.methods import get_method
        from sentimerge.pipeline.core.candidates import load_search_inputs, load_weak_sets, scoring_threads
        from sentimerge.pipeline.core.rundir import RunDir
        from sentimerge.pipeline.core.runtime import set_threads

        set_threads(scoring_threads(cfg, "ray"))  # explicit, whatever OMP_NUM_THREADS Ray gave the process
        run, settings = RunDir(cfg.resolved_run_dir), cfg.search
        self.settings = settings
        self.model, self.tokenizer, adapters, genome = load_search_inputs(cfg, run)
        self.merger = InMemoryMerge(self.model, adapters, genome, get_method(settings.method),
                                    density=settings.density, seed=seed, compile=settings.compile)
        self.sets = load_weak_sets(run, cfg, self.tokenizer)

    def score(self, generation: int, index: int, candidate: list[float], tasks: list[str] | None = None) -> dict:
        """The candidate's row, scored on the weak sets of `tasks` (a level-1 group of a multi-stage search) or all."""
        from sentimerge.pipeline.core import faults
        from sentimerge.pipeline.core.candidates import score_candidate

        faults.point("score candidate")
        sets = self.sets if tasks is None else [scored for scored in self.sets if scored.task.name in tasks]
        row = score_candidate(self.merger, self.model, self.tokenizer, sets, np.asarray(candidate), self.settings)
        return {"generation": generation, "index": index, **row}

    def pid(self) -> int:
        return os.getpid()


class RayScorerPool:
    """The actors of stage 2, and an evaluator for `merge.cmaes.run_cma` that spreads a generation over them."""

    def __init__(self, cfg: RunConfig, seed: int):
        self.ray = init_ray(cfg)
        self.cfg, self.seed = cfg, seed
        settings = cfg.ray
        count = settings.actors or max(1, int(self.ray.cluster_resources().get("CPU", 1) // settings.cpus_per_actor))
        self.actor_class = self.ray.remote(num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor,
                                           max_restarts=0, max_task_retries=0)(ScoringWorker)
        fault = os.environ.get(WORKER_FAULT_ENV)
        self.actors = [self._start({"SENTIMERGE_FAULT": fault} if fault else None) for _ in range(count)]
        self.replaced = 0
        # the idle actors' slots, shared by every `evaluate` running at once (the level-1 group searches of a
        # multi-stage search run in threads): a slot is taken for one candidate and given back when it returns
        self._idle = list(range(count))
        self._changed = threading.Condition()
        log.info("ray: %d scoring actor(s) (%g CPU, %g GPU each)", count, settings.cpus_per_actor,
                 settings.gpus_per_actor)

    def _start(self, env: dict[str, str] | None = None):
        options = {"runtime_env": {"env_vars": env}} if env else {}
        return self.actor_class.options(**options).remote(self.cfg, self.seed)

    def _failed(self, generation: int, index: int, candidate: np.ndarray, error: str) -> dict:
        return {"generation": generation, "index": index, "status": "failed", "coefficients": candidate.tolist(),
                "fitness": self.cfg.search.failure_penalty, "error": error, "merge_seconds": 0.0,
                "score_seconds": 0.0, "seconds": 0.0}

    def evaluate(self, generation: int, pending: list[tuple[int, np.ndarray]],
                 tasks: Sequence[str] | None = None) -> Iterator[dict]:
        """Score `pending` on the actors (one candidate per idle actor), on the weak sets of `tasks` (default all);
        yield the rows in the order given. Several evaluations may run at once from different threads: they share
        the idle actors."""
        ray = self.ray
        queue = [(index, candidate, 0) for index, candidate in pending]
        running: dict = {}  # object ref -> (actor slot, index, candidate, attempts)
        done: dict[int, dict] = {}
        order = [index for index, _ in pending]
        try:
            while queue or running:
                with self._changed:
                    while queue and not running and not self._idle:  # nothing of ours runs: wait for another's actor
                        self._changed.wait()
                    while queue and self._idle:
                        slot = self._idle.pop(0)
                        index, candidate, attempts = queue.pop(0)
                        ref = self.actors[slot].score.remote(generation, index, candidate.tolist(),
                                                             None if tasks is None else list(tasks))
                        running[ref] = (slot, index, candidate, attempts)
                ready, _ = ray.wait(list(running), num_returns=1)
                slot, index, candidate, attempts = running.pop(ready[0])
                try:
                    done[index] = ray.get(ready[0])
                except ray.exceptions.RayActorError as error:
                    with self._changed:
                        self.actors[slot] = self._start()  # the dead actor's replacement, without any injected fault
                        self.replaced += 1
                    reason = f"worker died: {type(error).__name__}"
                    if attempts < self.cfg.ray.retries:
                        log.warning("ray: gen %d cand %d: %s; retrying on a fresh actor", generation, index, reason)
                        queue.insert(0, (index, candidate, attempts + 1))
                    else:
                        log.warning("ray: gen %d cand %d: %s %d time(s); logged as failed", generation, index, reason,
                                    attempts + 1)
                        done[index] = self._failed(generation, index, candidate, reason)
                with self._changed:
                    self._idle.append(slot)
                    self._changed.notify_all()
                while order and order[0] in done:
                    yield done.pop(order.pop(0))
        finally:  # a caller that stops early (an error) gives the actors still busy with its candidates back
            with self._changed:
                self._idle.extend(slot for slot, *_ in running.values())
                self._changed.notify_all()

    def evaluator(self, after_scoring: Callable[[dict], dict], tasks: Sequence[str] | None = None):
        """`run_cma`'s evaluator: the pool's rows (scored on `tasks`' weak sets, default all), each passed through
        the driver's bookkeeping."""
        return lambda generation, pending: (after_scoring(row) for row in self.evaluate(generation, pending, tasks))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
