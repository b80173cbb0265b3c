"""Run configs and tasks files: every shipped file validates; bad files get errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import Field

from sentimerge.pipeline.core.config import RunConfig, dump_config, load_config, load_tasks_file
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.rundir import digest
from sentimerge.pipeline.core.tasks import WHEN_SET, Frozen

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {path.name for path in ALL_YAML} >= {"demo.yaml", "suite.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_yaml_validates(path):
    raw = yaml.safe_load(path.read_text())
    if "base_model" in raw:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig) and cfg.tasks
    else:
        assert load_tasks_file(path).tasks


@pytest.mark.parametrize("name", ["demo", "suite"])
def test_shipped_tasks_state_their_primary_metric_and_why(name):
    """Every task of the shipped configs names its primary metric (the tables, the search's fitness and the
    selection all rank by it) with a reason; macro-F1 where accuracy would reward the majority class."""
    text = (CONFIGS / "tasks" / f"{name}.yaml").read_text()
    tasks = load_tasks_file(CONFIGS / "tasks" / f"{name}.yaml").tasks
    stated = [line for line in text.splitlines() if line.strip().startswith("primary_metric:")]
    assert len(stated) == len(tasks) and all("#" in line for line in stated)
    primary = {task.name: task.primary for task in tasks}
    expected = {"demo": {"polarity": "accuracy", "tweets3": "macro_f1", "intensity": "pearson"},
                "suite": {"sst5": "accuracy", "subjectivity": "accuracy", "fin_headlines": "pearson",
                          **{t: "macro_f1" for t in ("tweet_emotion", "tweet_irony", "absa", "fpb", "fin_tweets")}}}
    assert primary == expected[name]


def test_suite_paths_resolve_relative_to_the_config_and_data_root_overrides(tmp_path):
    cfg = load_config(CONFIGS / "suite.yaml")
    assert Path(cfg.data_root).is_absolute() and Path(cfg.data_root).name == "data"
    assert len(cfg.tasks) == 8
    overridden = load_config(CONFIGS / "suite.yaml", data_root=str(tmp_path), run_dir=str(tmp_path / "run"))
    assert overridden.data_root == str(tmp_path)
    assert overridden.resolved_run_dir == tmp_path / "run"


def test_a_split_path_is_resolved_from_the_file_that_names_it_not_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere" / "pol").mkdir(parents=True)  # a folder of the same name where the command runs
    (tmp_path / "project" / "config.yaml").write_text(BASE.replace(
        "source: {path: data.jsonl, carve: {train: 0.5, dev: 0.5}}", 'source: {path: "{task}/{split}.jsonl"}'))
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(tmp_path / "project" / "config.yaml")
    assert cfg.task("pol").source.path == str(tmp_path / "project" / "{task}" / "{split}.jsonl")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
base_model: {tiny: {}}
tasks:
  - name: pol
    kind: classification
    labels: [negative, positive]
    instruction: Is it positive?
    source: {path: data.jsonl, carve: {train: 0.5, dev: 0.5}}
"""


def test_unknown_key_suggests_the_known_one(tmp_path):
    path = _write(tmp_path, BASE.replace("name: pol", "name: pol\n    intruction: typo"))
    with pytest.raises(ConfigError, match=r"tasks\[0\]\(pol\)\.intruction: unknown key \(did you mean 'instruction'\?\)"):
        load_config(path)


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path):
    text = BASE.replace("kind: classification", "kind: sentiment").replace("name: t\n", "name: t\nseed: x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert any("seed:" in line for line in lines)
    assert any("tasks[0](pol).kind:" in line and "classification" in line for line in lines)
    assert all(line.startswith(str(tmp_path / "config.yaml")) for line in lines)


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.yaml:4:\d+: invalid YAML"):
        load_config(_write(tmp_path, "name: t\nbase_model: {tiny: {}}\ntasks: [\n  - : :"))


@pytest.mark.parametrize("change, message", [
    (("labels: [negative, positive]", "labels: [negative]"), "at least two"),
    (("labels: [negative, positive]", "range: [0, 1]"), "needs `labels`"),
    (("base_model: {tiny: {}}", "base_model: {tiny: {}, path: x}"), "exactly one of path, hub, gguf, tiny"),
    (("carve: {train: 0.5, dev: 0.5}", "carve: {train: 0.5, dev: 0.6}"), "sum to 1"),
    (("source: {path: data.jsonl, ", "source: {hub: x, path: data.jsonl, "), "exactly one of path, hub, pypi"),
])
def test_inconsistent_specs_are_rejected(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE.replace(*change)))


