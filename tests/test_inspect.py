"""`sentimerge inspect RUN`: the search's story on stdout and its plots on disk."""

from __future__ import annotations

from sentimerge.pipeline import search
from sentimerge.pipeline.cli import main as cli
from sentimerge.pipeline.core.rundir import RunDir
from tests.test_search import tiny_search

PNG = b"\x89PNG\r\n\x1a\n"


def test_inspect_prints_the_story_and_writes_plots(tmp_path, cache_dir, capsys):
    cfg = tiny_search(tmp_path, cache_dir, generations=2, population=3)
    run = RunDir(cfg.resolved_run_dir)
    search.main(cfg, max_evaluations=4)
    assert cli(["inspect", str(run.root)]) == 0
    unfinished = capsys.readouterr().out
    assert "unfinished" in unfinished and "4 candidates" in unfinished
    search.main(cfg)
    capsys.readouterr()
    assert cli(["inspect", str(run.root)]) == 0
    out = capsys.readouterr().out
    for section in ("finished; 6 candidates", "generations:", "coefficients (layer groups by experts)", "held-out selection",
                    "| layers | polarity | aspect3 | intensity |", "| 0-0 attention |", "baselines on the weak set",
                    "| uniform |", "| ties |", "gold dev", "| evolved |", "Spearman", "where the time went",
                    "search_scoring", "examples/s", "paired bootstrap interval", "P(evolved better)"):
        assert section in out, section
    for name in ("fitness.png", "coefficients.png"):
        assert (run.search_plots / name).read_bytes()[:8] == PNG


def test_inspect_without_a_search_is_a_one_line_error(tmp_path, capsys):
    assert cli(["inspect", str(tmp_path)]) == 2
    assert "no search to inspect" in capsys.readouterr().err
