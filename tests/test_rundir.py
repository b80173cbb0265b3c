"""The artifact layer: atomic folders, manifests, and the run directory's lock."""

from __future__ import annotations

import pytest

from sentimerge.pipeline.cli import main
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, fresh_dir, is_done, read_manifest, run_lock, write_manifest


def test_fresh_dir_leaves_nothing_when_the_block_fails(tmp_path):
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with fresh_dir(final) as folder:
            (folder / "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_a_finished_folder_is_only_replaced_when_asked(tmp_path):
    final = tmp_path / "stage"
    with fresh_dir(final) as folder:
        (folder / "a.txt").write_text("first")
        write_manifest(folder, stage="x")
    assert is_done(final) and read_manifest(final)["stage"] == "x"
    with pytest.raises(SentimergeError, match="already finished"):
        with fresh_dir(final):
            pass
    assert (final / "a.txt").read_text() == "first"
    with fresh_dir(final, overwrite=True) as folder:
        (folder / "a.txt").write_text("second")
    assert (final / "a.txt").read_text() == "second" and not is_done(final)


def test_corrupted_manifest_is_named(tmp_path):
    (tmp_path / "DONE.json").write_text("{not json")
    with pytest.raises(SentimergeError, match=r"DONE\.json: corrupted manifest"):
        read_manifest(tmp_path)


def test_a_second_writer_is_refused_naming_the_holder(tiny_config_path, tmp_path, capsys):
    with run_lock(RunDir(tmp_path / "run")):
        assert main(["prepare", str(tiny_config_path)]) == 2
    assert "in use by pid" in capsys.readouterr().err
    assert main(["prepare", str(tiny_config_path)]) == 0


def test_an_append_after_a_crash_mid_append_cuts_the_torn_line_first(tmp_path):
    from sentimerge.pipeline.core.rundir import append_jsonl, read_jsonl

    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"step": 1})
    with open(log, "a") as handle:
        handle.write('{"step": 2, "lo')  # what SIGKILL mid-write leaves
    assert read_jsonl(log) == [{"step": 1}]
    append_jsonl(log, {"step": 2})
    assert log.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
