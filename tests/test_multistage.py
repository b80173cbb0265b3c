"""Multi-stage merging by task group (MEM-MCL, `search.stages: groups`): the two levels compose to their closed form,
the search runs, resumes at each level like an uninterrupted one, and its export equals mergekit's run of the recipe."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sentimerge.merge.engine import InMemoryMerge
from sentimerge.merge.genome import Genome
from sentimerge.merge.methods import get_method
from sentimerge.merge.stages import group_plan, level_one, level_two, restrict
from sentimerge.pipeline import search
from sentimerge.pipeline.inspect_run import main as main_inspect
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.metrics import spearman
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl
from tests.conftest import write_tiny_config
from tests.test_merge import load_base
from tests.test_search import tiny_search, without_timing

GROUPS = {"stages": "groups", "group_generations": 2, "generations": 2, "population": 4}


def test_the_plan_orders_groups_by_difficulty_and_searches_only_groups_of_two():
    plan = group_plan(["a", "b", "c", "d"], {"a": "x", "b": "y", "c": "x", "d": "z"},
                      {"a": 0.9, "b": 0.2, "c": 0.5, "d": 0.2})
    assert plan.groups == (("y", ("b",)), ("z", ("d",)), ("x", ("a", "c")))
    assert plan.searched() == [("x", ("a", "c"))]


def test_two_levels_merge_to_their_closed_form(tiny_experts):
    """Level 1 merges polarity and intensity into a group model; level 2 weighs it and aspect3 per layer: the merged
    weights equal W0 + sum_g w_g(l) (group model_g - W0), built from two separate in-memory merges."""
    cfg, _, adapters = tiny_experts
    model = load_base(cfg)
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1, True)
    merger = InMemoryMerge(model, adapters, genome, get_method("task_arithmetic"))
    plan = group_plan(list(genome.experts), {"polarity": "s", "intensity": "s", "aspect3": "a"}, {})
    rng = np.random.default_rng(3)
    size, decode_one = level_one(genome, ("polarity", "intensity"))
    inner = decode_one(rng.uniform(0.2, 1.4, size))
    assert np.array_equal(restrict(genome, inner, ("polarity", "intensity")).shape, (size,))
    size_two, decode_two = level_two(genome, plan, {"s": inner})
    weights = rng.uniform(0.3, 1.3, size_two)
    merged = merger.merged_state(decode_two(weights))
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    group_model = merger.merged_state(inner)
    alone = merger.merged_state(genome.one_hot("aspect3"))
    w = weights.reshape(len(plan.groups), genome.groups, len(genome.parts))  # groups in plan order: a, s
    for name, value in merged.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        part = genome.part_index("attention" if "attn" in name else "mlp")
        expected = base[name] + w[1, layer, part] * (group_model[name] - base[name]) \
            + w[0, layer, part] * (alone[name] - base[name])
        assert torch.allclose(value, expected, atol=1e-5), name


def test_a_multistage_search_runs_resumes_at_each_level_and_exports_what_mergekit_writes(tmp_path, cache_dir,
                                                                                           capsys):
    whole = tiny_search(tmp_path / "whole", cache_dir, **GROUPS, export=True, dtype="float32",
                        select={"top": 2, "per_task": 4})
    search.main(whole)
    run = RunDir(whole.resolved_run_dir)
    report = json.loads(run.search_report.read_text())
    assert list(report["levels"]) == ["sentiment"] and report["levels"]["sentiment"]["experts"] == ["polarity",
                                                                                                    "intensity"]
    level = read_jsonl(run.search / "levels" / "sentiment.jsonl")
    assert len(level) == 8 and all(row["level"] == "sentiment" for row in level)
    # level 1 keeps what the flat search keeps: baselines on the group's weak sets and a held-out choice
    plan = json.loads(run.search_level_plan.read_text())
    assert [group["name"] for group in plan["groups"]] == [name for name, _ in search.group_plan_of(
        whole, run, Genome(("polarity", "aspect3", "intensity"), 2, 1, True)).groups]
    baselines = json.loads(run.search_level_baselines("sentiment").read_text())
    assert list(baselines) == ["uniform", "expert:polarity", "expert:intensity"]
    assert set(baselines["uniform"]["tasks"]) == {"polarity", "intensity"}  # scored on the group's sets only
    selection = read_jsonl(run.search_level_selection("sentiment"))
    top = sorted(level, key=lambda row: -row["fitness"])[:2]
    assert [row["name"] for row in selection] == [f"gen {r['generation']} cand {r['index']}" for r in top] + ["start"]
    assert selection[-1]["coefficients"] == baselines["uniform"]["coefficients"]
    chosen = max(selection, key=lambda row: row["select_fitness"])
    group_model = report["levels"]["sentiment"]
    assert group_model["coefficients"] == chosen["coefficients"] and group_model["selected_by"] == "held-out weak set"
    assert json.loads(run.search_level_models.read_text()) == report["levels"]
    assert main_inspect(run.root) and "search tree (multi-stage" in (tree := capsys.readouterr().out)
    assert "├─" in tree and "└─" in tree and "level-1 CMA-ES over polarity, intensity; 8 candidates" in tree
    assert "aspect3 (one expert: enters level 2 as it is)" in tree and "group model: " in tree
    genome = Genome(("polarity", "aspect3", "intensity"), 2, 1, True)
    flat = np.asarray(level[0]["coefficients"]).reshape(3, 2, 2)
    assert np.all(flat[1] == 0)  # level 1 merges only its group's experts
    assert len(read_jsonl(run.search_candidates)) == 8
    # the export (mergekit's run of the recipe) equals the in-memory merge of the evolved candidate
    from sentimerge.merge.lora import read_adapter

    adapters = {name: read_adapter(run.expert_adapter(name)) for name in genome.experts}
    merger = InMemoryMerge(load_base(whole), adapters, genome, get_method("task_arithmetic"))
    selected = json.loads((run.search_merged / "sentimerge_search.json").read_text())["best"]["coefficients"]
    assert selected in [row["coefficients"] for row in read_jsonl(run.search_candidates)] + [[1.0] * 12]
    written = load_file(str(run.search_merged / "model.safetensors"))
    for name, value in merger.merged_state(np.asarray(selected)).items():
        assert torch.allclose(written[name], value, atol=1e-5), name

    parts = tiny_search(tmp_path / "parts", cache_dir, **GROUPS, export=True, dtype="float32",
                        select={"top": 2, "per_task": 4})
    resumed = RunDir(parts.resolved_run_dir)
    search.main(parts, max_evaluations=3)  # stops inside level 1
    assert len(read_jsonl(resumed.search / "levels" / "sentiment.jsonl")) == 3 and not resumed.search_candidates.exists()
    assert main_inspect(resumed.root) and "level-1 CMA-ES over polarity, intensity; 3 candidates" in \
        (tree := capsys.readouterr().out) and "level 2: one CMA-ES over the 2 group models' deltas, not started" in tree
    search.main(parts, max_evaluations=7)  # finishes level 1, stops inside level 2
    assert len(read_jsonl(resumed.search_candidates)) == 2 and not is_done(resumed.search)
    search.main(parts)
    assert without_timing(read_jsonl(resumed.search / "levels" / "sentiment.jsonl")) == \
        without_timing(level)
    assert without_timing(read_jsonl(resumed.search_candidates)) == without_timing(read_jsonl(run.search_candidates))
    assert without_timing(read_jsonl(resumed.search_level_selection("sentiment"))) == without_timing(selection)


@pytest.mark.parametrize("search_section, message", [
    ({"stages": "groups", "method": "ties"}, "does not compose"),
    ({"stages": "groups", "groups": {"a": ["polarity"], "b": ["aspect3"]}}, "exactly one group \\(intensity\\)"),
    ({"groups": {"a": ["polarity", "aspect3", "intensity"]}}, "read with search.stages: groups"),
    ({"stages": "groups", "bounds": [0.0, 0.9], "init": 0.5}, "must include it"),
])
def test_multistage_settings_are_checked(tmp_path, cache_dir, search_section, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_tiny_config(tmp_path, cache_dir=cache_dir, search=search_section))


def test_the_flat_against_multistage_benchmark_reuses_the_experts_and_pairs_the_final_tables(
        tmp_path, cache_dir, monkeypatch):
    """benchmarks/multistage.py: the multi-stage search runs on the flat run's own experts (linked, not retrained),
    counts the candidates of both levels, and its paired differences equal the final tables' difference of means."""
    from benchmarks import multistage

    cfg = tiny_search(tmp_path / "flat", cache_dir)
    search.main(cfg)
    flat = RunDir(cfg.resolved_run_dir)
    before = (flat.search / "final.csv").read_bytes()
    staged_cfg = multistage.multistage_run(
        cfg, flat, tmp_path / "staged",
        {"search.stages": "groups", "search.group_generations": 2, "search.generations": 2,
         "search.groups": multistage.parse_groups("s=polarity,intensity; a=aspect3")})
    search.main(staged_cfg)
    staged = RunDir(staged_cfg.resolved_run_dir)
    adapter = next(path for path in flat.expert("polarity").rglob("*.safetensors"))
    assert (staged.root / adapter.relative_to(flat.root)).stat().st_ino == adapter.stat().st_ino
    assert multistage.evaluations(flat) == 4 * 3 and multistage.evaluations(staged) == 4 * 2 + 4 * 2
    rows = multistage.compare(cfg, flat, staged)
    assert (flat.search / "final.csv").read_bytes() == before
    means = {label: pd.read_csv(run.search_final_table("dev")).set_index("model") for label, run in
             (("flat", flat), ("multistage", staged))}
    pairs = {row["comparison"]: row for row in rows if row["split"] == "dev"}
    expected = means["multistage"].loc["evolved", "mean"] - means["flat"].loc["evolved", "mean"]
    assert pairs["multistage - flat"]["difference"] == pytest.approx(expected, abs=1e-5)
    assert pairs["flat - ties"]["difference"] == pytest.approx(
        means["flat"].loc["evolved", "mean"] - means["flat"].loc["ties", "mean"], abs=1e-5)
    for label in ("flat", "multistage"):  # gold per task, as each search's final table has it
        for task in ("polarity", "aspect3", "intensity"):
            assert pairs[f"{label} evolved"][f"gold:{task}"] == pytest.approx(means[label].loc["evolved", task])
    summary = multistage.summarize(pd.DataFrame(rows))
    assert set(multistage.headline(summary, "tiny")) >= {"tiny_multistage_minus_flat_dev"}
    dev = summary.set_index(["comparison", "split"]).loc[("multistage evolved", "dev")]
    assert dev["gold:aspect3"] == pytest.approx(means["multistage"].loc["evolved", "aspect3"])
    # --level-spearman: group s (2 experts) ranks its start, each expert alone and its 8 logged candidates; group a
    # (one expert) has no level-1 search; gold is cached, so a second call scores nothing
    (level,) = multistage.level_one_spearman(staged_cfg, staged)
    assert (level["group"], level["tasks"], level["models"]) == ("s", "polarity,intensity", 3 + 2 * 4)
    cached = json.loads((staged.search_levels / "gold_dev.json").read_text())["s"]
    weak = {key: row["fitness"] for key, row in json.loads(staged.search_level_baselines("s").read_text()).items()}
    weak |= {f"gen {row['generation']} cand {row['index']}": row["fitness"]
             for row in read_jsonl(staged.search_level_log("s")) if row["status"] == "ok"}
    assert set(cached) == set(weak) and len(cached) == 11
    assert level["spearman"] == pytest.approx(spearman(list(weak.values()), [cached[key] for key in weak]))
    monkeypatch.setattr(search, "_gold_score", lambda *a, **k: pytest.fail("a cached gold score was computed again"))
    assert multistage.level_one_spearman(staged_cfg, staged) == [level]