@pytest.mark.parametrize("section, value, message", [
    ("seed: -1", None, "config.yaml: seed: Input should be greater than or equal to 0"),
    ("search: {seed: -2}", None, "search.seed: Input should be greater than or equal to 0"),
    ("finetune: {seed: -1}", None, "finetune.seed: Input should be greater than or equal to 0"),
    ("experts: {learning_rate: .inf}", None, "experts.learning_rate: Input should be a finite number"),
    ("search: {failure_penalty: .nan}", None, "search.failure_penalty: Input should be a finite number"),
    ("experts: {curriculum: {signals: {length: .inf}}}", None, "signals.length: Input should be a finite number"),
    (None, "max_examples: {train: 0}", "max_examples.train: Input should be greater than or equal to 1"),
], ids=["seed", "search-seed", "finetune-seed", "inf", "nan", "inf-in-a-mapping", "max-examples"])
def test_numeric_fields_have_their_ranges(tmp_path, section, value, message):
    """Every number of a config has its valid range: negative seeds, inf and nan anywhere, empty samples."""
    text = BASE + (section + "\n" if section else "")
    if value:
        text = text.replace("    instruction: Is it positive?", f"    instruction: Is it positive?\n    {value}")
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_tasks_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(_write(tmp_path, "name: t\nbase_model: {tiny: {}}\ntasks: nope.yaml\n"))


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml"])  # tiny budgets its experts in steps, demo in examples
def test_the_resolved_config_a_run_writes_loads_back_equal(tmp_path, name):
    cfg = load_config(CONFIGS / name)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    again = load_config(path)
    assert again.experts.decisive() == cfg.experts.decisive() and again.tasks == cfg.tasks
    assert again.model_dump(exclude={"experts"}) == cfg.model_dump(exclude={"experts"})


def test_config_is_frozen(tiny_config_path):
    cfg = load_config(tiny_config_path)
    with pytest.raises(Exception):
        cfg.seed = 3


# What stage fingerprints hash of the tiny config's sections (defaults included). A field added to a section changes
# its value here, and every unfinished run made before the field existed would then refuse to resume ("another
# config"): declare the new field with `json_schema_extra=WHEN_SET` (hashed only when set). Change a value here only
# for a change meant to make earlier runs train again.
FINGERPRINTS = {"base_model": "d4aee3965abe2538", "experts": "ad75bbf63e99d28c", "search": "c5c26bfcf2a1775f",
                "finetune": "a333bee5563b02ab", "tasks": "1ac9684f2a71e4b5"}


def test_fields_added_to_a_config_keep_the_fingerprints_of_earlier_runs(tiny_config_path):
    cfg = load_config(tiny_config_path)
    found = {name: digest(getattr(cfg, name).decisive()) for name in FINGERPRINTS if name != "tasks"}
    found["tasks"] = digest([task.decisive() for task in cfg.tasks])
    changed = sorted(name for name in FINGERPRINTS if found[name] != FINGERPRINTS[name])
    assert not changed, (f"fingerprints of {changed} changed: a new field? give it json_schema_extra=WHEN_SET; "
                         f"if meant, update FINGERPRINTS to {found}")


def test_a_when_set_field_is_hashed_only_when_it_differs_from_its_default():
    class Inner(Frozen):
        size: int = 1
        later: float = Field(0.5, json_schema_extra=WHEN_SET)

    class Outer(Frozen):
        inner: Inner = Inner()
        parts: list[Inner] = [Inner()]
        added: str | None = Field(None, json_schema_extra=WHEN_SET)

    assert Outer().decisive() == {"inner": {"size": 1}, "parts": [{"size": 1}]}
    changed = Outer(inner=Inner(later=2.0), parts=[Inner(size=3, later=1.0)], added="x").decisive()
    assert changed == {"inner": {"size": 1, "later": 2.0}, "parts": [{"size": 3, "later": 1.0}], "added": "x"}
