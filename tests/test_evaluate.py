"""Evaluation of a model on tasks: the table a user reads and the files it leaves."""

from __future__ import annotations

import pandas as pd

from sentimerge.pipeline import evaluate
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl


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


def test_an_adapter_folder_evaluates_like_the_merged_model_in_memory(prepared_tiny, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from sentimerge.pipeline.core.models import load_model
    from sentimerge.pipeline.core.scoring import score_task
    from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path

    run = RunDir(prepared_tiny.resolved_run_dir)
    base, tokenizer = load_model(prepared_model_path(run), dtype="float32")
    task = prepared_tiny.task("aspect3")
    examples = load_prepared(run, "aspect3", "dev")
    base_scores = score_task(base, tokenizer, task, examples).logprobs
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # a non-trivial adapter
    model.save_pretrained(tmp_path / "adapter")
    in_memory = score_task(model.eval(), tokenizer, task, examples).logprobs
    assert (in_memory - base_scores).abs().max() > 1e-2, "the adapter must change the scores"

    loaded, _ = load_model(str(tmp_path / "adapter"), dtype="float32")
    from_disk = score_task(loaded, tokenizer, task, examples).logprobs
    torch.testing.assert_close(from_disk, in_memory, atol=1e-4, rtol=1e-4)

    table = evaluate.main(prepared_tiny, model=str(tmp_path / "adapter"))
    assert table.loc[table.task == "aspect3", "n"].item() == 12
    assert is_done(run.evaluation("adapter-dev"))