def test_the_mem_mcl_table_reads_each_mechanism_against_its_off_switch_from_the_result_files(tmp_path):
    """benchmarks/mem_mcl_table.py: the multi-stage rows are multi-stage minus flat only (not the baselines), the
    unseen split is named per config, and a missing result file leaves its rows out."""
    import json

    from benchmarks import mem_mcl_table

    summary = {"runs": 3, "sd": 0.01, "ahead": "2 of 3"}
    (tmp_path / "multistage_suite.json").write_text(json.dumps({"summary": [
        {**summary, "comparison": "multistage - flat", "split": "test", "difference": -0.016},
        {**summary, "comparison": "multistage - ties", "split": "test", "difference": 0.5}]}))
    (tmp_path / "stage3_ablation_demo_task_pacing.json").write_text(json.dumps({"summary": [
        {**summary, "split": "dev", "difference": -0.009}, {**summary, "split": "test", "difference": -0.011}]}))
    rows = mem_mcl_table.rows(tmp_path)
    assert [(r["mechanism"].split(",")[0], r["config"], r["split"], r["difference"]) for r in rows] == [
        ("multi-stage merge by task group", "suite", "unseen dev half", -0.016),
        ("task pacing", "demo", "dev", -0.009), ("task pacing", "demo", "test", -0.011)]
