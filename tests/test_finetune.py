"""Stage 3 (multi-task fine-tuning with dynamic task weights) and the export users take away."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sentimerge.pipeline import export, finetune
from sentimerge.pipeline.cli import main as cli
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl, read_manifest
from sentimerge.pipeline.core.upstream import load_prepared
from tests.conftest import write_tiny_config

FINETUNE = {"start": "base", "steps": 6, "per_task": 2, "checkpoint_every": 2, "dev_examples": 4,
            "evaluations": 1, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}


def _config(folder, cache_dir, **finetune_overrides):
    path = write_tiny_config(folder, cache_dir=cache_dir, finetune={**FINETUNE, **finetune_overrides},
                             export={"dtype": "float32"})
    cfg = load_config(path)
    from sentimerge.pipeline import prepare

    prepare.main(cfg)
    return cfg


class Killed(Exception):
    pass


def test_finetune_logs_the_weights_it_used_and_writes_a_loadable_adapter(tmp_path, cache_dir):
    cfg = _config(tmp_path, cache_dir)
    manifest = finetune.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    rows = [row for row in read_jsonl(run.finetune_metrics) if "weights" in row]
    assert [row["step"] for row in rows] == list(range(1, 7))
    for row in rows:
        assert set(row["weights"]) == {"polarity", "aspect3", "intensity"}
        assert sum(row["weights"].values()) == pytest.approx(3.0, abs=1e-3)
        assert set(row["grad_norm"]) == set(row["task_loss"])  # dao measures every step by default
    assert (run.finetune / "weights.png").stat().st_size > 0
    assert manifest["weighting"] == "dao" and manifest["steps"] == 6
    assert not run.finetune_checkpoint.exists()
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(run.finetune_adapter).r == 4


@pytest.mark.parametrize("weighting", ["static", "famo"])
def test_other_strategies_run_and_static_keeps_weights_fixed(tmp_path, cache_dir, weighting):
    cfg = _config(tmp_path, cache_dir, steps=4, weighting={"name": weighting})
    finetune.main(cfg)
    rows = [row for row in read_jsonl(RunDir(cfg.resolved_run_dir).finetune_metrics) if "weights" in row]
    if weighting == "static":
        assert all(row["weights"] == {"polarity": 1.0, "aspect3": 1.0, "intensity": 1.0} for row in rows)
    else:
        assert rows[-1]["weights"] != rows[0]["weights"]


def test_a_killed_finetune_resumes_to_the_same_adapter_and_log(tmp_path, cache_dir):
    kill_and_resume(tmp_path, cache_dir, kill_at=5, checkpoint=4)


def kill_and_resume(tmp_path, cache_dir, *, kill_at: int, checkpoint: int, **finetune_overrides) -> None:
    """Stage 3 killed before step `kill_at` keeps its checkpoint of step `checkpoint`, and resumed it ends with the
    adapter and log of an uninterrupted run."""
    whole = _config(tmp_path / "whole", cache_dir, **finetune_overrides)
    finetune.main(whole)
    broken = _config(tmp_path / "broken", cache_dir, **finetune_overrides)

    def kill(step):
        if step == kill_at:
            raise Killed()

    with pytest.raises(Killed):
        finetune.main(broken, before_step=kill)
    run = RunDir(broken.resolved_run_dir)
    assert not is_done(run.finetune)
    assert json.loads((run.finetune_checkpoint / "state.json").read_text())["step"] == checkpoint
    finetune.main(broken)
    assert_same_adapter_and_log(RunDir(whole.resolved_run_dir), run)


def assert_same_adapter_and_log(a_run: RunDir, b_run: RunDir) -> None:
    """Two stage 3 runs ended with the same adapter (to float tolerance) and the same metrics log (less timings)."""
    a = load_file(a_run.finetune_adapter / "adapter_model.safetensors")
    b = load_file(b_run.finetune_adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(read_jsonl(a_run.finetune_metrics)) == strip(read_jsonl(b_run.finetune_metrics))


def test_the_training_seed_moves_training_and_defaults_to_the_runs(tmp_path, cache_dir):
    adapters = {}
    for name, seed in (("default", None), ("same", 0), ("other", 1)):
        cfg = _config(tmp_path / name, cache_dir, steps=3, seed=seed)
        assert cfg.seed == 0
        finetune.main(cfg)
        run = RunDir(cfg.resolved_run_dir)
        adapters[name] = load_file(run.finetune_adapter / "adapter_model.safetensors")
    for weight in adapters["default"]:
        assert torch.equal(adapters["default"][weight], adapters["same"][weight])
    assert any(not torch.equal(adapters["default"][w], adapters["other"][w]) for w in adapters["default"])
    # runs trained before the setting existed keep their fingerprint: it is hashed only when set
    assert "seed" not in _config(tmp_path / "x", cache_dir).finetune.decisive()
    assert _config(tmp_path / "y", cache_dir, seed=1).finetune.decisive()["seed"] == 1


def test_finetune_from_the_merge_needs_stage_2(tmp_path, cache_dir):
    cfg = _config(tmp_path, cache_dir, start="merged")
    with pytest.raises(SentimergeError, match="stage 2 has not finished"):
        finetune.main(cfg)


def test_export_loads_with_transformers_alone_and_predicts_like_the_pipeline(tmp_path, cache_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentimerge.pipeline.core.scoring import score_task

    cfg = _config(tmp_path, cache_dir)
    finetune.main(cfg)
    folder = export.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    assert is_done(folder) and read_manifest(folder)["dtype"] == "float32"
    for name in ["README.md", "sentimerge_tasks.yaml", "sentimerge_config.yaml", "provenance.json", "eval.md",
                 "model.safetensors", "tokenizer.json"]:
        assert (folder / name).is_file(), name
    assert "| aspect3 |" in (folder / "README.md").read_text()
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["data"]["polarity"]["splits"]["dev"]["examples"] == 12

    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = AutoModelForCausalLM.from_pretrained(read_manifest(run.finetune)["start"], dtype=torch.float32)
    pipeline_model = PeftModel.from_pretrained(start, run.finetune_adapter).eval()
    task = cfg.task("aspect3")
    examples = load_prepared(run, "aspect3", "dev")
    torch.testing.assert_close(score_task(exported, tokenizer, task, examples).logprobs,
                               score_task(pipeline_model, tokenizer, task, examples).logprobs, atol=1e-4, rtol=1e-4)

    texts = [example["text"] for example in examples[:2]]
    capsys.readouterr()
    assert cli(["predict", "--model", str(folder), "--task", "aspect3", "--aspect", "the hotel", *texts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["text"] for line in lines] == texts
    assert all(line["label"] in task.labels and 0 < line["probability"] <= 1 for line in lines)
    tasks_file = yaml.safe_load((folder / "sentimerge_tasks.yaml").read_text())
    assert [t["name"] for t in tasks_file["tasks"]] == ["polarity", "aspect3", "intensity"]


def test_the_in_memory_bf16_merge_scores_exactly_like_the_reloaded_export(tmp_path, cache_dir):
    """What `report` scores in memory is what users load: RoPE's inv_freq must stay float32 as from_pretrained keeps
    it (a plain `.to(bfloat16)` rounds it and moves the scores)."""
    from sentimerge.pipeline.core.models import load_model
    from sentimerge.pipeline.core.scoring import score_task

    path = write_tiny_config(tmp_path, cache_dir=cache_dir, finetune={**FINETUNE, "steps": 2},
                             export={"dtype": "bfloat16"})
    cfg = load_config(path)
    from sentimerge.pipeline import prepare

    prepare.main(cfg)
    finetune.main(cfg)
    folder = export.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    in_memory = export.merged_model(read_manifest(run.finetune)["start"], run.finetune_adapter, cfg).eval()
    reloaded, tokenizer = load_model(str(folder), dtype="bfloat16")
    assert in_memory.dtype == reloaded.dtype == torch.bfloat16
    assert in_memory.model.rotary_emb.inv_freq.dtype == reloaded.model.rotary_emb.inv_freq.dtype == torch.float32
    for name, value in reloaded.state_dict().items():
        assert torch.equal(in_memory.state_dict()[name], value), name
    examples = load_prepared(run, "polarity", "dev")
    assert torch.equal(score_task(in_memory, tokenizer, cfg.task("polarity"), examples).logprobs,
                       score_task(reloaded, tokenizer, cfg.task("polarity"), examples).logprobs)


def test_predict_rejects_an_unknown_task_and_a_missing_aspect(tmp_path, cache_dir, capsys):
    cfg = _config(tmp_path, cache_dir, steps=2)
    finetune.main(cfg)
    folder = export.main(cfg)
    assert cli(["predict", "--model", str(folder), "--task", "polarty", "fine"]) == 2
    assert "did you mean 'polarity'" in capsys.readouterr().err
    assert cli(["predict", "--model", str(folder), "--task", "aspect3", "fine"]) == 2
    assert "needs an aspect" in capsys.readouterr().err
    # a file saved as "UTF-8 with BOM" (Windows editors): its first JSON line is read as JSON, not as text
    texts = tmp_path / "texts.jsonl"
    texts.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": t}) for t in ["fine", "awful"]).encode())
    capsys.readouterr()
    assert cli(["predict", "--model", str(folder), "--task", "polarity", "--file", str(texts)]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["fine", "awful"]
    # a count below 1 is refused by the argument parser, exit status 2, before anything loads
    with pytest.raises(SystemExit) as exit_status:
        cli(["predict", "--model", str(folder), "--task", "polarity", "--batch-size", "-1", "fine"])
    assert exit_status.value.code == 2
    assert "--batch-size: must be at least 1, got -1" in capsys.readouterr().err


def test_a_model_with_non_finite_weights_is_refused_not_scored(tmp_path, cache_dir, capsys):
    """An export with one weight matrix set to NaN: every answer scores NaN, and argmax used to answer the first
    label (accuracy 0.500, exit 0). Evaluation and prediction fail with one line naming the model."""
    import shutil

    from safetensors.torch import save_file

    cfg = _config(tmp_path, cache_dir, steps=2)
    finetune.main(cfg)
    folder = export.main(cfg)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(key for key in weights if key.endswith("layers.0.mlp.down_proj.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    config = tmp_path / "config.yaml"
    capsys.readouterr()
    assert cli(["evaluate", str(config), "--model", str(broken), "--name", "broken"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(broken) in errors[0] and "are not finite" in errors[0], errors
    assert not RunDir(cfg.resolved_run_dir).evaluation("broken").exists()
    assert cli(["predict", "--model", str(broken), "--task", "polarity", "fine"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "are not finite" in captured.err


def test_loading_an_adapter_prints_no_dependency_warning(tmp_path, cache_dir):
    """peft's constructors read a transformers attribute that transformers 5 deprecates: the one warning a run
    printed for every adapter it loaded is silenced where peft is called (by message, nothing else)."""
    import warnings

    from peft import LoraConfig

    from sentimerge.experts.config import LoraSettings
    from sentimerge.experts.train import load_lora_model
    from sentimerge.pipeline import prepare
    from sentimerge.pipeline.core.config import load_config
    from sentimerge.pipeline.core.models import load_model
    from sentimerge.pipeline.core.rundir import RunDir
    from sentimerge.pipeline.core.upstream import prepared_model_path

    cfg = load_config(write_tiny_config(tmp_path, cache_dir=cache_dir))
    prepare.main(cfg)
    base = prepared_model_path(RunDir(cfg.resolved_run_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model, _ = load_lora_model(base, LoraSettings(r=2, alpha=4), dtype="float32", device=torch.device("cpu"),
                                   seed=0)
        model.save_pretrained(tmp_path / "adapter")
        merged, _ = load_model(str(tmp_path / "adapter"), dtype="float32")
    assert isinstance(LoraConfig.from_pretrained(tmp_path / "adapter"), LoraConfig) and merged is not None
