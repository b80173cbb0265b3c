"""Stage 2's search on the tiny run: files and numbers, resume equivalence, failed candidates, input errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sentimerge.merge.methods import METHODS, MergeMethod, weighted_sum
from sentimerge.pipeline import prepare, search
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl, write_json_atomic, write_jsonl_atomic
from sentimerge.pipeline.cli import main
from sentimerge.pipeline.core.metrics import spearman
from sentimerge.pipeline.core.upstream import load_prepared
from tests.conftest import write_tiny_config
from tests.test_merge import make_experts

SEARCH = {"layer_group_size": 1, "split_attention_mlp": True, "population": 4, "generations": 3, "sigma0": 0.3,
          "weak": {"per_task": 6}, "gold": {"per_generation": 4, "final": 6}, "export": False}
TIMING = {"seconds", "merge_seconds", "score_seconds"}


def tiny_search(folder, cache_dir, *, experts: bool = True, **overrides):
    cfg = load_config(write_tiny_config(folder, cache_dir=cache_dir, search={**SEARCH, **overrides}))
    prepare.main(cfg)
    if experts:
        make_experts(cfg)
    return cfg


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_final_table_can_score_each_expert_on_its_own_task_only(tmp_path, cache_dir):
    """`gold.experts: own`: an expert's row holds its own task's score (the same as with `all`) and no mean."""
    tables = {}
    for mode in ("all", "own"):
        cfg = tiny_search(tmp_path / mode, cache_dir, gold={"per_generation": 4, "final": 6, "experts": mode})
        search.main(cfg)
        run = RunDir(cfg.resolved_run_dir)
        tables[mode] = pd.read_csv(run.search / "final.csv").set_index("model")
        report = json.loads(run.search_report.read_text())
        assert np.isfinite(report["weak_vs_gold_spearman"]["final_table"])
    own, every = tables["own"], tables["all"]
    for task in ("polarity", "aspect3", "intensity"):
        assert own.loc[f"expert:{task}", task] == pytest.approx(every.loc[f"expert:{task}", task])
        others = [t for t in ("polarity", "aspect3", "intensity") if t != task]
        assert own.loc[f"expert:{task}", others].isna().all() and np.isnan(own.loc[f"expert:{task}", "mean"])
    rest = ["base", "uniform", "ties", "evolved"]
    pd.testing.assert_frame_equal(own.loc[rest], every.loc[rest])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_memory_writer_saves_what_mergekit_writes(tmp_path, cache_dir, dtype):
    """`search.writer: in_memory` saves the same checkpoint as mergekit's run of the recipe (same search, same
    seed), which loads with plain transformers; only mergekit's model card differs."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    written = {}
    for writer in ("mergekit", "in_memory"):
        cfg = tiny_search(tmp_path / writer, cache_dir, export=True, dtype=dtype, writer=writer)
        search.main(cfg)
        run = RunDir(cfg.resolved_run_dir)
        written[writer] = load_file(str(run.search_merged / "model.safetensors"))
        assert json.loads(run.search_report.read_text())["export"]["writer"] == writer
        assert (run.search_merged / "tokenizer.json").is_file() and is_done(run.search_merged)
    assert AutoModelForCausalLM.from_pretrained(run.search_merged).dtype == getattr(torch, dtype)
    assert written["mergekit"].keys() == written["in_memory"].keys()
    for name, value in written["mergekit"].items():
        assert value.dtype == written["in_memory"][name].dtype == getattr(torch, dtype), name
        # float32: the same merge to rounding; bf16: at most one step of bf16 where the float32 merges round apart
        tolerance = 1e-5 if dtype == "float32" else 2 ** -7 * float(value.float().abs().max())
        assert (value.float() - written["in_memory"][name].float()).abs().max() <= tolerance, name


