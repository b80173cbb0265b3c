"""`sentimerge report` on the tiny model: the files, the rows, the equal-budget baseline, scores that match the
exported model, retention, resume without retraining, and a bad strategy name refused before anything runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from sentimerge.pipeline import report
from sentimerge.pipeline.cli import main as cli
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, read_manifest
from sentimerge.pipeline.core.upstream import prepared_model_path
from tests.conftest import write_tiny_config

TASKS = ["polarity", "aspect3", "intensity"]
MULTITASK = "multi-task LoRA on base"
LORA = {"r": 4, "alpha": 8}
SECTIONS = {  # seconds on the tiny model; gold.final unset: the whole dev split, as the export scores it
    "experts": {"steps": 2, "batch_size": 4, "dev_examples": 4, "evaluations": 1, "lora": LORA,
                "curriculum": {"pool": 16}},
    "search": {"layer_group_size": 2, "population": 2, "generations": 1, "weak": {"per_task": 4},
               "gold": {"per_generation": 4}, "dtype": "float32"},
    # stage 3 as the demo's default starts it: as the merge (`init: experts`); every baseline trains a fresh LoRA
    "finetune": {"steps": 2, "per_task": 2, "dev_examples": 4, "evaluations": 1, "lora": LORA, "init": "experts"},
    "export": {"dtype": "float32"},
}


@pytest.fixture(scope="module")
def reported(tmp_path_factory, cache_dir):
    """A tiny run and its report with dao (the run's own stage 3) and static, plus the multi-task LoRA."""
    folder = tmp_path_factory.mktemp("report")
    cfg = load_config(write_tiny_config(folder, cache_dir=cache_dir, **SECTIONS))
    table = report.main(cfg, weightings=("dao", "static"), multitask=True)
    return cfg, table


def test_report_writes_its_files_and_compares_every_model(reported):
    cfg, table = reported
    run = RunDir(cfg.resolved_run_dir)
    for name in ("report.md", "report.csv", "report.json", "eval-finetune-dao.csv", "eval-finetune-static.csv",
                 "eval-multitask-base.csv"):
        assert (run.report / name).is_file(), name
    assert list(table["model"]) == ["zero-shot base", "each expert on its own task", "uniform task arithmetic",
                                    "TIES", "evolved merge", "final (dao)", "final (static)", MULTITASK]
    assert list(table.columns) == ["model", *TASKS, "mean", "retention"]
    pd.testing.assert_frame_equal(pd.read_csv(run.report / "report.csv"), table)
    text = (run.report / "report.md").read_text()
    assert "| final (static) |" in text and "MSE vs static" in text and "Spearman" in text
    result = json.loads((run.report / "report.json").read_text())
    assert result["dev_examples"] == {task: 12 for task in TASKS}
    assert set(result["versus_static"]["mse_pct"]) == {"intensity"}
    assert result["versus_static"]["mean_primary_pct"]["static"] == 0.0
    merges = table.set_index("model")["mean"]
    for name, row in (("uniform", "uniform task arithmetic"), ("ties", "TIES")):  # stage 2's paired comparisons
        lead = result["evolved_vs_baselines"][name]["mean"]
        assert lead["difference"] == pytest.approx(merges["evolved merge"] - merges[row], abs=1e-6)
        assert lead["low"] <= lead["high"] and f"- vs {name}: {lead['difference']:+.3f}" in text
    # the run's own stage 3 is reused for its weighting; the other trains under report/
    assert read_manifest(run.finetune)["weighting"] == "dao"
    assert read_manifest(run.report_finetune("static"))["weighting"] == "static"


def test_final_minus_multitask_is_the_difference_of_their_scores_with_an_interval(reported):
    """The row a user decides by: the final model minus the multi-task LoRA on the same examples, per task and in
    the mean, with a paired bootstrap interval; its difference is the difference of the two table rows."""
    cfg, table = reported
    run = RunDir(cfg.resolved_run_dir)
    result = json.loads((run.report / "report.json").read_text())
    entry = result["final_minus_multitask"]["dev"]
    (seed,) = entry["seeds"]
    final, multitask = (table.set_index("model").loc[row] for row in ("final (dao)", MULTITASK))
    assert seed["stage3_seed"] == cfg.seed and set(seed["tasks"]) == set(TASKS)
    assert seed["mean"]["difference"] == pytest.approx(final["mean"] - multitask["mean"], abs=1e-6)
    for task in TASKS:
        summary = seed["tasks"][task]
        assert summary["difference"] == pytest.approx(final[task] - multitask[task], abs=1e-6)
        assert summary["low"] <= summary["difference"] <= summary["high"]
    assert entry["mean_difference"] == pytest.approx(seed["mean"]["difference"]) and entry["sd"] is None
    assert "## Final model minus the multi-task LoRA" in (run.report / "report.md").read_text()
    kept = (run.report / "eval-multitask-base.predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["task"] for line in kept] == TASKS



def test_multitask_lora_starts_from_the_base_model_with_the_pipelines_budget(reported):
    cfg, _ = reported
    run = RunDir(cfg.resolved_run_dir)
    manifest = read_manifest(run.report_multitask)
    experts = 3 * 2 * 4  # tasks x expert steps x batch size
    stage3 = 2 * 2 * 3  # steps x per task x tasks
    assert manifest["start"] == prepared_model_path(run) and manifest["init"] == "fresh"
    assert read_manifest(run.finetune)["init"] == "experts"
    assert manifest["weighting"] == "static"
    assert manifest["examples"] == experts + stage3 and manifest["steps"] == (experts + stage3) // (2 * 3)
    assert json.loads((run.report / "report.json").read_text())["budgets"]["multitask_examples"] == experts + stage3


def test_final_row_is_the_exported_models_score_and_the_right_adapter_was_scored(reported):
    cfg, table = reported
    run = RunDir(cfg.resolved_run_dir)
    exported = pd.read_csv(run.export / "eval.csv")  # the export scored the whole dev split, as the report does
    row = table.set_index("model").loc["final (dao)"]
    for task in TASKS:
        assert row[task] == pytest.approx(exported.set_index("task").loc[task, "primary"], rel=1e-12)
    columns = ["task", "n", "accuracy", "macro_f1", "mse", "pearson", "primary"]
    dao = pd.read_csv(run.report_eval("finetune-dao"))
    pd.testing.assert_frame_equal(dao[columns], exported[columns], rtol=1e-12)
    static = pd.read_csv(run.report_eval("finetune-static"))
    assert (static["mse"] - dao["mse"]).abs().max() > 1e-6  # another adapter would not have passed


def test_retention_is_each_rows_mean_ratio_to_the_experts(reported):
    cfg, table = reported
    rows = table.set_index("model")
    expert = rows.loc["each expert on its own task", TASKS]
    result = json.loads((RunDir(cfg.resolved_run_dir).report / "report.json").read_text())
    for model in ["uniform task arithmetic", "TIES", "evolved merge", "final (dao)", "final (static)", MULTITASK]:
        expected = sum(rows.loc[model, task] for task in TASKS) / sum(expert[task] for task in TASKS)
        assert rows.loc[model, "retention"] == pytest.approx(expected)
        assert result["retention"][model]["of_means"] == pytest.approx(expected)
        assert result["retention"][model]["tasks"]["polarity"] == pytest.approx(rows.loc[model, "polarity"] /
                                                                               expert["polarity"])
    assert rows[["retention"]].loc[["zero-shot base", "each expert on its own task"]].isna().all().all()


def test_a_second_report_neither_retrains_nor_rescores(reported):
    cfg, table = reported
    run = RunDir(cfg.resolved_run_dir)
    folders = [run.finetune, run.report_finetune("static"), run.report_multitask]
    finished = [read_manifest(folder)["finished_at"] for folder in folders]
    scored = {path: path.stat().st_mtime_ns for path in run.report.glob("eval-*.csv")}
    again = report.main(cfg, weightings=("dao", "static"), multitask=True)
    pd.testing.assert_frame_equal(again, table)
    assert [read_manifest(folder)["finished_at"] for folder in folders] == finished
    assert {path: path.stat().st_mtime_ns for path in scored} == scored


def test_an_unknown_weighting_is_one_line_before_anything_runs(tmp_path, cache_dir, capsys):
    path = write_tiny_config(tmp_path, cache_dir=cache_dir, **SECTIONS)
    with pytest.raises(SentimergeError, match="'stattic'") as error:
        report.main(load_config(path), weightings=("dao", "stattic"))
    assert "\n" not in str(error.value) and "did you mean 'static'" in str(error.value)
    assert cli(["report", str(path), "--weightings", "dao,bogus"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "'bogus'" in errors[0]
    assert not (tmp_path / "run").exists()  # nothing was prepared or trained


def test_more_stage3_seeds_add_a_table_across_them(reported):
    cfg, table = reported
    run = RunDir(cfg.resolved_run_dir)
    again = report.main(cfg, weightings=("dao", "static"), multitask=False, seeds=2)
    # table (a) keeps the run's seed; the seed-1 variants train under report/ with finetune.seed 1
    pd.testing.assert_frame_equal(again, table[table["model"] != MULTITASK].reset_index(drop=True))
    for name in ("dao", "static"):
        folder = run.report / f"finetune-{name}-seed1"
        assert read_manifest(folder)["weighting"] == name
        assert yaml.safe_load((folder / "config.yaml").read_text())["seed"] == 1
    result = json.loads((run.report / "report.json").read_text())
    assert result["seeds"]["count"] == 2
    across = pd.DataFrame(result["seeds"]["table"]).set_index("model")
    means = table.set_index("model")["mean"]
    for label in ("final (dao)", "final (static)"):
        assert across.loc[label, "seed 0"] == pytest.approx(means[label])
        assert across.loc[label, "mean"] == pytest.approx((across.loc[label, "seed 0"] + across.loc[label, "seed 1"]) / 2)
    assert across.loc["final (static)", "minus static"] == 0 and across.loc["final (static)", "ahead of static"] == "0 of 2"
    gaps = across.loc["final (dao)", ["seed 0", "seed 1"]].to_numpy() - across.loc["final (static)", ["seed 0", "seed 1"]].to_numpy()
    assert across.loc["final (dao)", "minus static"] == pytest.approx(gaps.mean())
    assert "## Across stage 3 seeds" in (run.report / "report.md").read_text()
    with pytest.raises(SentimergeError, match="--seeds must be at least 1"):
        report.main(cfg, seeds=0)


def test_a_stage3_variant_is_compared_with_the_run_and_with_the_multitask_lora_without_retraining_it(reported):
    """benchmarks/stage3_ablation.py --against-multitask: the run's own stage 3 and a variant, each against the
    report's multi-task LoRA (reused, not trained again) with the differences of the report's own rows."""
    from benchmarks.stage3_ablation import compare_run

    cfg, table = reported
    run = RunDir(cfg.resolved_run_dir)
    trained = read_manifest(run.report_multitask)["finished_at"]
    rows = compare_run(run.root, [("lr", {"learning_rate": 1e-3})], against_multitask=True)
    assert read_manifest(run.report_multitask)["finished_at"] == trained
    pairs = {(row["variant"], row["reference"]): row for row in rows if row["split"] == "dev"}
    assert set(pairs) == {("final (lr)", "final (dao)"), ("final (dao)", MULTITASK), ("final (lr)", MULTITASK)}
    means = table.set_index("model")["mean"]
    own = pairs[("final (dao)", MULTITASK)]
    assert own["value"] == pytest.approx(means["final (dao)"], abs=1e-6)
    assert own["difference"] == pytest.approx(means["final (dao)"] - means[MULTITASK], abs=1e-6)
    variant = pairs[("final (lr)", MULTITASK)]
    assert variant["difference"] == pytest.approx(variant["value"] - means[MULTITASK], abs=1e-6)
    assert pairs[("final (lr)", "final (dao)")]["difference"] == pytest.approx(
        variant["value"] - own["value"], abs=1e-6)
    trained_with = yaml.safe_load((run.report / "ablation-lr" / "config.yaml").read_text())
    assert trained_with["finetune"]["learning_rate"] == 1e-3


def test_stage3_ablation_seeds_train_every_variant_with_that_seed_and_pool_them_under_one_label(reported):
    """benchmarks/stage3_ablation.py --seeds: each variant, the reference included, trains with finetune.seed s into
    ablation-<name>-seed<s> (the weighting grid's folders) and keeps the label of its name, so that the summary pools
    the seeds of a variant; the run's own stage 3 cannot be the reference of another seed."""
    from benchmarks.stage3_ablation import compare_run

    cfg, _ = reported
    run = RunDir(cfg.resolved_run_dir)
    rows = compare_run(run.root, [("ref", {}), ("lr", {"learning_rate": 1e-3})], reference_name="ref", stage3_seed=1)
    for name in ("ref", "lr"):
        trained_with = yaml.safe_load((run.report / f"ablation-{name}-seed1" / "config.yaml").read_text())
        assert trained_with["finetune"]["seed"] == 1
    assert trained_with["finetune"]["learning_rate"] == 1e-3
    assert {(row["variant"], row["reference"], row["seed"]) for row in rows} == {("final (lr)", "final (ref)", 1)}
    with pytest.raises(ValueError, match="need --reference"):
        compare_run(run.root, [("lr", {"learning_rate": 1e-3})], stage3_seed=1)


def test_a_sharing_variants_relative_data_root_is_taken_from_the_working_directory(tmp_path, cache_dir,
                                                                                  monkeypatch):
    """benchmarks/sharing.py: `data_root=runs/x` means the folder under the directory the benchmark runs in, also
    when the run's own config.yaml is read back from its run folder."""
    from benchmarks.sharing import variant_config

    cfg = load_config(write_tiny_config(tmp_path, cache_dir=cache_dir))
    monkeypatch.chdir(tmp_path)
    variant = variant_config(cfg, {"data_root": "halves/data", "finetune.steps": 3}, seed=2,
                             run_dir=tmp_path / "runs" / "v" / "seed2")
    assert variant.data_root == str(tmp_path / "halves" / "data")
    assert variant.seed == 2 and variant.finetune.steps == 3 and variant.resolved_data_seed == cfg.resolved_data_seed


def test_a_sharing_variant_that_changes_only_later_stages_starts_from_the_earlier_variants_experts(tmp_path,
                                                                                                  cache_dir):
    """benchmarks/sharing.py: a variant changing only stage 2 or 3 gets the earlier run's prepared data and experts,
    which the experts stage then finds finished (nothing trains again); a variant changing stage 1 gets nothing."""
    from benchmarks.sharing import reuse_stage1, stage1_key, variant_config
    from sentimerge.pipeline import experts, prepare

    cfg = load_config(write_tiny_config(tmp_path, cache_dir=cache_dir, experts=SECTIONS["experts"]))
    prepare.main(cfg)
    trained = experts.main(cfg)
    earlier = RunDir(cfg.resolved_run_dir)
    done = {stage1_key(cfg): earlier}
    search_only = variant_config(cfg, {"search.init": 0.5, "finetune.steps": 1}, seed=cfg.seed,
                                 run_dir=tmp_path / "search_only")
    other_experts = variant_config(cfg, {"experts.learning_rate": 5e-3}, seed=cfg.seed,
                                   run_dir=tmp_path / "other_experts")
    assert stage1_key(search_only) == stage1_key(cfg) != stage1_key(other_experts)
    for variant in (search_only, other_experts):
        reuse_stage1(RunDir(variant.resolved_run_dir), variant, done)
    assert not (tmp_path / "other_experts").exists()
    before = {task: read_manifest(folder) for task, folder in trained.items()}
    folders = experts.main(search_only)  # finished and fingerprint-checked: returned as they are, nothing retrained
    assert {task: read_manifest(folder) for task, folder in folders.items()} == before
    assert all(folder.is_relative_to(tmp_path / "search_only") for folder in folders.values())


def test_sharing_results_keep_the_variants_of_earlier_invocations_and_replace_a_variant_run_again(tmp_path,
                                                                                                   monkeypatch):
    """benchmarks/sharing.py: a second invocation adds its variants to sharing_<name>.json; one it runs again
    replaces that variant's rows (per seed, per task, per model), the others stay as they were."""
    from benchmarks import sharing

    monkeypatch.setattr(sharing, "RESULTS", tmp_path)

    def tables(variants: dict[str, float]):
        rows = pd.DataFrame([{"variant": name, "seed": seed, "split": "dev", "final": value + seed / 100,
                              "multitask": 0.8, "difference": value + seed / 100 - 0.8, "low": None, "high": None,
                              "evolved": 0.7, "experts": 0.7, "expert_share": 0.6, "examples": 96,
                              "multitask_steps": 16} for name, value in variants.items() for seed in (0, 1)])
        tasks = pd.DataFrame([{"variant": row["variant"], "seed": row["seed"], "split": "dev", "task": "t",
                               "final": row["final"], "multitask": 0.8, "evolved": 0.7} for _, row in rows.iterrows()])
        models = pd.DataFrame([{"variant": row["variant"], "seed": row["seed"], "split": "dev", "model": "final (dao)",
                                "mean": row["final"]} for _, row in rows.iterrows()])
        return rows, tasks, models

    sharing.write_results("x", "first", *tables({"a": 0.70, "b": 0.75}))
    summary = sharing.write_results("x", "second", *tables({"b": 0.90, "c": 0.85}))
    written = json.loads((tmp_path / "sharing_x.json").read_text())
    assert written["commands"] == ["first", "second"]
    finals = summary.set_index("variant")["final"]
    assert finals.to_dict() == pytest.approx({"a": 0.705, "b": 0.905, "c": 0.855})
    for key in ("rows", "tasks", "models"):
        by_variant = pd.DataFrame(written[key]).groupby("variant")["final" if key != "models" else "mean"].mean()
        assert by_variant.to_dict() == pytest.approx({"a": 0.705, "b": 0.905, "c": 0.855}), key
    assert "`first`" in (tmp_path / "sharing_x.md").read_text()


def test_a_moved_run_is_scored_on_its_own_shared_adapter_not_the_path_its_manifest_recorded(tmp_path, cache_dir):
    """A finished run copied elsewhere, its original deleted: the report scores its final model on the copy's base +
    shared adapter. It used to load the start model from the path the finetune manifest recorded (a relative
    `runs/demo/shared/model` names whatever is there in the working directory, or nothing)."""
    import shutil

    from sentimerge.pipeline import export, finetune, prepare, search
    from sentimerge.pipeline import experts as stage1
    from sentimerge.pipeline.core.evaluation import final_examples

    sections = {**SECTIONS, "experts": {**SECTIONS["experts"], "shared": {"examples": 6}}}
    cfg = load_config(write_tiny_config(tmp_path / "first", cache_dir=cache_dir, **sections))
    for stage in (prepare, stage1, search, finetune):
        stage.main(cfg)
    original = RunDir(cfg.resolved_run_dir)
    assert read_manifest(original.finetune)["start"] == str(original.shared / "model")
    moved = tmp_path / "moved"
    shutil.copytree(original.root, moved)
    examples = final_examples(original, cfg, "dev")
    before = report.evaluate_variant(report.weighting_variant(cfg, original, "dao"), original, examples,
                                     force=True)
    shutil.rmtree(original.root)
    copied = load_config(moved / "config.yaml", run_dir=str(moved))
    run = RunDir(copied.resolved_run_dir)
    loaded = []
    merged_model = export.merged_model
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "merged_model",
                      lambda start, *a, **k: loaded.append(start) or merged_model(start, *a, **k))
        after = report.evaluate_variant(report.weighting_variant(copied, run, "dao"), run, examples, force=True)
    assert loaded == [str(run.shared / "model")]
    assert after[1] == before[1]  # the same predictions, example by example


def test_paired_runs_pairs_final_models_on_the_same_examples_and_names_a_run_without_scores(reported, tmp_path):
    """benchmarks/paired_runs.py: a run against itself differs by exactly zero with the run's own mean beside it; a
    run whose final model was never scored is a one-line exit naming the missing file."""
    from benchmarks import paired_runs

    cfg, table = reported
    run = RunDir(cfg.resolved_run_dir)
    (row,) = paired_runs.compare(run.root, run.root)
    assert (row["split"], row["difference"], row["low"], row["high"]) == ("dev", 0.0, 0.0, 0.0)
    assert row["a_mean"] == pytest.approx(table.set_index("model").loc["final (dao)", "mean"])
    # stage 2's rows, from the search's final-table predictions: the same means as its final table
    rows = paired_runs.compare(run.root, run.root, ("evolved", "uniform"))
    assert [(row["model"], row["difference"]) for row in rows] == [("final", 0.0), ("evolved", 0.0), ("uniform", 0.0)]
    searched = pd.read_csv(run.search / "final.csv").set_index("model")["mean"]
    for row in rows[1:]:
        assert row["a_mean"] == pytest.approx(searched[row["model"]], abs=1e-6)
    # another scored model of the run by its key: the multi-task LoRA against the run's own final model
    (other,) = paired_runs.compare(run.root, run.root, keys=("multitask-base", None))
    assert other["a_mean"] == pytest.approx(table.set_index("model").loc[MULTITASK, "mean"])
    assert other["difference"] == pytest.approx(other["a_mean"] - other["b_mean"], abs=1e-6)
    with pytest.raises(SystemExit, match="no final-table row 'nope'"):
        paired_runs.compare(run.root, run.root, ("nope",))
    empty = tmp_path / "unscored"
    empty.mkdir()
    (empty / "config.yaml").write_text((run.root / "config.yaml").read_text())
    with pytest.raises(SystemExit, match="eval-finetune-dao.predictions.jsonl: no scored final model"):
        paired_runs.final_predictions(empty, "dev")
