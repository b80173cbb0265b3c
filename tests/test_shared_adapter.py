"""The shared adapter (`experts.shared`) on the tiny model: trained on every task, merged into the base, under every
expert and stage 2's merges; its examples count in the budget the multi-task LoRA gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sentimerge.pipeline import report
from sentimerge.pipeline.cli import main
from sentimerge.pipeline.core.candidates import load_search_inputs
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl, read_manifest
from sentimerge.pipeline.core.upstream import prepared_model_path
from tests.conftest import write_tiny_config

SECTIONS = {"experts": {"steps": 4, "batch_size": 4, "dev_examples": 8, "shared": {"examples": 24, "per_task": 2}},
            "search": {"population": 4, "generations": 1, "weak": {"per_task": 4}, "gold": {"per_generation": 4}},
            "finetune": {"steps": 2, "dev_examples": 8}}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, cache_dir) -> Path:
    folder = tmp_path_factory.mktemp("shared")
    config = write_tiny_config(folder, cache_dir=cache_dir, **SECTIONS)
    assert main(["run", str(config)]) == 0
    return config


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


def test_the_shared_adapter_trains_on_every_task_and_is_merged_into_the_base(shared_run):
    cfg = load_config(shared_run)
    run = RunDir(cfg.resolved_run_dir)
    manifest = read_manifest(run.shared)
    assert is_done(run.shared) and manifest["steps"] == 4 and manifest["examples"] == 24  # 4 steps x 2 x 3 tasks
    metrics = read_jsonl(run.shared_training / "metrics.jsonl")
    drawn = [row for row in metrics if "task_loss" in row]
    assert manifest["zero_shot"] is None and all(row["step"] > 0 for row in metrics)  # the base: not evaluated here
    assert manifest["dev"] == [row for row in metrics if "dev" in row][-1]["dev"]
    assert len(drawn) == 4 and all(set(row["task_loss"]) == {"polarity", "aspect3", "intensity"} for row in drawn)
    base, shared = _weights(Path(prepared_model_path(run))), _weights(run.shared_model)
    assert base.keys() == shared.keys()
    changed = [k for k in base if not torch.equal(base[k], shared[k])]
    assert changed and all(("proj" in k) for k in changed)  # the LoRA targets moved, nothing else did
    assert (run.shared_model / "tokenizer_config.json").is_file()


def test_experts_and_the_merges_stand_on_base_plus_shared(shared_run):
    cfg = load_config(shared_run)
    run = RunDir(cfg.resolved_run_dir)
    for task in ("polarity", "aspect3", "intensity"):
        trained_on = yaml.safe_load(run.expert_config(task).read_text())["base_model"]
        assert trained_on == str(run.shared_model)
    resident, _, _, _ = load_search_inputs(cfg, run)
    shared = _weights(run.shared_model)
    differ = [k for k, p in resident.state_dict().items() if k in shared and not torch.equal(p, shared[k].to(p.dtype))]
    assert not differ  # the search's resident model (in its dtype) is base + shared
    recipe = yaml.safe_load((run.search_merged / "mergekit_config.yml").read_text())
    assert recipe["base_model"] == str(run.shared_model)
    results = (run.root / "results.md").read_text()
    assert "base + shared adapter" in results and "zero-shot base" not in results
    provenance = yaml.safe_load((run.export / "provenance.json").read_text())
    assert provenance["shared_adapter"]["model"] == str(run.shared_model)
    assert provenance["shared_adapter"]["examples"] == 24


def test_changed_shared_settings_are_refused_not_reused(shared_run, capsys):
    text = shared_run.read_text()
    changed = shared_run.with_name("changed.yaml")
    changed.write_text(text.replace("examples: 24", "examples: 36"))
    assert main(["experts", str(changed)]) == 2
    error = capsys.readouterr().err
    assert "shared adapter finished with other settings" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("shared,experts,finetune", [(0, 6, 5), (24, 4, 2), (30, 5, 7), (7, 1, 1)])
def test_budgets_add_up_to_the_multitask_loras(tmp_path, cache_dir, shared, experts, finetune):
    """Experts + shared adapter + stage 3 = the pipeline's examples; the multi-task LoRA gets them in whole steps."""
    cfg = load_config(write_tiny_config(tmp_path, cache_dir=cache_dir,
                                        experts={"steps": experts, "batch_size": 4, "shared": {"examples": shared}},
                                        finetune={"steps": finetune, "per_task": 2}))
    b = report.budgets(cfg)
    shared_steps = -(-shared // 6)
    assert b["shared_steps"] == shared_steps and b["shared_examples"] == shared_steps * 6
    assert b["experts_examples"] == 3 * experts * 4 and b["finetune_examples"] == finetune * 6
    assert b["pipeline_examples"] == b["experts_examples"] + b["shared_examples"] + b["finetune_examples"]
    assert b["pipeline_examples"] <= b["multitask_examples"] < b["pipeline_examples"] + 6
    assert b["multitask_examples"] == b["multitask_steps"] * 6
    assert b["expert_share"] == pytest.approx(b["experts_examples"] / b["pipeline_examples"], abs=1e-4)


def test_a_crash_after_the_training_does_not_train_it_again(shared_run, tmp_path):
    """Killed between the shared adapter's training and its merge: the next `experts` merges the finished training
    instead of training it again, and ends with the same model."""
    import shutil

    from sentimerge.pipeline import experts

    source = load_config(shared_run)
    shutil.copytree(source.resolved_run_dir, tmp_path / "run")
    cfg = load_config(shared_run, run_dir=str(tmp_path / "run"))
    run = RunDir(cfg.resolved_run_dir)
    before = _weights(run.shared_model)
    metrics = (run.shared_training / "metrics.jsonl").read_bytes()
    (run.shared / "DONE.json").unlink()
    shutil.rmtree(run.shared_model)
    experts.train_shared_adapter(cfg, run)
    assert is_done(run.shared) and (run.shared_training / "metrics.jsonl").read_bytes() == metrics
    after = _weights(run.shared_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_forcing_one_expert_keeps_the_shared_adapter_the_other_experts_stand_on(shared_run, tmp_path):
    """`experts --force --tasks polarity` trains polarity's expert again and nothing else: the shared adapter under
    every expert is kept (training it again would leave the other experts on an adapter that is gone)."""
    import shutil

    source = load_config(shared_run)
    shutil.copytree(source.resolved_run_dir, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    for folder in (run.shared, run.expert("polarity"), run.expert("aspect3")):
        (folder / "marker").write_text("before")  # a replaced folder loses it
    shared_weights = _weights(run.shared_model)
    assert main(["experts", str(shared_run), "--run-dir", str(run.root), "--force", "--tasks", "polarity"]) == 0
    assert (run.shared / "marker").is_file() and (run.expert("aspect3") / "marker").is_file()
    assert all(torch.equal(shared_weights[k], v) for k, v in _weights(run.shared_model).items())
    assert is_done(run.expert("polarity")) and not (run.expert("polarity") / "marker").exists()
