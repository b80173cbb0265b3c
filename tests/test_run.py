"""`sentimerge run`: the whole pipeline on the tiny model, then the results table a user reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import yaml

from pipeline.cli import main
from pipeline.rundir import RunDir, is_done

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_run_does_every_stage_and_ends_with_the_results_table(tmp_path, cache_dir, capsys):
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    shutil.copytree(CONFIGS / "data", tmp_path / "data")
    (tmp_path / "tasks").mkdir()
    shutil.copy(CONFIGS / "tasks" / "tiny.yaml", tmp_path / "tasks" / "tiny.yaml")
    config.update(run_dir=str(tmp_path / "run"), cache_dir=str(cache_dir))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    assert main(["run", str(path)]) == 0
    run = RunDir(tmp_path / "run")
    for folder in [run.prepare, run.search, run.finetune, run.export, *(run.expert(t) for t in ["polarity", "aspect3", "intensity"])]:
        assert is_done(folder), folder
    table = pd.read_csv(run.root / "results.csv")
    assert list(table["model"]) == ["zero-shot base", "each expert on its own task", "uniform task arithmetic",
                                    "TIES", "evolved merge", "final (dao)"]
    assert list(table.columns) == ["model", "polarity", "aspect3", "intensity", "mean"]
    assert table[["polarity", "aspect3", "intensity"]].notna().all().all()
    out = capsys.readouterr().out
    assert "| final (dao) |" in out and "seconds per stage" in out

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
