"""The Python API (`import sentimerge`): the README's example runs as written, and each function keeps its contract."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

import sentimerge
from sentimerge.pipeline.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README: no ```python block after <!-- api-example -->"
    return match.group(1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """The README's example, run as written from a copy of the repository's configs (its run: runs/tiny)."""
    folder = tmp_path_factory.mktemp("api")
    shutil.copytree(ROOT / "configs", folder / "configs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("SENTIMERGE_CACHE", str(cache_dir))
        exec(compile(readme_example(), "README.md", "exec"), {})
    return folder


def test_readme_example_runs_as_written(tiny_run, capsys):
    assert (tiny_run / "runs" / "tiny" / "export" / "DONE.json").is_file()


def test_search_log_is_one_row_per_logged_candidate(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    log = sentimerge.search_log("runs/tiny")
    lines = (tiny_run / "runs" / "tiny" / "search" / "candidates.jsonl").read_text().splitlines()
    assert len(log) == len(lines) == 8  # 2 generations of 4
    assert list(log["generation"]) == [json.loads(line)["generation"] for line in lines]
    assert {"fitness", "status", "coefficients", "weak/polarity", "weak/aspect3", "weak/intensity"} <= set(log)
    assert pd.api.types.is_float_dtype(log["fitness"]) and log["coefficients"].map(len).nunique() == 1
    same = sentimerge.search_log(sentimerge.load_config("configs/tiny.yaml"))  # a config finds its run
    pd.testing.assert_frame_equal(log, same)


def test_predict_gives_what_the_cli_prints(tiny_run, monkeypatch, capsys):
    monkeypatch.chdir(tiny_run)
    folder = sentimerge.export_dir(sentimerge.load_config("configs/tiny.yaml"))
    model = sentimerge.load_model(folder)
    texts = ["a gripping, moving film", "dull and far too long", "fine"]
    table = model.predict(texts, task="polarity", batch_size=2)
    labels = model.tasks["polarity"].labels
    assert list(table["text"]) == texts
    assert list(table.columns) == ["text", "label", "probability", "tie", *(f"p({label})" for label in labels)]
    probs = table[[f"p({label})" for label in labels]].to_numpy()
    assert probs.sum(axis=1) == pytest.approx(1.0, abs=1e-3)
    assert (table["probability"] == probs.max(axis=1)).all()
    capsys.readouterr()
    assert cli(["predict", "--model", str(folder), "--task", "polarity", *texts]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["label"] for row in printed] == list(table["label"])
    rating = model.predict("fine", task="intensity")
    assert len(rating) == 1 and "score" in rating and rating["score"].between(-4, 4).all()


def test_predict_refuses_bad_input_by_name(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    model = sentimerge.load_model(sentimerge.export_dir(sentimerge.load_config("configs/tiny.yaml")))
    with pytest.raises(sentimerge.SentimergeError, match="no task 'polarty' .*did you mean 'polarity'"):
        model.predict(["x"], task="polarty")
    with pytest.raises(sentimerge.SentimergeError, match="needs an aspect"):
        model.predict(["the screen is great"], task="aspect3")
    with pytest.raises(sentimerge.SentimergeError, match="2 texts but 1 aspects"):
        model.predict(["a", "b"], task="aspect3", aspects=["screen"])


def test_run_stage_and_export_dir_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    with pytest.raises(sentimerge.SentimergeError, match="unknown stage 'serch'.*did you mean 'search'"):
        sentimerge.run_stage("serch", "configs/tiny.yaml")
    with pytest.raises(sentimerge.SentimergeError, match="not exported yet"):
        sentimerge.export_dir("configs/tiny.yaml")
    with pytest.raises(sentimerge.SentimergeError, match="no search log"):
        sentimerge.search_log("configs/tiny.yaml")


def test_validate_raises_a_config_error_naming_the_key(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    bad = tmp_path / "configs" / "bad.yaml"
    bad.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("seed: 0", "sede: 0"))
    with pytest.raises(sentimerge.ConfigError, match="sede"):
        sentimerge.validate(bad)


def test_predict_refuses_non_finite_scores_naming_the_model(tiny_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tiny_run)
    broken = tmp_path / "broken"
    shutil.copytree(sentimerge.export_dir(sentimerge.load_config("configs/tiny.yaml")), broken)
    weights = next(broken.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(key for key in tensors if key.endswith("down_proj.weight"))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(sentimerge.ModelError, match=rf"{broken}: task polarity: .*not finite"):
        sentimerge.load_model(broken).predict(["a fine film"], task="polarity")
