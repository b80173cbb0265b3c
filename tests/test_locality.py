"""`experts.locality` on the tiny model: the KL term against its closed form, what it keeps of the other tasks'
answers, its prompts (other tasks only, labels unread), resume, and the settings it refuses."""

from __future__ import annotations

import pytest
import torch

from sentimerge.experts.config import ExpertsConfig, LoraSettings
from sentimerge.experts.train import load_lora_model, locality_kl
from sentimerge.pipeline import experts, prepare
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.prompts import prompt_ids
from sentimerge.pipeline.core.rundir import RunDir, read_jsonl
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path
from tests.conftest import TINY_TASKS, write_tiny_config
from tests.test_experts import SMALL, one_thread, resumed_like_whole  # noqa: F401 (one_thread: autouse)

CPU = torch.device("cpu")


def prepared(folder, cache_dir, tasks=None, **experts_section):
    cfg = load_config(write_tiny_config(folder, cache_dir=cache_dir, tasks=tasks, experts={**SMALL, **experts_section}))
    prepare.main(cfg)
    return cfg


def other_prompts(cfg, run, tokenizer, task: str) -> list[list[int]]:
    return [prompt_ids(tokenizer, other, row, demonstrations=False)
            for other in cfg.tasks if other.name != task for row in load_prepared(run, other.name, "dev")]


def test_locality_kl_is_the_kl_divergence_from_the_start_model_and_trains_only_the_adapter(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir)
    run = RunDir(cfg.resolved_run_dir)
    model, tokenizer = load_lora_model(prepared_model_path(run), LoraSettings(r=4, alpha=8), dtype="float32",
                                       device=CPU, seed=0)
    prompts = other_prompts(cfg, run, tokenizer, "polarity")[:5]
    assert len({len(ids) for ids in prompts}) > 1  # left padding is exercised
    zero = locality_kl(model, prompts, tokenizer.pad_token_id, CPU, use_autocast=False)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA (B = 0) changes nothing
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    kl = locality_kl(model, prompts, tokenizer.pad_token_id, CPU, use_autocast=False)
    expected = []
    for ids in prompts:  # one unpadded prompt at a time, full logits
        with torch.no_grad():
            with model.disable_adapter():
                p = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            q = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        expected.append((p.exp() * (p - q)).sum())
    assert kl.item() > 1e-3
    torch.testing.assert_close(kl, torch.stack(expected).mean(), rtol=1e-4, atol=1e-6)
    kl.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    assert grads and all("lora_" in name for name in grads)  # the start model's weights get no gradient
    assert any(float(g.abs().sum()) > 0 for g in grads.values())


def test_an_expert_held_to_its_start_keeps_the_other_tasks_answers_closer_and_logs_the_kl(tmp_path, cache_dir):
    """The same expert (polarity, same seed and batches) with and without the term: with it, the next-token
    distributions on the other tasks' dev prompts (never trained on) stay closer to the start model's."""
    kls = {}
    for weight in (0.0, 50.0):
        cfg = prepared(tmp_path / f"w{weight}", cache_dir, learning_rate=2e-2, steps=8,
                       locality={"weight": weight, "per_step": 4, "pool": 8})
        experts.main(cfg, tasks=["polarity"])
        run = RunDir(cfg.resolved_run_dir)
        rows = read_jsonl(run.expert_metrics("polarity"))[1:]
        assert all(("locality_kl" in row) == bool(weight) for row in rows)
        model, tokenizer = load_lora_model(prepared_model_path(run), LoraSettings(r=4, alpha=8), dtype="float32",
                                           device=CPU, seed=0)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(run.expert_adapter("polarity") / "adapter_model.safetensors"))
        with torch.no_grad():
            kls[weight] = locality_kl(model, other_prompts(cfg, run, tokenizer, "polarity"), tokenizer.pad_token_id,
                                      CPU, use_autocast=False).item()
    assert kls[0.0] > 0.01 and kls[50.0] < 0.25 * kls[0.0], kls


def test_locality_prompts_are_the_other_tasks_inputs_only_and_their_labels_are_not_read(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir, locality={"weight": 1.0, "pool": 5})
    run = RunDir(cfg.resolved_run_dir)
    _, tokenizer = load_lora_model(prepared_model_path(run), LoraSettings(r=4, alpha=8), dtype="float32",
                                   device=CPU, seed=0)
    prompts = experts.locality_prompts(cfg, run, cfg.task("polarity"), tokenizer, seed=3)
    assert len(prompts) == 2 * 5  # `pool` of each of the two other tasks
    train = {task: [prompt_ids(tokenizer, cfg.task(task), row, demonstrations=False)
                    for row in load_prepared(run, task, "train")] for task in ("polarity", "aspect3", "intensity")}
    assert all(ids in train["aspect3"] + train["intensity"] and ids not in train["polarity"] for ids in prompts)
    assert prompts == experts.locality_prompts(cfg, run, cfg.task("polarity"), tokenizer, seed=3)  # seeded
    draws = [experts.locality_draw(prompts, 4, seed=3, step=step) for step in range(3)]
    assert draws[0] == experts.locality_draw(prompts, 4, seed=3, step=0) and draws[0] != draws[1]
    assert all(len(draw) == 4 for draw in draws)


def test_an_interrupted_expert_with_locality_resumes_to_the_same_adapter(tmp_path, cache_dir):
    runs = resumed_like_whole(tmp_path, cache_dir, "aspect3", locality={"weight": 1.0, "per_step": 3, "pool": 6})
    logged = [[row["locality_kl"] for row in read_jsonl(run.expert_metrics("aspect3"))[1:]] for run in runs]
    assert logged[1] == pytest.approx(logged[0], rel=1e-4)


def test_locality_is_refused_with_hybrid_lora_and_without_another_task(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="locality"):
        ExpertsConfig.model_validate({"mode": "hybrid", "locality": {"weight": 1.0}})
    alone = [{**TINY_TASKS[0], "source": {"path": "{data_root}/{task}/{split}.jsonl"}}]
    cfg = prepared(tmp_path, cache_dir, tasks=alone, locality={"weight": 1.0})
    with pytest.raises(ConfigError, match="no other task"):
        experts.main(cfg, tasks=["polarity"])
