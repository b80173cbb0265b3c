"""The CLI: bad input gets one clear line naming the file and key or line, exit status 2, before any model loads."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sentimerge.pipeline.cli import COMMANDS, MODULES, main
from sentimerge.pipeline.core.rundir import RunDir, is_done


def _edit_config(path: Path, edit) -> Path:
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _set_kind(config):
    config["tasks"][0]["kind"] = "sentiment"


def _missing_column(config):
    config["tasks"][0]["source"]["columns"] = {"text": "sentence"}


BAD_INPUTS = {
    "malformed config": (lambda cfg_path, data: cfg_path.write_text("name: [unclosed\n"), r"config\.yaml:\d+:\d+: invalid YAML"),
    "unknown task kind": (lambda cfg_path, data: _edit_config(cfg_path, _set_kind), r"tasks\[0\]\(polarity\)\.kind: "),
    "missing column": (lambda cfg_path, data: _edit_config(cfg_path, _missing_column), r"polarity/train\.jsonl: missing column 'sentence'"),
    "label outside the label set": (lambda cfg_path, data: _append_row(data / "polarity" / "train.jsonl", {"text": "meh", "label": "mixed"}),
                                    r"polarity/train\.jsonl:25: label 'mixed' is not one of"),
    "empty split": (lambda cfg_path, data: (data / "aspect3" / "dev.jsonl").write_text(""), r"aspect3/dev\.jsonl: file is empty"),
    "regression label not a number": (lambda cfg_path, data: _append_row(data / "intensity" / "dev.jsonl", {"text": "so so", "label": "high"}),
                                      r"intensity/dev\.jsonl:13: regression label 'high' is not a number"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_is_built(case, tiny_config_path, tmp_path, capsys):
    cache = tmp_path / "fresh-cache"
    _edit_config(tiny_config_path, lambda config: config.update(cache_dir=str(cache)))
    corrupt, message = BAD_INPUTS[case]
    corrupt(tiny_config_path, tmp_path / "data")
    code = main(["prepare", str(tiny_config_path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2
    assert len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert not (cache / "models").exists(), "no model may be built before the input is validated"
    assert not is_done(RunDir(tmp_path / "run").prepare)


def test_unreachable_model_path_is_named(prepared_tiny, tmp_path, capsys):
    code = main(["evaluate", "--tasks", str(tmp_path / "config.yaml"), "--model", str(tmp_path / "no-such-model"),
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert f"{tmp_path / 'no-such-model'}: model directory not found" in capsys.readouterr().err


def test_validate_checks_without_running(tiny_config_path, capsys):
    assert main(["validate", str(tiny_config_path)]) == 0
    out = capsys.readouterr().out
    assert "config ok" in out and "polarity: classification, 2 labels; train 24, dev 12" in out
    assert not (tiny_config_path.parent / "run").exists()


def test_validate_checks_a_local_base_model_without_loading_its_weights(prepared_tiny, tmp_path, capsys):
    from sentimerge.pipeline.core.rundir import RunDir
    from sentimerge.pipeline.core.upstream import prepared_model_path

    model_dir = prepared_model_path(RunDir(prepared_tiny.resolved_run_dir))
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["base_model"] = {"path": model_dir}
    config["experts"] = {"lora": {"target_modules": ["q_prj", "v_proj"]}}
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 2
    assert "no module named 'q_prj' in the base model (did you mean 'q_proj'?)" in capsys.readouterr().err
    config["experts"]["lora"]["target_modules"] = ["q_proj", "v_proj"]
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 0
    assert "LoRA targets and context ok" in capsys.readouterr().out


def test_prepare_refuses_a_run_dir_prepared_with_another_config(prepared_tiny, tiny_config_path, capsys):
    assert main(["prepare", str(tiny_config_path)]) == 0  # unchanged: skipped
    _edit_config(tiny_config_path, lambda config: config.update(seed=1))
    assert main(["prepare", str(tiny_config_path)]) == 2
    assert "prepared with a different config" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_runs_as_a_module(command, monkeypatch, capsys):
    module = MODULES.get(command, command)
    monkeypatch.setattr(sys, "argv", [f"pipeline/{module}.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(f"sentimerge.pipeline.{module}", run_name="__main__", alter_sys=True)
    assert exited.value.code == 0
    assert f"usage: sentimerge {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "sentimerge"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("sentimerge ")


def test_python_m_sentimerge_is_the_cli():
    result = subprocess.run([sys.executable, "-m", "sentimerge", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("sentimerge ")


def test_the_cli_caps_the_kernel_cache_unless_the_user_set_it(monkeypatch):
    """oneDNN reads ONEDNN_PRIMITIVE_CACHE_CAPACITY at its first kernel: the CLI sets 64 first, a user's value stays."""
    import os

    from sentimerge.pipeline.core.runtime import KERNEL_CACHE_CAPACITY

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert main(["inspect", "/nonexistent-run"]) == 2
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == KERNEL_CACHE_CAPACITY
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert main(["inspect", "/nonexistent-run"]) == 2
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"


def test_logging_follows_stderr_after_the_stream_it_started_with_is_closed(monkeypatch):
    """A run started under one stderr (a test's capture, a notebook's redirect) that is then closed and replaced logs
    to the new one; before, every later record printed "--- Logging error --- ... I/O operation on closed file"."""
    import io
    import logging

    from sentimerge.pipeline.core.runtime import setup_logging

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    logging.getLogger("sentimerge").info("into the first")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("sentimerge").info("into the second")
    assert second.getvalue() == "[sentimerge] into the second\n"


def test_logging_prints_sentimerge_info_and_only_the_warnings_of_other_libraries(monkeypatch):
    """A fresh machine's first plot made matplotlib log "generated new fontManager" at INFO into the demo's output."""
    import io
    import logging

    from sentimerge.pipeline.core.runtime import setup_logging

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging()
    logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
    logging.getLogger("sentimerge.experts").info("expert polarity: done")
    logging.getLogger("sentimerge").debug("a detail")
    logging.getLogger("some.library").warning("a real warning")
    assert stream.getvalue() == "[sentimerge] expert polarity: done\n[sentimerge] a real warning\n"
    setup_logging(verbose=True)
    logging.getLogger("sentimerge").debug("a detail")
    logging.getLogger("some.library").info("chatter")
    assert stream.getvalue().endswith("[sentimerge] a real warning\n[sentimerge] a detail\n")
