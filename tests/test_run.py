"""`sentimerge run`: the whole pipeline on the tiny model, then the results table a user reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sentimerge.pipeline.cli import main
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl
from tests.conftest import tiny_rows, write_jsonl, write_tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_run_does_every_stage_and_ends_with_the_results_table(tmp_path, cache_dir, capsys):
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    shutil.copytree(CONFIGS / "data", tmp_path / "data")
    (tmp_path / "tasks").mkdir()
    shutil.copy(CONFIGS / "tasks" / "tiny.yaml", tmp_path / "tasks" / "tiny.yaml")
    for index, task in enumerate(["polarity", "aspect3", "intensity"]):  # a test split: `{split}` finds it
        write_jsonl(tmp_path / "data" / "tiny" / task / "test.jsonl", tiny_rows(task, 9, seed=200 + index))
    config.update(run_dir=str(tmp_path / "run"), cache_dir=str(cache_dir))
    config["search"]["gold"]["final"] = 12  # of 16 dev examples: the final row must be scored on the same 12
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    assert main(["run", str(path)]) == 0
    run = RunDir(tmp_path / "run")
    for folder in [run.prepare, run.search, run.finetune, run.export, *(run.expert(t) for t in ["polarity", "aspect3", "intensity"])]:
        assert is_done(folder), folder
    table = pd.read_csv(run.root / "results.csv")
    models = ["zero-shot base", "each expert on its own task", "uniform task arithmetic", "TIES", "evolved merge",
              "final (dao)"]
    assert list(table["model"]) == models * 2 and list(table["split"]) == ["dev"] * 6 + ["test"] * 6
    assert list(table.columns) == ["split", "model", "polarity", "aspect3", "intensity", "mean"]
    assert table[["polarity", "aspect3", "intensity"]].notna().all().all()
    # every row of a split on the same examples: the search's final tables and the export's evaluation
    for split, count in (("dev", 12), ("test", 9)):
        kept = read_jsonl(run.search_final_predictions_of(split))
        assert {len(row["predictions"]["aspect3"]) for row in kept} == {count}
        assert pd.read_csv(run.export_eval(split)).set_index("task").loc["aspect3", "n"] == count
    assert "## test (it chose nothing)" in (run.search / "final.md").read_text()
    card = (run.export / "README.md").read_text()
    assert "### dev (settings were chosen on it)" in card and "### test (it chose nothing)" in card
    out = capsys.readouterr().out
    assert "| final (dao) |" in out and "seconds per stage" in out and "test: polarity 9" in out

    info = json.loads((run.root / "run.json").read_text())
    assert info["skipped"] == [] and set(info["seconds"]) == {"prepare", "experts", "search", "finetune", "export"}
    assert info["peak_rss_mb"] > 100  # torch alone is more

    # a second run finds every stage finished and rebuilds the same table
    assert main(["run", str(path)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(run.root / "results.csv"), table)
    assert json.loads((run.root / "run.json").read_text())["skipped"] == ["prepare", "experts", "search", "finetune",
                                                                          "export"]
    # and keeps what the first one recorded of the stages it skipped
    again = json.loads((run.root / "run.json").read_text())
    assert again["seconds"] == info["seconds"] and again["peak_rss_mb"] >= info["peak_rss_mb"]

    # a run finished before its test tables existed (an earlier version) gets them, the same, on the next `run`
    for made in (run.search_final_table("test"), run.search_final_predictions_of("test"), run.export_eval("test")):
        made.unlink()
    report = json.loads(run.search_report.read_text())
    assert set(report["gold_test_comparison"]) == {"uniform", "ties"} and len(report["gold_test"]) == 7
    del report["gold_test"], report["gold_test_comparison"]
    run.search_report.write_text(json.dumps(report))
    assert main(["run", str(path)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(run.root / "results.csv"), table)
    assert set(json.loads(run.search_report.read_text())["gold_test_comparison"]) == {"uniform", "ties"}


def test_the_command_line_runs_each_stage_in_a_child_process_and_reports_its_errors(tmp_path, cache_dir):
    """`sentimerge run` from the command line forks a child per stage (`core.isolation`): the same finished run and
    table as in-process, its peak memory is the largest child's, and a stage's error still reaches the user as
    the one-line error of an in-process run."""
    import subprocess
    import sys

    config = write_tiny_config(tmp_path, cache_dir=cache_dir,
                               experts={"steps": 2, "batch_size": 4, "dev_examples": 4},
                               search={"population": 4, "generations": 1, "weak": {"per_task": 4},
                                       "gold": {"per_generation": 0, "final": 4}},
                               finetune={"steps": 2, "dev_examples": 4})
    command = [sys.executable, "-m", "sentimerge", "run", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr
    run = RunDir(tmp_path / "run")
    info = json.loads(run.run_info.read_text())
    assert info["stages_in_child_processes"] is True and info["peak_rss_mb"] > 100 and info["skipped"] == []
    assert all(is_done(folder) for folder in (run.prepare, run.search, run.finetune, run.export))
    assert "| final (dao) |" in done.stdout and "seconds per stage" in done.stdout

    train = tmp_path / "data" / "polarity" / "train.jsonl"  # the data changes: the child's refusal reaches the user
    write_jsonl(train, [{**row, "label": "negative"} for row in read_jsonl(train)])
    refused = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("sentimerge run: error: ")
    assert "the data of polarity/train changed since it was prepared" in refused.stderr


def test_changed_data_is_never_reported_as_done(tmp_path, cache_dir, capsys):
    """Labels swapped in a train file after a finished run: prepare refuses to reuse it; once prepared again, every
    later stage refuses its finished result, naming the flag that redoes it, until each is redone."""
    config = write_tiny_config(tmp_path, cache_dir=cache_dir,
                               experts={"steps": 2, "batch_size": 4, "dev_examples": 4},
                               search={"population": 4, "generations": 1, "weak": {"per_task": 4},
                                       "gold": {"per_generation": 0, "final": 4}},
                               finetune={"steps": 2, "dev_examples": 4})
    assert main(["run", str(config)]) == 0
    run = RunDir(tmp_path / "run")
    train = tmp_path / "data" / "polarity" / "train.jsonl"
    rows = read_jsonl(train)
    write_jsonl(train, [{**row, "label": "negative" if row["label"] == "positive" else "positive"} for row in rows])
    capsys.readouterr()

    prepared = (run.prepare / "DONE.json").read_text()
    assert main(["prepare", str(config)]) == 2
    assert "the data of polarity/train changed since it was prepared" in capsys.readouterr().err
    assert (run.prepare / "DONE.json").read_text() == prepared
    assert main(["prepare", str(config), "--force"]) == 0
    assert read_jsonl(run.data("polarity", "train"))[0]["label"] != rows[0]["label"]

    for flag in ["experts --force --tasks polarity", "search --force", "finetune --force", "export --force"]:
        capsys.readouterr()
        assert main(["run", str(config)]) == 2
        assert f"`sentimerge {flag}`" in capsys.readouterr().err
        command, *options = flag.split()
        if command == "experts":
            options = ["--force"]  # every expert read the prepared data
        assert main([command, str(config), *options]) == 0
    assert main(["run", str(config)]) == 0


def test_a_moved_run_is_finished_where_it_is_now_and_older_runs_keep_their_stage_3(tmp_path, cache_dir, capsys):
    """A finished run moved to another folder: `sentimerge run` there redoes nothing (stage 3 hashed the path of its
    start model, so it refused a moved run as "finished with another config"). A stage 3 finished before its key
    counted the start by its place in the run is still done; another key is still refused."""
    from sentimerge.pipeline import finetune
    from sentimerge.pipeline.core.config import load_config
    from sentimerge.pipeline.core.errors import SentimergeError

    config = write_tiny_config(tmp_path, cache_dir=cache_dir,
                               experts={"steps": 2, "batch_size": 4, "dev_examples": 8, "shared": {"examples": 6}},
                               search={"population": 4, "generations": 1, "weak": {"per_task": 4},
                                       "gold": {"per_generation": 4}},
                               finetune={"steps": 2, "dev_examples": 8})
    assert main(["run", str(config)]) == 0
    shutil.move(tmp_path / "run", tmp_path / "moved")
    run = RunDir(tmp_path / "moved")
    kept = [run.shared, run.expert("polarity"), run.search, run.finetune, run.export]
    for folder in kept:
        (folder / "marker").write_text("a folder trained again loses it")
    assert main(["run", str(config), "--run-dir", str(run.root)]) == 0
    assert [folder for folder in kept if not (folder / "marker").is_file()] == []

    cfg = load_config(config, run_dir=str(run.root))
    start, order = finetune.start_model_path(cfg, run), finetune.task_order(cfg, run)
    manifest_path = run.finetune / "DONE.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["fingerprint"] == finetune.fingerprint(cfg, start, order)
    for key, done in ((finetune.fingerprint(cfg, start, order, legacy=True), True), ("another config", False)):
        manifest_path.write_text(json.dumps({**manifest, "fingerprint": key}))
        if done:
            assert finetune.main(cfg)["fingerprint"] == key and (run.finetune / "marker").is_file()
        else:
            with pytest.raises(SentimergeError, match="finished with another config"):
                finetune.main(cfg)


def test_final_tables_on_the_test_split_alone_and_dev_added_later_without_redoing_a_stage(tmp_path, cache_dir,
                                                                                          capsys):
    """`search.gold.splits: [test]` (the demo's: its dev tables cost a minute): a data set without a test split is
    refused right after prepare, before any training; with one, every final table (search, export, results) is on
    test alone, `sentimerge report` refuses with the setting's name, and asking for dev later scores the same
    finished models on it, redoing no stage."""
    config = write_tiny_config(tmp_path, cache_dir=cache_dir,
                               experts={"steps": 2, "batch_size": 4, "dev_examples": 4},
                               search={"population": 4, "generations": 1, "weak": {"per_task": 4},
                                       "gold": {"per_generation": 0, "final": 4, "splits": ["test"]}},
                               finetune={"steps": 2, "dev_examples": 4})
    run = RunDir(tmp_path / "run")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "search.gold.splits: task polarity has no prepared test split" in err
    assert is_done(run.prepare) and not run.expert("polarity").exists()  # nothing trained

    for index, task in enumerate(["polarity", "aspect3", "intensity"]):
        write_jsonl(tmp_path / "data" / task / "test.jsonl", tiny_rows(task, 6, seed=300 + index))
    assert main(["prepare", str(config), "--force"]) == 0
    assert main(["run", str(config)]) == 0
    table = pd.read_csv(run.root / "results.csv")
    assert set(table["split"]) == {"test"} and len(table) == 6
    assert not run.search_final_table("dev").exists() and not run.export_eval("dev").exists()
    assert pd.read_csv(run.export_eval("test")).set_index("task").loc["aspect3", "n"] == 4
    report = json.loads(run.search_report.read_text())
    assert "gold_dev" not in report and set(report["gold_test_comparison"]) == {"uniform", "ties"}
    assert json.loads((run.export / "DONE.json").read_text())["mean_primary_split"] == "test"
    assert "## test (it chose nothing)" in (run.search / "final.md").read_text()
    assert "## dev" not in (run.search / "final.md").read_text()
    capsys.readouterr()
    assert main(["inspect", str(run.root)]) == 0
    shown = capsys.readouterr().out
    assert "gold test (primary metric" in shown and "weak fitness vs gold test mean" in shown and "gold dev" not in shown

    capsys.readouterr()
    assert main(["report", str(config)]) == 2
    assert "search.gold.splits ['test'] leaves it out; add dev" in capsys.readouterr().err

    finished = {folder: (folder / "DONE.json").read_text() for folder in (run.search, run.finetune, run.export)}
    raw = yaml.safe_load(config.read_text())
    del raw["search"]["gold"]["splits"]  # the default: dev, and test where every task has one
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["run", str(config)]) == 0
    again = pd.read_csv(run.root / "results.csv")
    assert list(again["split"]) == ["dev"] * 6 + ["test"] * 6
    pd.testing.assert_frame_equal(again[again["split"] == "test"].reset_index(drop=True), table)
    assert {folder: (folder / "DONE.json").read_text() for folder in finished} == finished
    assert set(json.loads(run.search_report.read_text())["gold_dev_comparison"]) == {"uniform", "ties"}


def test_gold_splits_are_each_named_once():
    from pydantic import ValidationError

    from sentimerge.merge.config import GoldConfig

    assert GoldConfig(splits=["test", "dev"]).splits == ("dev", "test")
    with pytest.raises(ValidationError, match="each split once"):
        GoldConfig(splits=["test", "test"])
    with pytest.raises(ValidationError):
        GoldConfig(splits=["train"])
