"""Evaluation of a model on tasks: the table a user reads and the files it leaves."""

from __future__ import annotations

import pandas as pd

from pipeline import evaluate
from pipeline.rundir import RunDir, is_done, read_jsonl


def test_evaluate_base_writes_tables_and_predictions(prepared_tiny):
    table = evaluate.main(prepared_tiny, model="base")
    folder = RunDir(prepared_tiny.resolved_run_dir).evaluation("base-dev")
    assert is_done(folder)
    on_disk = pd.read_csv(folder / "metrics.csv")
    assert list(on_disk["task"]) == ["polarity", "aspect3", "intensity", "mean"]
    assert on_disk.loc[on_disk.task == "polarity", "n"].item() == 12
    assert 0.0 <= on_disk.loc[on_disk.task == "aspect3", "accuracy"].item() <= 1.0
    assert on_disk["primary"].iloc[-1] == table["primary"].iloc[:-1].mean()
    rows = read_jsonl(folder / "predictions" / "intensity.jsonl")
    assert len(rows) == 12 and all(-3.0 <= row["prediction"] <= 3.0 for row in rows)
    assert (folder / "metrics.md").read_text().startswith("| task |")
