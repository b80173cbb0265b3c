"""The bad-input suite: each case is rejected with exit status 2 and one error line that names the file and the key
or line, leaves no partial output behind and overwrites nothing that existed.

Cases cover configs, tasks files, data rows, model directories, adapter folders, corrupted logs and manifests, and a
full disk (simulated by a read-only run directory). Cases that need a finished run corrupt a copy of one tiny run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sentimerge.pipeline.cli import main
from tests.conftest import write_tiny_config


@dataclass
class Workspace:
    root: Path
    config: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def edit(self, change: Callable[[dict], None], path: Path | None = None) -> Path:
        path = path or self.config
        config = yaml.safe_load(path.read_text())
        change(config)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def append(self, relative: str, line: str) -> None:
        with open(self.root / relative, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def _set(*keys, value):
    def change(config):
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
        node[keys[-1]] = value
    return change


def _task(index: int, **changes):
    return lambda config: config["tasks"][index].update(changes)


def _tasks_file(ws: Workspace, change) -> None:
    """Move the tasks into a tasks file, then corrupt that file."""
    config = yaml.safe_load(ws.config.read_text())
    tasks = {"tasks": config.pop("tasks")}
    change(tasks)
    (ws.root / "tasks.yaml").write_text(yaml.safe_dump(tasks, sort_keys=False))
    config["tasks"] = "tasks.yaml"
    ws.config.write_text(yaml.safe_dump(config, sort_keys=False))


def _model_dir(ws: Workspace, files: dict[str, str]) -> str:
    folder = ws.root / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


def _corrupt(path: Path, text: str = "{not json") -> None:
    path.write_text(text)


def _break_line(path: Path, number: int) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = lines[number - 1][: len(lines[number - 1]) // 2]
    path.write_text("\n".join(lines) + "\n")


def _unfinish(folder: Path) -> None:
    (folder / "DONE.json").unlink()


CONFIG = "config.yaml"
# name -> (set-up on the workspace returning extra argv or None, command, regex the error line must match)
CASES: dict[str, tuple[Callable[[Workspace], list[str] | None], str, str]] = {
    # --- configs
    "config: malformed YAML": (lambda ws: ws.config.write_text("name: [unclosed\n"), "prepare",
                               r"config\.yaml:\d+:\d+: invalid YAML"),
    "config: not a mapping": (lambda ws: ws.config.write_text("- a\n- b\n"), "prepare",
                              r"config\.yaml: expected a mapping at the top level"),
    "config: empty file": (lambda ws: ws.config.write_text(""), "prepare", r"config\.yaml: expected a mapping"),
    "config: file missing": (lambda ws: ws.config.unlink(), "prepare", r"config\.yaml: file not found"),
    "config: unknown top-level key": (lambda ws: ws.edit(_set("seeed", value=1)), "prepare",
                                      r"config\.yaml: seeed: .*did you mean 'seed'"),
    "config: unknown nested key": (lambda ws: ws.edit(_set("experts", "lerning_rate", value=1e-3)), "experts",
                                   r"config\.yaml: experts\.lerning_rate: .*did you mean 'learning_rate'"),
    "config: seed not an integer": (lambda ws: ws.edit(_set("seed", value="abc")), "prepare",
                                    r"config\.yaml: seed: "),
    "config: batch size zero": (lambda ws: ws.edit(_set("experts", "batch_size", value=0)), "experts",
                                r"config\.yaml: experts\.batch_size: "),
    "config: two budgets": (lambda ws: ws.edit(lambda c: c.setdefault("experts", {}).update(steps=4, examples=8)),
                            "experts", r"config\.yaml: experts: .*`examples` or `steps`, not both"),
    "config: unknown merge method": (lambda ws: ws.edit(_set("search", "method", value="slerp")), "search",
                                     r"config\.yaml: search\.method: "),
    "config: reversed bounds": (lambda ws: ws.edit(_set("search", "bounds", value=[1.5, 0.0])), "search",
                                r"config\.yaml: search: bounds must be \[low, high\] with low < high"),
    "config: polarity outside [-1, 1]": (lambda ws: ws.edit(_set("search", "weak", "label_polarity",
                                                                 value={"bullish": 2})), "search",
                                         r"config\.yaml: search\.weak\.label_polarity: .*must lie in \[-1, 1\]: bullish"),
    "config: unknown weighting": (lambda ws: ws.edit(_set("finetune", "weighting", "name", value="magic")), "finetune",
                                  r"config\.yaml: finetune\.weighting: unknown loss weighting 'magic'"),
    "config: unknown pacing": (lambda ws: ws.edit(_set("experts", "curriculum", "pacing", value="fast")), "experts",
                               r"config\.yaml: experts\.curriculum\.pacing: "),
    "config: two base model sources": (lambda ws: ws.edit(_set("base_model", "path", value="/x")), "prepare",
                                       r"config\.yaml: base_model: "),
    "config: unknown export dtype": (lambda ws: ws.edit(_set("export", "dtype", value="int3")), "export",
                                     r"config\.yaml: export\.dtype: "),
    # --- tasks files
    "tasks: file missing": (lambda ws: ws.edit(_set("tasks", value="no-such-tasks.yaml")), "prepare",
                            r"no-such-tasks\.yaml: file not found"),
    "tasks: unknown kind": (lambda ws: _tasks_file(ws, lambda t: t["tasks"][0].update(kind="sentiment")), "prepare",
                            r"tasks\.yaml: tasks\[0\]\(polarity\)\.kind: "),
    "tasks: duplicate names": (lambda ws: _tasks_file(ws, lambda t: t["tasks"][1].update(name="polarity")), "prepare",
                               r"tasks\.yaml: task names must be unique: \['polarity'\]"),
    "tasks: one label": (lambda ws: ws.edit(_task(0, labels=["positive"])), "prepare",
                         r"config\.yaml: tasks\[0\]\(polarity\): .*at least two"),
    "tasks: regression without range": (lambda ws: ws.edit(lambda c: c["tasks"][2].pop("range")), "prepare",
                                        r"config\.yaml: tasks\[2\]\(intensity\): .*range"),
    "tasks: verbalizer for an unknown label": (lambda ws: ws.edit(_task(0, verbalizers={"mixed": "so-so"})), "prepare",
                                               r"config\.yaml: tasks\[0\]\(polarity\): .*verbalizers for unknown"),
    "tasks: bad name": (lambda ws: ws.edit(_task(0, name="bad name!")), "prepare", r"config\.yaml: tasks\[0\].*name"),
    "tasks: mse as primary metric": (lambda ws: ws.edit(_task(2, primary_metric="mse")), "prepare",
                                     r"config\.yaml: tasks\[2\]\(intensity\): .*primary_metric"),
    "tasks: carve shares": (lambda ws: ws.edit(_task(0, source={"path": "{data_root}/polarity/train.jsonl",
                                                                 "carve": {"train": 0.5, "dev": 0.2}})), "prepare",
                            r"config\.yaml: tasks\[0\]\(polarity\)\.source: .*sum to 1"),
    # --- data rows and files
    "data: missing column": (lambda ws: ws.edit(_task(0, source={"path": "{data_root}/{task}/{split}.jsonl",
                                                                  "columns": {"text": "sentence"}})), "prepare",
                             r"polarity/train\.jsonl: missing column 'sentence'"),
    "data: label outside the set": (lambda ws: ws.append("data/polarity/train.jsonl", '{"text": "meh", "label": "mixed"}'),
                                    "prepare", r"polarity/train\.jsonl:25: label 'mixed' is not one of"),
    "data: empty split": (lambda ws: (ws.data / "aspect3" / "dev.jsonl").write_text(""), "prepare",
                          r"aspect3/dev\.jsonl: file is empty"),
    "data: regression label not a number": (lambda ws: ws.append("data/intensity/dev.jsonl", '{"text": "x", "label": "high"}'),
                                            "prepare", r"intensity/dev\.jsonl:13: regression label 'high' is not a number"),
    "data: regression label out of range": (lambda ws: ws.append("data/intensity/dev.jsonl", '{"text": "x", "label": 9.5}'),
                                            "prepare", r"intensity/dev\.jsonl:13: regression label 9\.5 is outside"),
    "data: malformed JSON line": (lambda ws: ws.append("data/polarity/dev.jsonl", '{"text": "x", "label"'), "prepare",
                                  r"polarity/dev\.jsonl:13: not valid JSON"),
    "data: a line that is not an object": (lambda ws: ws.append("data/polarity/dev.jsonl", '["x", "positive"]'), "prepare",
                                           r"polarity/dev\.jsonl:13: expected a JSON object"),
    "data: empty text": (lambda ws: ws.append("data/polarity/train.jsonl", '{"text": "", "label": "positive"}'), "prepare",
                         r"polarity/train\.jsonl:25: 'text' must be non-empty text"),
    "data: missing aspect": (lambda ws: ws.append("data/aspect3/train.jsonl", '{"text": "ok", "label": "neutral"}'),
                             "prepare", r"aspect3/train\.jsonl:25: 'aspect' must be non-empty text"),
    "data: file missing": (lambda ws: (ws.data / "polarity" / "dev.jsonl").unlink(), "prepare",
                           r"task polarity: data file not found: .*polarity/dev\.jsonl"),
    "data: data root missing": (lambda ws: shutil.rmtree(ws.data), "prepare", r"task polarity: data file not found"),
    # --- model directories and adapter folders
    "base model: a LoRA target that is a typo": (
        lambda ws: ws.edit(_set("experts", "lora", "target_modules", value=["q_prj", "v_proj"])), "prepare",
        r"experts\.lora\.target_modules: no module named 'q_prj' in the base model \(did you mean 'q_proj'\?\)"),
    "config: unknown experts mode": (lambda ws: ws.edit(_set("experts", "mode", value="mixed")), "experts",
                                     r"config\.yaml: experts\.mode: "),
    "config: negative shared adapter budget": (lambda ws: ws.edit(_set("experts", "shared", "examples", value=-1)),
                                               "experts", r"config\.yaml: experts\.shared\.examples: "),
    "config: hybrid start without hybrid experts": (
        lambda ws: ws.edit(_set("search", "init", value="hybrid")), "search",
        r"config\.yaml: .*search\.init hybrid starts from the Hybrid LoRA attention: set experts\.mode: hybrid"),
    "run: hybrid experts for a subset of tasks": (
        lambda ws: (ws.edit(_set("experts", "mode", value="hybrid")), ["--tasks", "polarity"])[1], "experts",
        r"experts\.mode hybrid trains every task's module together: drop --tasks"),
    "run: an embedding as a hybrid LoRA target": (
        lambda ws: ws.edit(lambda c: c.setdefault("experts", {}).update(
            mode="hybrid", lora={"target_modules": ["q_proj", "embed_tokens"]})), "experts",
        r"experts\.lora\.target_modules: 'embed_tokens' is a Embedding, not a linear layer"),
    "base model: an embedding as a LoRA target": (
        lambda ws: ws.edit(_set("finetune", "lora", "target_modules", value=["q_proj", "embed_tokens"])), "prepare",
        r"finetune\.lora\.target_modules: 'embed_tokens' is a Embedding, not a linear layer"),
    "base model: prompts longer than its context": (lambda ws: ws.edit(_task(1, max_text_tokens=4096)), "prepare",
                                                    r"task aspect3: prompts of up to \d+ tokens .* exceed the base "
                                                    r"model's context of 2048 positions; lower max_text_tokens"),
    "model: directory missing": (lambda ws: ["--model", str(ws.root / "nowhere")], "evaluate",
                                 r"nowhere: model directory not found"),
    "model: no config.json": (lambda ws: ["--model", _model_dir(ws, {"notes.txt": "x"})], "evaluate",
                              r"model: not a model directory \(no config\.json or adapter_config\.json\)"),
    "model: corrupted config.json": (lambda ws: ["--model", _model_dir(ws, {"config.json": "{oops"})], "evaluate",
                                     r"model/config\.json: not valid JSON"),
    "model: config.json without model_type": (lambda ws: ["--model", _model_dir(ws, {"config.json": "{}"})], "evaluate",
                                               r"model/config\.json: no `model_type`"),
    "model: no weights": (lambda ws: ["--model", _model_dir(ws, {"config.json": '{"model_type": "llama"}'})], "evaluate",
                          r"model: no weights \(model\.safetensors"),
    "adapter: corrupted adapter_config.json": (lambda ws: ["--model", _model_dir(ws, {"adapter_config.json": "[1,"})],
                                               "evaluate", r"model/adapter_config\.json: not valid JSON"),
    "adapter: base model missing": (
        lambda ws: ["--model", _model_dir(ws, {"adapter_config.json": json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(ws.root / "gone")})})],
        "evaluate", r"model/adapter_config\.json: base model .*gone.* not found"),
    "adapter: no weights": (
        lambda ws: ["--model", _model_dir(ws, {"adapter_config.json": json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(ws.root / "run")})})],
        "evaluate", r"model: no adapter weights \(adapter_model\.safetensors\)"),
    "predict: not an export": (lambda ws: ["--model", str(ws.run / "experts" / "polarity" / "adapter"), "--task",
                                           "polarity", "good"], "predict", r"adapter: not a sentimerge export"),
    "predict: unknown task": (lambda ws: ["--model", str(ws.run / "export"), "--task", "polarty", "good"], "predict",
                              r"export: no task 'polarty'.*did you mean 'polarity'"),
    "predict: malformed input file": (
        lambda ws: (ws.root.joinpath("in.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n'),
                    ["--model", str(ws.run / "export"), "--task", "polarity", "--file", str(ws.root / "in.jsonl")])[1],
        "predict", r"in\.jsonl:2: needs a `text` string"),
    # --- corrupted logs, manifests and checkpoints in a run directory
    "run: corrupted prepare manifest": (lambda ws: _corrupt(ws.run / "prepare" / "DONE.json"), "experts",
                                        r"prepare/DONE\.json: corrupted manifest"),
    "run: corrupted expert manifest": (
        lambda ws: (_unfinish(ws.run / "search"), _corrupt(ws.run / "experts" / "aspect3" / "DONE.json")), "search",
        r"experts/aspect3/DONE\.json: corrupted manifest"),
    "run: corrupted search log line": (
        lambda ws: (_unfinish(ws.run / "search"), _break_line(ws.run / "search" / "candidates.jsonl", 2)),
        "search", r"search/candidates\.jsonl:2: corrupted (log )?line"),
    "run: corrupted expert metrics log": (
        lambda ws: _break_line(_interrupted_expert(ws) / "metrics.jsonl", 1),
        "experts", r"experts/polarity/metrics\.jsonl:1: corrupted line"),
    "run: corrupted checkpoint state": (
        lambda ws: _corrupt(_interrupted_expert(ws) / "checkpoint" / "state.json"),
        "experts", r"experts/polarity/checkpoint/state\.json: corrupted checkpoint"),
    "run: corrupted prepared data": (
        lambda ws: (_unfinish(ws.run / "search"), _break_line(ws.run / "prepare" / "data" / "polarity" / "dev.jsonl", 3)),
        "search", r"prepare/data/polarity/dev\.jsonl:3: corrupted line"),
    "run: prepared model reference missing": (lambda ws: _corrupt(ws.run / "prepare" / "model.json", '{"path": "/gone"}'),
                                              "experts", r"/gone: model directory not found"),
    "run: read-only run directory": (lambda ws: _read_only(ws.run / "export"), "export",
                                      r"run.*: permission denied; nothing finished was lost"),
    "run: full disk during export": (lambda ws: shutil.rmtree(ws.run / "export"), "export",
                                     r"run/\.export\.tmp-\d+/.*: no space left on device; nothing finished was lost"),
}


def _interrupted_expert(ws: Workspace) -> Path:
    """Retrain the polarity expert and interrupt it after its step-2 checkpoint, as a crash would."""
    from sentimerge.pipeline import experts
    from sentimerge.pipeline.core.config import load_config

    def stop(task, step):
        if step == 3:
            raise KeyboardInterrupt

    cfg = load_config(ws.config, run_dir=str(ws.run))
    with pytest.raises(KeyboardInterrupt):
        experts.main(cfg, force=True, tasks=["polarity"], on_step=stop)
    folder = ws.run / "experts" / "polarity"
    assert (folder / "checkpoint" / "state.json").is_file() and not (folder / "DONE.json").exists()
    return folder


def _read_only(folder: Path) -> None:
    shutil.rmtree(folder)
    for path in [folder.parent, *folder.parent.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)


NEEDS_RUN = {name for name in CASES if name.startswith(("run:", "predict:", "adapter: no weights"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> Path:
    """One tiny run with every stage finished, copied by the cases that corrupt a run directory."""
    folder = tmp_path_factory.mktemp("finished")
    config = write_tiny_config(folder, cache_dir=cache_dir, experts={"steps": 4, "batch_size": 4, "dev_examples": 8,
                                                                      "checkpoint_every": 2},
                               search={"population": 4, "generations": 1, "weak": {"per_task": 4},
                                       "gold": {"per_generation": 4}},
                               finetune={"steps": 2, "dev_examples": 8})
    assert main(["run", str(config)]) == 0
    return folder


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_suite_has_at_least_40_cases():
    assert len(CASES) >= 40


def _full_disk(monkeypatch, folder: Path) -> None:
    """Every file opened for writing under `folder` fails as on a full disk (the lock, already there, aside)."""
    import builtins

    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax") and str(file).startswith(str(folder)) and Path(file).name != ".lock":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, cache_dir, finished_run, capsys, monkeypatch):
    set_up, command, message = CASES[case]
    if "read-only" in case and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the full-disk case covers failed writes")
    if case in NEEDS_RUN:
        shutil.copytree(finished_run, tmp_path / "ws")
        root = tmp_path / "ws"
    else:
        root = tmp_path / "ws"
        write_tiny_config(root, cache_dir=cache_dir)
    ws = Workspace(root, root / CONFIG)
    try:
        extra = set_up(ws)
        extra = extra if isinstance(extra, list) else []
        before = _tree(root)
        if "full disk" in case:
            _full_disk(monkeypatch, ws.run)
        if command == "predict":
            argv = [command, *extra]
        elif command == "evaluate" and extra:
            argv = [command, "--tasks", str(ws.config), *extra, "--run-dir", str(ws.run)]
        else:  # the copied config still names the original run directory
            argv = [command, str(ws.config), "--run-dir", str(ws.run), *extra]
        code = main(argv)
        monkeypatch.undo()
        after = _tree(root)
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2, errors
    assert len(errors) == 1, errors
    assert re.search(message, errors[0], flags=re.IGNORECASE), errors[0]
    # run/config.yaml records the resolved config of the last command that started writing (by design)
    changed = sorted(name for name in before if before[name] != after.get(name) and name != "run/config.yaml")
    added = sorted(set(after) - set(before))
    assert not changed, f"existing files changed or removed: {changed}"
    assert not added, f"partial output left behind: {added}"