def test_search_writes_its_log_tables_baselines_and_a_mergekit_export(tmp_path, cache_dir):
    cfg = tiny_search(tmp_path, cache_dir, export=True, dtype="float32")
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    assert is_done(run.search)
    rows = read_jsonl(run.search_candidates)
    assert [(r["generation"], r["index"]) for r in rows] == [(g, i) for g in range(3) for i in range(4)]
    assert all(len(r["coefficients"]) == 3 * 2 * 2 for r in rows)  # experts x layer groups x (attention, mlp)
    assert all(set(r["tasks"]) == {"polarity", "aspect3", "intensity"} for r in rows)
    generations = pd.read_csv(run.search_generations)
    assert list(generations["generation"]) == [0, 1, 2]
    assert {"best", "mean", "sigma", "gold_best"} <= set(generations.columns)
    best = json.loads(run.search_best.read_text())
    assert best["fitness"] == max(r["fitness"] for r in rows)
    baselines = json.loads(run.search_baselines.read_text())
    assert list(baselines) == ["base", "expert:polarity", "expert:aspect3", "expert:intensity", "uniform", "ties"]
    for task in ("polarity", "aspect3", "intensity"):  # the expert labeller: each expert agrees with itself
        assert baselines[f"expert:{task}"]["tasks"][task]["normalised"] == pytest.approx(1.0)
    final = pd.read_csv(run.search / "final.csv")
    assert list(final["model"]) == [*baselines, "evolved"]
    report = json.loads(run.search_report.read_text())
    assert report["export"]["max_abs_difference"] < 1e-5
    assert report["throughput"]["candidates"] == 12 and report["throughput"]["merge_ms_per_candidate"] > 0
    for name in ("mergekit_config.yml", "README.md", "model.safetensors", "DONE.json", "sentimerge_search.json"):
        assert (run.search_merged / name).is_file(), name
    assert "+" in run.search_recipe.read_text()  # base+adapter references
    # the paired comparisons are computed from the kept predictions: their observed differences are the table's
    kept = {row["model"]: row["predictions"] for row in read_jsonl(run.search_final_predictions)}
    assert list(kept) == list(final["model"]) and all(len(v) == 6 for v in kept["ties"].values())
    table = final.set_index("model")
    # the report keeps 6 decimals of each number: a difference of two rounded values is within 2e-6
    for name in ("uniform", "ties"):
        comparison = report["gold_dev_comparison"][name]
        for task in ("polarity", "aspect3", "intensity"):
            assert comparison["tasks"][task]["difference"] == pytest.approx(
                table.loc["evolved", task] - table.loc[name, task], abs=2e-6)
            assert comparison["tasks"][task]["low"] <= comparison["tasks"][task]["high"]
        assert comparison["mean"]["difference"] == pytest.approx(
            table.loc["evolved", "mean"] - table.loc[name, "mean"], abs=2e-6)
    assert "| ties | " in (run.search / "final.md").read_text()
    search.main(cfg)  # finished: a second run changes nothing
    assert read_jsonl(run.search_candidates) == rows


def test_interrupted_then_resumed_search_equals_an_uninterrupted_one(tmp_path, cache_dir):
    whole = tiny_search(tmp_path / "whole", cache_dir)
    search.main(whole)
    parts = tiny_search(tmp_path / "parts", cache_dir)
    run = RunDir(parts.resolved_run_dir)
    search.main(parts, max_evaluations=5)  # stops inside generation 1
    assert len(read_jsonl(run.search_candidates)) == 5 and not is_done(run.search)
    with open(run.search_candidates, "a") as handle:
        handle.write('{"generation": 1, "index": 1, "coeff')  # a crash while writing a line
    search.main(parts, max_evaluations=4)
    assert len(read_jsonl(run.search_candidates)) == 9
    search.main(parts)
    reference = RunDir(whole.resolved_run_dir)
    assert without_timing(read_jsonl(run.search_candidates)) == without_timing(read_jsonl(reference.search_candidates))
    pd.testing.assert_frame_equal(pd.read_csv(run.search_generations), pd.read_csv(reference.search_generations))
    assert read_jsonl(run.search_gold) == read_jsonl(reference.search_gold)


