"""`benchmarks/merge_landscape.py` on the tiny run: what it scores, that it agrees with the search, that it caches."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from benchmarks import merge_landscape
from sentimerge.pipeline import search
from sentimerge.pipeline.core.rundir import RunDir
from tests.test_search import tiny_search


def test_the_landscape_scores_the_space_and_agrees_with_the_final_table(tmp_path, cache_dir):
    cfg = tiny_search(tmp_path, cache_dir, select={"top": 2, "per_task": 4}, generations=2)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    cache = tmp_path / "landscape"
    scored = merge_landscape.score_all(cfg, run, cache, cfg.search.batch_size)
    genome = json.loads((run.search / "genome.json").read_text())
    names = list(scored)
    assert names[:6] == ["base", "expert:polarity", "expert:aspect3", "expert:intensity", "uniform", "ties"]
    assert sum(name.startswith("gen ") for name in names) == 8  # 2 generations x 4
    probes = [name for name in names if name.startswith("probe: ")]
    assert len(probes) == len(genome["labels"]) + 2 * len(genome["experts"]) + len(merge_landscape.SCALES) + 2
    # the density probes are TIES at another density: the same coefficients, other weights
    assert scored["probe: ties density 0.2"]["coefficients"] == scored["ties"]["coefficients"]
    assert not torch.equal(scored["probe: ties density 0.2"]["gold"]["polarity"], scored["ties"]["gold"]["polarity"])
    from sentimerge.merge.genome import Genome

    small = merge_landscape.candidates(run, Genome(tuple(genome["experts"]), genome["layers"], genome["group_size"],
                                                   len(genome["parts"]) > 1), cfg.search.density, every=3, probes=False)
    assert [name for name, _, _, _ in small] == names[:6] + ["gen 0 cand 0", "gen 0 cand 3", "gen 1 cand 2"]
    result = merge_landscape.analyse(cfg, run, scored)
    final = pd.read_csv(run.search / "final.csv").set_index("model")
    # the same merges on the same examples: the search's own scores (TIES's merger is built after task arithmetic
    # scored every candidate: on the restored base)
    for model in ("base", "uniform", "ties"):
        for task in ("polarity", "aspect3", "intensity"):
            assert result["gold_dev"][model][task] == pytest.approx(final.loc[model, task], abs=1e-6)
    trust = {row["task"]: row for row in result["labeller_trust"]}
    assert "lexicon (VADER)" in trust["polarity"] and "lexicon (VADER)" not in trust["aspect3"]  # aspects: no VADER
    assert trust["polarity"]["examples"] == 6 + 4  # weak + held-out
    files = {path: path.stat().st_mtime_ns for path in cache.glob("*.pt")}
    assert len(files) == len(names)
    again = merge_landscape.score_all(cfg, run, cache, cfg.search.batch_size)  # cached: nothing scored again
    assert list(again) == names and {path: path.stat().st_mtime_ns for path in cache.glob("*.pt")} == files


def test_the_test_split_benchmark_scores_every_test_example_and_its_leads_add_up(tmp_path, cache_dir):
    from benchmarks import test_split
    from sentimerge.pipeline.core.upstream import load_prepared

    cfg = tiny_search(tmp_path, cache_dir, select={"top": 2, "per_task": 4}, generations=2)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    with pytest.raises(SystemExit, match="no prepared test split"):  # the tiny tasks have none: said before loading
        test_split.score_test(cfg, run, cfg.search.batch_size)
    for task in cfg.tasks:  # a test split as `prepare` writes it (the dev rows will do here)
        shutil.copyfile(run.data(task.name, "dev"), run.data(task.name, "test"))
    result = test_split.score_test(cfg, run, cfg.search.batch_size)
    tasks = [task.name for task in cfg.tasks]
    assert result["examples"] == {name: len(load_prepared(run, name, "test")) for name in tasks}
    assert all(count > 0 for count in result["examples"].values())
    scores = result["scores"]
    assert list(scores) == ["uniform", "ties", "evolved"]
    # scores and differences keep 6 decimals: a difference of two rounded scores is within 2e-6 of the rounded
    # difference (as in test_search; CI once saw -0.2641 against -0.264099)
    rounding = 2e-6
    for name in ("uniform", "ties"):
        lead = result["evolved_minus"][name]
        for task in tasks:
            assert lead["tasks"][task]["difference"] == pytest.approx(scores["evolved"][task] - scores[name][task],
                                                                      abs=rounding)
        assert lead["mean"]["difference"] == pytest.approx(scores["evolved"]["mean"] - scores[name]["mean"],
                                                           abs=rounding)
    # each merge starts from the restored base: scoring again, in the same order, gives the same numbers
    assert test_split.score_test(cfg, run, cfg.search.batch_size)["scores"] == scores


def test_float32_scores_benchmark_reproduces_the_final_table_and_counts_what_the_bf16_head_changes(tmp_path,
                                                                                                  cache_dir):
    from benchmarks import float32_scores

    cfg = tiny_search(tmp_path, cache_dir, select={"top": 2, "per_task": 4}, generations=2)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    table = float32_scores.compare_heads(cfg, run, cfg.search.batch_size).set_index("model")
    final = pd.read_csv(run.search / "final.csv").set_index("model")
    assert list(table.index) == list(final.index) and set(table["split"]) == {"dev"}
    for model in final.index:  # the search scores with the float32 head: the same numbers
        assert table.loc[model, "mean float32"] == pytest.approx(final.loc[model, "mean"], abs=1e-6)
    assert (table["float32 - bf16"] == table["mean float32"] - table["mean bf16"]).all()
    assert (table["changed"] >= 0).all() and (table["ties float32"] <= table["examples"]).all()


def test_the_landscape_of_a_multistage_search_gives_each_level_its_weak_vs_gold_spearman(tmp_path, cache_dir):
    """Issue 22: per level, the fitness the search saw against the gold dev mean over that level's tasks; level-1
    candidates are scored as logged (full genomes, zero outside the group)."""
    import numpy as np

    from sentimerge.pipeline.core.metrics import spearman
    from sentimerge.pipeline.core.rundir import read_jsonl
    from tests.test_multistage import GROUPS

    cfg = tiny_search(tmp_path, cache_dir, **GROUPS)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    scored = merge_landscape.score_all(cfg, run, tmp_path / "landscape", cfg.search.batch_size, probes=False)
    level = read_jsonl(run.search / "levels" / "sentiment.jsonl")
    assert sum(name.startswith("level sentiment: ") for name in scored) == len(level) == 8
    result = merge_landscape.analyse(cfg, run, scored)
    rows = {row["level"]: row for row in result["level_spearman"]}
    assert set(rows) == {"level 1: sentiment", "level 2"}
    assert rows["level 1: sentiment"]["tasks"] == "polarity, intensity" and rows["level 2"]["candidates"] == 8
    gold = result["gold_dev"]
    expected = spearman([row["fitness"] for row in level],
                        [np.mean([gold[f"level sentiment: gen {row['generation']} cand {row['index']}"][task]
                                  for task in ("polarity", "intensity")]) for row in level])
    assert np.isfinite(expected) and rows["level 1: sentiment"]["spearman"] == pytest.approx(expected)
