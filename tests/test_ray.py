"""The Ray backend on a local Ray (2 CPUs) and the tiny model: same results as the local path, and a worker that
dies mid-candidate is replaced without stopping the search."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

ray = pytest.importorskip("ray")

from sentimerge.pipeline import experts, prepare, search  # noqa: E402
from sentimerge.pipeline.core.candidates import scoring_threads  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.ray_backend import WORKER_FAULT_ENV, RayScorerPool  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl  # noqa: E402
from tests.conftest import write_tiny_config  # noqa: E402

DECISIVE = ("generation", "index", "status", "coefficients", "fitness", "tasks")


@pytest.fixture(scope="module")
def ray_session():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, ray_session):
    """A tiny run with its experts trained locally (the reference for the Ray runs)."""
    folder = tmp_path_factory.mktemp("ray")
    path = write_tiny_config(folder, cache_dir=cache_dir, experts={"steps": 4, "batch_size": 4, "dev_examples": 8},
                             search={"population": 4, "generations": 2, "weak": {"per_task": 4},
                                     "gold": {"per_generation": 0}, "export": False},
                             ray={"num_cpus": 2, "cpus_per_expert": 1, "cpus_per_actor": 1})
    cfg = load_config(path)
    prepare.main(cfg)
    experts.main(cfg)
    return cfg


def _copy_run(cfg, target, *, keep_experts: bool):
    shutil.copytree(cfg.resolved_run_dir, target)
    if not keep_experts:
        shutil.rmtree(target / "experts")
    shutil.rmtree(target / "search", ignore_errors=True)
    return cfg.model_copy(update={"run_dir": str(target)})


def _decisive(rows):
    return [{key: row.get(key) for key in DECISIVE} for row in rows]


def test_experts_trained_as_ray_tasks_equal_the_local_ones(trained, tmp_path):
    from safetensors.torch import load_file

    cfg = _copy_run(trained, tmp_path / "run", keep_experts=False)
    experts.main(cfg, backend="ray")
    local, remote = RunDir(trained.resolved_run_dir), RunDir(cfg.resolved_run_dir)
    for task in cfg.tasks:
        want = load_file(local.expert_adapter(task.name) / "adapter_model.safetensors")
        got = load_file(remote.expert_adapter(task.name) / "adapter_model.safetensors")
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
        assert (read_jsonl(remote.expert(task.name) / "metrics.jsonl")[-1]["step"]
                == read_jsonl(local.expert(task.name) / "metrics.jsonl")[-1]["step"])


def test_a_ray_search_writes_the_same_log_as_a_local_one(trained, tmp_path):
    local = _copy_run(trained, tmp_path / "local", keep_experts=True)
    remote = _copy_run(trained, tmp_path / "ray", keep_experts=True)
    search.main(local)
    search.main(remote, backend="ray")
    want = read_jsonl(RunDir(local.resolved_run_dir).search_candidates)
    got = read_jsonl(RunDir(remote.resolved_run_dir).search_candidates)
    assert len(want) == 8
    _close(_decisive(got), _decisive(want))
    # each row says how many torch threads scored it: the actors' count is set from `ray.cpus_per_actor` (1 here)
    assert {row["threads"] for row in got} == {scoring_threads(remote, "ray")} == {1}
    assert {row["threads"] for row in want} == {torch.get_num_threads()}


def test_a_multistage_ray_search_writes_the_same_logs_at_each_level_as_a_local_one(trained, tmp_path, monkeypatch):
    """`search.stages: groups` on Ray: the level-1 group search is scored on the actors (the driver scores only the
    group's baselines on its weak sets), on its group's weak sets only, and both levels log what the local search
    logs."""
    staged = {"stages": "groups", "group_generations": 2, "generations": 2,
              "groups": {"s": ["polarity", "intensity"], "a": ["aspect3"]}}
    runs, driver_scored = {}, {}
    original = search.score_candidate
    for name, backend in (("local", None), ("ray", "ray")):
        calls = driver_scored[name] = []

        def spy(merger, model, tokenizer, sets, *args, calls=calls, **kwargs):
            calls.append(sorted(scored.task.name for scored in sets))
            return original(merger, model, tokenizer, sets, *args, **kwargs)

        monkeypatch.setattr(search, "score_candidate", spy)
        cfg = _copy_run(trained, tmp_path / name, keep_experts=True)
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update=staged)})
        search.main(cfg, backend=backend)
        runs[name] = RunDir(cfg.resolved_run_dir)
    group = ["intensity", "polarity"]
    # the driver scores the group's 3 baselines (its start, each expert alone) and re-scores its top 5 and its start
    # on the held-out sets either way; its 8 candidates only on the local path
    assert driver_scored["local"].count(group) == 3 + 8 + 6 and driver_scored["ray"].count(group) == 3 + 6
    for log in ("levels/s.jsonl", "candidates.jsonl"):
        want, got = (read_jsonl(runs[name].search / log) for name in ("local", "ray"))
        assert len(want) == 8
        _close(_decisive(got), _decisive(want))
    level = read_jsonl(runs["ray"].search / "levels" / "s.jsonl")
    assert {row["level"] for row in level} == {"s"} and all(set(row["tasks"]) == {"polarity", "intensity"}
                                                          for row in level if row["status"] == "ok")


def test_the_level_one_group_searches_run_at_once_on_ray_and_log_what_the_local_ones_log(tmp_path, cache_dir,
                                                                                          ray_session, monkeypatch):
    """Two groups of two experts: on Ray each group's CMA-ES runs in a driver thread of its own, their candidates
    sharing the actors; each group's log, choice and the level-2 log equal the local path's, which searches the
    groups one after the other."""
    from sentimerge.pipeline.core.ray_backend import RayScorerPool
    from tests.conftest import TINY_TASKS
    from tests.test_merge import make_experts

    polarity = next(task for task in TINY_TASKS if task["name"] == "polarity")
    tasks = [{**task, "source": {"path": "{data_root}/{task}/{split}.jsonl"}} for task in TINY_TASKS]
    tasks.append({**polarity, "name": "polarity2", "source": {"path": "{data_root}/polarity/{split}.jsonl"}})
    groups = {"stages": "groups", "group_generations": 2, "generations": 1,
              "groups": {"s": ["polarity", "intensity"], "p": ["polarity2", "aspect3"]}}
    path = write_tiny_config(tmp_path, cache_dir=cache_dir, tasks=tasks,
                             search={"population": 4, "weak": {"per_task": 4}, "select": {"top": 2, "per_task": 4},
                                     "gold": {"per_generation": 0}, "export": False, **groups},
                             ray={"num_cpus": 2, "cpus_per_actor": 1})
    cfg = load_config(path)
    prepare.main(cfg)
    make_experts(cfg)
    threads = set()
    original = RayScorerPool.evaluate

    def spy(self, generation, pending, tasks=None):
        import threading

        threads.add((threading.current_thread().name, tuple(sorted(tasks or ()))))
        yield from original(self, generation, pending, tasks)

    monkeypatch.setattr(RayScorerPool, "evaluate", spy)
    runs = {}
    for name, backend in (("local", None), ("ray", "ray")):
        copy = _copy_run(cfg, tmp_path / name, keep_experts=True)
        search.main(copy, backend=backend)
        runs[name] = RunDir(copy.resolved_run_dir)
    level_one = {(thread, group) for thread, group in threads if thread.startswith("level1")}
    assert {group for _, group in level_one} == {("intensity", "polarity"), ("aspect3", "polarity2")}
    assert len({thread for thread, _ in level_one}) == 2  # one thread per group
    for log in ("levels/s.jsonl", "levels/p.jsonl", "candidates.jsonl"):
        want, got = (read_jsonl(runs[name].search / log) for name in ("local", "ray"))
        assert len(want) == 8 if log.startswith("levels") else len(want) == 4
        _close(_decisive(got), _decisive(want))
    models = [json.loads(runs[name].search_level_models.read_text()) for name in ("local", "ray")]
    assert models[0].keys() == models[1].keys() == {"s", "p"}
    for group in ("s", "p"):
        assert models[1][group]["coefficients"] == pytest.approx(models[0][group]["coefficients"], abs=1e-9)


def _close(got, want) -> None:
    assert [(r["generation"], r["index"], r["status"]) for r in got] == [(r["generation"], r["index"], r["status"])
                                                                          for r in want]
    for g, w in zip(got, want):
        assert g["coefficients"] == pytest.approx(w["coefficients"], abs=1e-9)
        assert g["fitness"] == pytest.approx(w["fitness"], abs=1e-6)


def test_a_worker_that_dies_mid_candidate_is_replaced_and_the_candidate_retried(trained, tmp_path, monkeypatch):
    local = _copy_run(trained, tmp_path / "local", keep_experts=True)
    search.main(local)
    cfg = _copy_run(trained, tmp_path / "ray", keep_experts=True)
    monkeypatch.setenv(WORKER_FAULT_ENV, "kill@2")  # each first actor dies as it starts its 2nd candidate
    replaced = []
    original = RayScorerPool.close

    def close(pool):
        replaced.append(pool.replaced)
        original(pool)

    monkeypatch.setattr(RayScorerPool, "close", close)
    search.main(cfg, backend="ray")
    assert replaced and replaced[0] >= 1
    rows = read_jsonl(RunDir(cfg.resolved_run_dir).search_candidates)
    _close(_decisive(rows), _decisive(read_jsonl(RunDir(local.resolved_run_dir).search_candidates)))


def test_without_retries_the_dead_workers_candidate_is_logged_as_failed_and_the_search_goes_on(trained, tmp_path,
                                                                                              monkeypatch):
    cfg = _copy_run(trained, tmp_path / "ray", keep_experts=True)
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"retries": 0, "actors": 1})})
    monkeypatch.setenv(WORKER_FAULT_ENV, "kill@3")
    search.main(cfg, backend="ray")
    rows = read_jsonl(RunDir(cfg.resolved_run_dir).search_candidates)
    failed = [row for row in rows if row["status"] == "failed"]
    assert len(rows) == 8 and len(failed) == 1
    assert failed[0]["index"] == 2 and failed[0]["fitness"] == cfg.search.failure_penalty
    assert failed[0]["error"].startswith("worker died")


def test_ray_overhead_names_where_the_local_and_ray_logs_part():
    """benchmarks/ray_overhead.py: equal logs agree; otherwise the first differing row is named, with the fitness of
    both or the note that the candidates themselves differ."""
    from benchmarks.ray_overhead import logs_agree

    row = {"level": "sentiment", "generation": 0, "index": 1, "coefficients": [1.0, 0.5], "fitness": 0.5}
    assert logs_agree([row, row], [row, row]) == (True, "")
    assert logs_agree([row], [{**row, "fitness": 0.5004}]) == (True, "")
    agree, where = logs_agree([row, row], [row, {**row, "fitness": 0.52}])
    assert not agree and where == "row 1 (sentiment generation 0 candidate 1): fitness 0.5000 locally, 0.5200 on Ray"
    agree, where = logs_agree([{**row, "threads": 2}], [{**row, "fitness": 0.52, "threads": 1}])
    assert not agree and where.endswith("on Ray, scored with 2 and 1 torch threads (bf16 matmuls round differently "
                                        "with the thread count)")
    agree, where = logs_agree([row], [{**row, "coefficients": [1.0, 0.6]}])
    assert not agree and "other coefficients" in where
    assert logs_agree([row, row], [row]) == (False, "2 rows locally, 1 on Ray")