def _flaky(base: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Task arithmetic that breaks in down_proj for some coefficients: an exception, or NaN weights."""
    down_proj = base.shape == (64, 128)
    if down_proj and weights[0] > 1.2:
        raise RuntimeError("boom")
    merged = weighted_sum(base, deltas, weights)
    return merged * float("nan") if down_proj and weights[1] < 0.8 else merged


@pytest.fixture
def flaky_method():
    METHODS.register("flaky")(MergeMethod("flaky", _flaky, "task_arithmetic"))
    yield "flaky"
    METHODS.unregister("flaky")


def test_failed_candidates_are_logged_with_the_penalty_and_the_search_goes_on(tmp_path, cache_dir, flaky_method):
    cfg = tiny_search(tmp_path, cache_dir, method=flaky_method, failure_penalty=-3.0, generations=2)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    rows = read_jsonl(run.search_candidates)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(rows) == 8 and is_done(run.search)
    assert failed and len(failed) < len(rows)
    assert all(r["fitness"] == -3.0 and "tasks" not in r for r in failed)
    assert {r["error"].split(":")[0] for r in failed} <= {"RuntimeError", "MergeFailed"}
    assert json.loads(run.search_best.read_text())["status"] == "ok"
    assert pd.read_csv(run.search_generations)["failed"].sum() == len(failed)


def test_weak_set_excludes_the_experts_training_rows_and_never_uses_dev(tmp_path, cache_dir):
    from sentimerge.merge.weak import sample_weak_set

    cfg = tiny_search(tmp_path, cache_dir, experts=False)
    run = RunDir(cfg.resolved_run_dir)
    train = load_prepared(run, "polarity", "train")
    steps = [{"step": 1, "ids": [row["id"] for row in train[:12]]}, {"step": 2, "ids": [row["id"] for row in train[8:20]]}]
    write_jsonl_atomic(run.expert_schedule("polarity"), steps)  # stage 1's log of what each step trained on
    examples, summary = sample_weak_set(run, cfg.search.weak, cfg.task("polarity"), seed=0)
    assert {e["id"] for e in examples} == {row["id"] for row in train[20:]}
    assert summary == {"split": "train", "pool": 4, "drawn": 4, "excluded_expert_rows": 20,
                       "expert_rows_checked": True}
    write_json_atomic(run.expert("aspect3") / "train_ids.json", [row["id"] for row in train[:2]])  # other task's ids
    _, summary = sample_weak_set(run, cfg.search.weak, cfg.task("aspect3"), seed=0)
    assert summary["excluded_expert_rows"] == 0 and summary["expert_rows_checked"]
    again, _ = sample_weak_set(run, cfg.search.weak, cfg.task("intensity"), seed=0)
    assert len(again) == 6 and not {e["id"] for e in again} & {r["id"] for r in load_prepared(run, "intensity", "dev")}


def test_lexicon_and_gold_labellers():
    from sentimerge.merge.labellers import get_labeller
    from sentimerge.pipeline.core.tasks import TaskSpec

    source = {"path": "x.jsonl"}
    polarity = TaskSpec(name="p", kind="classification", labels=["negative", "neutral", "positive"],
                        instruction="?", source=source)
    intensity = TaskSpec(name="i", kind="regression", range=[-4, 4], instruction="?", source=source)
    examples = [{"text": "what a wonderful, great day", "label": "positive"},
                {"text": "this is awful and terrible", "label": "negative"},
                {"text": "the meeting is on monday", "label": "neutral"}]
    lexicon = get_labeller("lexicon")
    assert lexicon.problem(polarity, {}) is None
    assert lexicon.label(polarity, examples, None, {}) == ["positive", "negative", "neutral"]
    values = lexicon.label(intensity, examples, None, {})
    assert values[0] > 2 and values[1] < -2 and values[2] == 0
    assert get_labeller("gold").label(polarity, examples, None, {}) == ["positive", "negative", "neutral"]
    aspect = polarity.model_copy(update={"input_fields": ["text", "aspect"]})
    assert "aspect" in lexicon.problem(aspect, {})
    # labels VADER cannot place need polarities: financial tweets, five levels
    markets = polarity.model_copy(update={"labels": ["bearish", "bullish", "neutral"]})
    assert "give them in search.weak.label_polarity" in lexicon.problem(markets, {})
    given = {"bearish": -1.0, "bullish": 1.0, "neutral": 0.0}
    assert lexicon.problem(markets, given) is None
    assert lexicon.label(markets, examples, None, given) == ["bullish", "bearish", "neutral"]
    levels = polarity.model_copy(update={"labels": ["very negative", "negative", "neutral", "positive",
                                                    "very positive"]})
    assert "(very negative, negative: -1; positive, very positive: 1)" in lexicon.problem(levels, {})  # by VADER
    spread = {"very negative": -1.0, "negative": -0.5, "positive": 0.5, "very positive": 1.0}
    assert lexicon.problem(levels, spread) is None
    mild = [{"text": "the food was good", "label": "positive"}, {"text": "it was a bit bad", "label": "negative"}]
    strong = [examples[0], {"text": "this is awful, horrible and terrible", "label": "very negative"}]
    assert lexicon.label(levels, mild + strong, None, spread) == ["positive", "negative", "very positive",
                                                                  "very negative"]
    irony = polarity.model_copy(update={"labels": ["irony", "non_irony"]})
    assert "needs a positive and a negative label" in lexicon.problem(irony, {})


def test_input_errors_are_reported_before_models_load(tmp_path, cache_dir, capsys):
    from sentimerge.pipeline.cli import main as cli

    cfg = tiny_search(tmp_path, cache_dir, experts=False, weak={"labeller": "lexicon", "weights": {"polarty": 2}})
    with pytest.raises(SentimergeError) as error:
        search.main(cfg)
    message = str(error.value)
    assert "task aspect3: lexicon cannot label aspect-based tasks" in message
    assert "search.weak.weights: no task named 'polarty'" in message
    assert all(f"task {t}: no finished expert" in message for t in ("polarity", "aspect3", "intensity"))
    assert not RunDir(cfg.resolved_run_dir).search.exists()
    assert cli(["search", str(tmp_path / "config.yaml")]) == 2
    assert "no finished expert" in capsys.readouterr().err


def test_a_search_with_another_config_is_not_resumed(tmp_path, cache_dir):
    cfg = tiny_search(tmp_path, cache_dir)
    search.main(cfg, max_evaluations=2)
    changed = cfg.model_copy(update={"search": cfg.search.model_copy(update={"sigma0": 0.5})})
    with pytest.raises(SentimergeError, match="another config"):
        search.main(changed)
    search.main(changed, force=True, max_evaluations=1)
    rows = read_jsonl(RunDir(cfg.resolved_run_dir).search_candidates)
    assert len(rows) == 1 and not np.allclose(rows[0]["coefficients"], 1.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_bf16_search_resumed_with_another_thread_count_warns(tmp_path, cache_dir, caplog, dtype):
    """bf16 scores depend on oneDNN's thread split: the state records the scoring threads, every row its own, and a
    bf16 resume with another count says so (float32 scores do not depend on it: no warning)."""
    cfg = tiny_search(tmp_path, cache_dir, dtype=dtype)
    run = RunDir(cfg.resolved_run_dir)
    threads = torch.get_num_threads()
    search.main(cfg, max_evaluations=2)
    assert json.loads(run.search_state.read_text())["scoring_threads"] == threads
    assert [row["threads"] for row in read_jsonl(run.search_candidates)] == [threads, threads]
    other = 1 if threads > 1 else 2  # the thread count is not in the fingerprint: the search resumes
    torch.set_num_threads(other)
    try:
        with caplog.at_level("WARNING", logger="sentimerge.search"):
            search.main(cfg, max_evaluations=1)
    finally:
        torch.set_num_threads(threads)
    warned = [r.getMessage() for r in caplog.records if "scoring thread" in r.getMessage()]
    assert [row["threads"] for row in read_jsonl(run.search_candidates)] == [threads, threads, other]
    if dtype == "float32":
        assert warned == []
    else:
        assert len(warned) == 1 and f"resumed with {other} scoring thread(s) where it started with {threads}" \
            in warned[0]


def test_settings_that_do_not_change_scores_do_not_block_a_resume(tmp_path, cache_dir):
    cfg = tiny_search(tmp_path, cache_dir)
    search.main(cfg, max_evaluations=2)

    def edited(**update):
        weak = cfg.search.weak.model_copy(update=update.pop("weak", {}))
        return cfg.model_copy(update={"search": cfg.search.model_copy(update={"weak": weak, **update})})

    polarities = {"very negative": -1.0, "negative": -0.5}
    # compiling writes the same weights; polarities matter only to the lexicon labeller, which no task uses here
    search.main(edited(compile=not cfg.search.compile, weak={"label_polarity": polarities}), max_evaluations=1)
    assert len(read_jsonl(RunDir(cfg.resolved_run_dir).search_candidates)) == 3
    lexicon = {"labellers": {"polarity": "lexicon"}}
    search.main(edited(weak=lexicon), force=True, max_evaluations=1)
    with pytest.raises(SentimergeError, match="another config"):  # now they may change the weak labels
        search.main(edited(weak={**lexicon, "label_polarity": polarities}))


def test_init_auto_starts_from_the_best_scanned_uniform_merge(tmp_path, cache_dir):
    cfg = tiny_search(tmp_path, cache_dir, init="auto", init_grid=[0.25, 0.5, 1.0], generations=1, sigma0=1e-6)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    baselines = json.loads(run.search_baselines.read_text())
    scan = {name: baselines[name]["fitness"] for name in ("uniform@0.25", "uniform@0.5", "uniform@1")}
    chosen = max(scan, key=scan.get)
    assert baselines["uniform"]["coefficients"] == baselines[chosen]["coefficients"]
    assert baselines["uniform"]["fitness"] == scan[chosen]
    start = baselines[chosen]["coefficients"][0]
    for row in read_jsonl(run.search_candidates):  # CMA-ES samples around the chosen start (step ~ 0)
        assert np.allclose(row["coefficients"], start, atol=1e-4)
    final = pd.read_csv(run.search / "final.csv")
    assert "uniform" in set(final["model"]) and not any(final["model"].str.startswith("uniform@"))


def test_references_off_leaves_the_base_and_experts_unscored_on_the_weak_set_and_changes_no_choice(tmp_path, cache_dir,
                                                                                                   capsys):
    """`search.weak.references: false` (the demo's): the base model and the experts alone are listed in baselines.json
    unscored, the candidates, the evolved merge and every gold score are those of a search that scored them, and the
    weak-vs-gold Spearman is taken over the models that have both scores. The setting changes no candidate, so a
    search started with it on resumes with it off (keeping the scores it has)."""
    runs = {}
    for references in (True, False):
        cfg = tiny_search(tmp_path / str(references), cache_dir, weak={"per_task": 6, "references": references})
        if references:
            search.main(cfg, max_evaluations=2)
            weak = cfg.search.weak.model_copy(update={"references": False})
            cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"weak": weak})})
        search.main(cfg)
        runs[references] = RunDir(cfg.resolved_run_dir)
    on, off = runs[True], runs[False]
    baselines = json.loads(off.search_baselines.read_text())
    for name in ("base", "expert:polarity", "expert:aspect3", "expert:intensity"):
        assert baselines[name]["fitness"] is None and baselines[name]["status"].startswith("unscored")
        assert baselines[name]["coefficients"] == json.loads(on.search_baselines.read_text())[name]["coefficients"]
    assert baselines["ties"]["fitness"] == json.loads(on.search_baselines.read_text())["ties"]["fitness"]
    assert json.loads(on.search_baselines.read_text())["base"]["fitness"] is not None  # scored before the resume
    assert without_timing(read_jsonl(off.search_candidates)) == without_timing(read_jsonl(on.search_candidates))
    assert json.loads(off.search_selected.read_text())["coefficients"] == \
        json.loads(on.search_selected.read_text())["coefficients"]
    final_on, final_off = (pd.read_csv(run.search / "final.csv").set_index("model") for run in (on, off))
    pd.testing.assert_frame_equal(final_off.drop(columns="weak_fitness"), final_on.drop(columns="weak_fitness"))
    references = ["base", "expert:polarity", "expert:aspect3", "expert:intensity"]
    assert final_off.loc[references, "weak_fitness"].isna().all()
    merges = final_on.drop(index=references)
    expected = spearman(merges["weak_fitness"].tolist(), merges["mean"].tolist())
    assert json.loads(off.search_report.read_text())["weak_vs_gold_spearman"]["final_table"] == pytest.approx(expected)
    capsys.readouterr()
    assert main(["inspect", str(off.root)]) == 0
    assert f"weak fitness vs gold dev mean, Spearman over these models: {expected:.3f}" in capsys.readouterr().out


def test_init_outside_the_bounds_is_rejected():
    from sentimerge.merge.config import SearchConfig

    with pytest.raises(ValueError, match="init 2.0 is outside bounds"):
        SearchConfig(init="auto", init_grid=[0.5, 2.0], bounds=(0.0, 1.5))


def test_the_evolved_merge_is_chosen_on_a_held_out_weak_set(tmp_path, cache_dir):
    cfg = tiny_search(tmp_path, cache_dir, select={"top": 3, "per_task": 8})
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    for task in ("polarity", "aspect3", "intensity"):
        weak = {row["id"] for row in read_jsonl(run.search_weak(task))}
        held_out = read_jsonl(run.search_select_weak(task))
        assert len(held_out) == 8 and not weak & {row["id"] for row in held_out}
    rows = read_jsonl(run.search_candidates)
    top = sorted(rows, key=lambda row: -row["fitness"])[:3]
    selection = read_jsonl(run.search_selection)
    assert [row["name"] for row in selection] == [f"gen {r['generation']} cand {r['index']}" for r in top] + ["start"]
    assert [row["fitness"] for row in selection[:3]] == [row["fitness"] for row in top]
    assert selection[-1]["coefficients"] == json.loads(run.search_baselines.read_text())["uniform"]["coefficients"]
    chosen = max(selection, key=lambda row: row["select_fitness"])
    selected = json.loads(run.search_selected.read_text())
    assert selected["name"] == chosen["name"] and selected["selected_by"] == "held-out weak set"
    final = pd.read_csv(run.search / "final.csv").set_index("model")
    assert final.loc["evolved", "weak_fitness"] == pytest.approx(chosen["fitness"])
    report = json.loads(run.search_report.read_text())
    assert report["selection"]["held_out_fitness"] == chosen["select_fitness"]
    assert len(report["selection"]["candidates"]) == 4


def test_a_killed_selection_resumes_to_the_same_choice(tmp_path, cache_dir):
    cfg = tiny_search(tmp_path, cache_dir, select={"top": 3, "per_task": 8}, generations=2)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    selection, selected = read_jsonl(run.search_selection), json.loads(run.search_selected.read_text())
    final = pd.read_csv(run.search / "final.csv")
    # as if killed after the second re-scored candidate: the finished stage's later files never written
    for path in (run.search_selected, run.search / "final.csv", run.search / "DONE.json", run.search_report):
        path.unlink()
    write_jsonl_atomic(run.search_selection, selection[:2])
    search.main(cfg)
    assert without_timing(read_jsonl(run.search_selection)) == without_timing(selection)
    assert json.loads(run.search_selected.read_text())["name"] == selected["name"]
    pd.testing.assert_frame_equal(pd.read_csv(run.search / "final.csv"), final)


@pytest.mark.parametrize("why", ["top 0", "no rows left"])
def test_without_selection_the_evolved_merge_is_the_best_on_the_weak_set(tmp_path, cache_dir, why, caplog):
    cfg = tiny_search(tmp_path, cache_dir, select={"top": 0} if why == "top 0" else {}, generations=2)
    run = RunDir(cfg.resolved_run_dir)
    if why == "no rows left":  # the experts trained on all but 6 rows of each task: the weak set takes those
        for task in ("polarity", "aspect3", "intensity"):
            write_json_atomic(run.expert(task) / "train_ids.json",
                              [row["id"] for row in load_prepared(run, task, "train")[6:]])
    search.main(cfg)
    assert not run.search_selection.exists() and not (run.search / "weak-select").exists()
    selected = json.loads(run.search_selected.read_text())
    assert selected["coefficients"] == json.loads(run.search_best.read_text())["coefficients"]
    assert selected["selected_by"] == "weak fitness"
    assert ("no train rows left for a held-out set of polarity, aspect3, intensity" in caplog.text) == \
        (why == "no rows left")


def test_a_merge_already_scored_is_not_scored_again(tmp_path, cache_dir, monkeypatch):
    """The evolved merge that kept its start is the uniform baseline: the final table copies its row instead of
    scoring the same model again, and the selection takes the start's weak fitness from the baseline."""
    from sentimerge.merge.engine import InMemoryMerge
    from sentimerge.merge.methods import get_method
    from sentimerge.pipeline.core.candidates import load_search_inputs

    cfg = tiny_search(tmp_path, cache_dir, select={"top": 2, "per_task": 8}, generations=1)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg)
    baselines = json.loads(run.search_baselines.read_text())
    assert read_jsonl(run.search_selection)[-1]["fitness"] == baselines["uniform"]["fitness"]

    model, tokenizer, adapters, genome = load_search_inputs(cfg, run)
    mergers = {name: InMemoryMerge(model, adapters, genome, get_method(name)) for name in ("task_arithmetic", "ties")}
    calls = []
    score = search._gold_score
    monkeypatch.setattr(search, "_gold_score", lambda *args: calls.append(args) or score(*args))
    run.search_final_table("dev").unlink()
    start = {"coefficients": baselines["uniform"]["coefficients"], "fitness": baselines["uniform"]["fitness"]}
    table = search._final_table(run, cfg, model, tokenizer, mergers, start, baselines).set_index("model")
    assert len(calls) == len(table) - 1  # base, 3 experts, uniform, ties; the evolved row is uniform's
    pd.testing.assert_series_equal(table.loc["evolved"], table.loc["uniform"], check_names=False)
