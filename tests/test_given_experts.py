"""Experts given instead of trained (`experts.given`): peft adapters of every shape peft makes and full checkpoints
read to their closed forms, merged in memory exactly as mergekit merges them, mixed with trained experts in a run,
and every incompatibility refused in one line, exit status 2, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sentimerge.merge.engine import InMemoryMerge
from sentimerge.merge.genome import Genome
from sentimerge.merge.lora import DenseDelta, LoraFactors, read_adapter, read_checkpoint
from sentimerge.merge.methods import get_method
from sentimerge.merge.recipe import build_recipe, lora_reference, run_mergekit
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_manifest
from sentimerge.pipeline.core.upstream import prepared_model_path
from tests.conftest import write_tiny_config

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def base_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_adapter(base: str, folder: Path, *, seed: int = 0, **lora):
    """A peft LoRA adapter on `base` with seeded random non-zero A and B, saved to `folder`; the peft model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora})
    model = get_peft_model(base_model(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft's random B is tiny; make deltas comparable to the weights
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    return model


def fine_tuned_checkpoint(base: str, folder: Path, *, seed: int = 1, vocabulary: int | None = None) -> dict:
    """A full checkpoint of `base` whose attention, norms and embeddings moved (what full fine-tuning changes)."""
    from transformers import AutoTokenizer

    model = base_model(base)
    generator = torch.Generator().manual_seed(seed)
    changed = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
               "model.layers.1.input_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight"]
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in changed:
            params[name].add_(torch.randn(params[name].shape, generator=generator) * 0.05)
    if vocabulary:
        model.resize_token_embeddings(vocabulary)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return {name: params[name].detach().clone() for name in changed}


@pytest.fixture
def base_path(prepared_tiny) -> str:
    return prepared_model_path(RunDir(prepared_tiny.resolved_run_dir))


@pytest.mark.parametrize("lora", [
    {"r": 2, "target_modules": ["q_proj", "v_proj"]},
    {"r": 8, "lora_alpha": 4, "use_rslora": True},
    {"rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 3}},
    {"layers_to_transform": [1], "target_modules": ["k_proj", "up_proj"]},
], ids=["rank2-attention", "rslora", "rank-and-alpha-patterns", "one-layer"])
def test_an_adapter_reads_to_the_weights_peft_merges(base_path, tmp_path, lora):
    model = peft_adapter(base_path, tmp_path / "adapter", **lora)
    deltas = read_adapter(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    base = base_model(base_path).state_dict()
    assert deltas and all(isinstance(delta, LoraFactors) for delta in deltas.values())
    for name, value in base.items():
        expected = value + deltas[name].delta() if name in deltas else value
        assert torch.allclose(merged[name], expected, atol=1e-5), name
    assert sum(not torch.equal(merged[name], base[name]) for name in base) == len(deltas)


def test_fan_in_fan_out_factors_are_the_transpose(base_path, tmp_path):
    """peft's fan_in_fan_out (GPT-2's Conv1D stores weights [in, out]): B A is the transpose of the delta."""
    from safetensors.torch import load_file, save_file

    peft_adapter(base_path, tmp_path / "plain", r=3)
    plain = read_adapter(tmp_path / "plain")
    tensors = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    swapped = {}
    for key, value in tensors.items():  # B' = A^T, A' = B^T: B' A' = (B A)^T
        other = key.replace(".lora_A.", ".lora_X.").replace(".lora_B.", ".lora_A.").replace(".lora_X.", ".lora_B.")
        swapped[other] = value.T.contiguous()
    (tmp_path / "fan").mkdir()
    save_file(swapped, str(tmp_path / "fan" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    (tmp_path / "fan" / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    transposed = read_adapter(tmp_path / "fan")
    assert set(transposed) == set(plain)
    for name, delta in plain.items():
        assert transposed[name].shape == delta.shape
        assert torch.allclose(transposed[name].delta(), delta.delta(), atol=1e-6), name


def test_a_checkpoint_reads_to_its_task_vector_and_ties_its_embeddings(base_path, tmp_path):
    moved = fine_tuned_checkpoint(base_path, tmp_path / "ckpt")
    deltas = read_checkpoint(tmp_path / "ckpt", Path(base_path))
    base = dict(base_model(base_path).named_parameters())
    assert set(deltas) == set(moved)  # unchanged tensors are not deltas
    for name, value in moved.items():
        assert isinstance(deltas[name], DenseDelta)
        assert torch.equal(deltas[name].value, value - base[name].detach())


def mixed_experts(base_path: str, tmp_path: Path) -> dict[str, Path]:
    """Three experts of different kinds: rsLoRA of rank 2 on attention, rank 6 with an alpha pattern on the MLP, and
    a full checkpoint."""
    peft_adapter(base_path, tmp_path / "a", seed=3, r=2, use_rslora=True, target_modules=["q_proj", "v_proj"])
    peft_adapter(base_path, tmp_path / "b", seed=4, r=6, alpha_pattern={"down_proj": 2},
                 target_modules=["gate_proj", "down_proj", "q_proj"])
    fine_tuned_checkpoint(base_path, tmp_path / "c")
    return {"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c"}


@pytest.mark.parametrize("method,split", [("task_arithmetic", True), ("ties", False)])
def test_adapters_of_other_ranks_and_a_checkpoint_merge_as_mergekit_merges_them(base_path, tmp_path, method,
                                                                                  split):
    from safetensors.torch import load_file

    folders = mixed_experts(base_path, tmp_path)
    experts = {"a": read_adapter(folders["a"]), "b": read_adapter(folders["b"]),
               "c": read_checkpoint(folders["c"], Path(base_path))}
    model = base_model(base_path)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    genome = Genome(tuple(experts), model.config.num_hidden_layers, 1, split)
    merger = InMemoryMerge(model, experts, genome, get_method(method), density=0.5)
    candidate = np.random.default_rng(5).uniform(0.3, 1.3, genome.size)
    references = {"a": lora_reference(base_path, str(folders["a"])), "b": lora_reference(base_path, str(folders["b"])),
                  "c": str(folders["c"])}
    recipe = build_recipe(base_path, references, genome, candidate, get_method(method), density=0.5,
                          out_dtype="float32")
    run_mergekit(recipe, tmp_path / "out", cache=tmp_path / "cache")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = merger.merged_state(candidate)
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"} <= set(expected)
    for name, value in expected.items():
        assert torch.allclose(merged[name], value, atol=1e-5), name
    assert all(torch.equal(merged[name], base[name]) for name in base if name not in expected)
    if "lm_head.weight" in merged:  # tied in the base: still one tensor
        assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


GIVEN_SETTINGS = {"experts": {"steps": 2, "batch_size": 4, "dev_examples": 8, "checkpoint_every": 1},
                  "search": {"population": 4, "generations": 2, "weak": {"per_task": 4}, "gold": {"final": 6},
                             "layer_group_size": 1}}


def given_config(folder: Path, cache_dir: Path, given: dict, **sections) -> Path:
    return write_tiny_config(folder, cache_dir=cache_dir,
                             experts={**GIVEN_SETTINGS["experts"], "given": given, **sections.pop("experts", {})},
                             search={**GIVEN_SETTINGS["search"], **sections.pop("search", {})}, **sections)


def test_a_run_mixes_given_and_trained_experts(base_path, prepared_tiny, tmp_path, cache_dir):
    from sentimerge.pipeline import experts, prepare, report, search

    folders = mixed_experts(base_path, tmp_path / "given")
    names = [task.name for task in prepared_tiny.tasks]
    cfg = load_config(given_config(tmp_path / "mixed", cache_dir, {names[0]: {"path": str(folders["a"])},
                                                                   names[1]: {"checkpoint": str(folders["c"])}}))
    prepare.main(cfg)
    experts.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    assert read_manifest(run.expert(names[0]))["given"]["kind"] == "adapter"
    assert (run.expert_adapter(names[0]) / "adapter_model.safetensors").read_bytes() == \
        (folders["a"] / "adapter_model.safetensors").read_bytes()
    assert read_manifest(run.expert(names[1]))["given"]["kind"] == "checkpoint"
    assert not run.expert_adapter(names[1]).exists()
    assert "steps" in read_manifest(run.expert(names[2]))  # trained
    assert report.budgets(cfg)["experts_examples"] == 8 and report.budgets(cfg)["given_experts"] == sorted(names[:2])
    search.main(cfg)
    recipe = yaml.safe_load(run.search_recipe.read_text())
    references = [model["model"] for model in recipe["models"][1:]]
    assert references[1] == str(folders["c"].resolve()) and references[0].endswith(f"+{run.expert_adapter(names[0])}")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run.search_merged)  # written by mergekit from the recipe
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    experts.main(cfg)  # unchanged: nothing to do
    # a given adapter whose files changed is refused until --force installs it again
    peft_adapter(base_path, folders["a"], seed=9, r=2, use_rslora=True, target_modules=["q_proj", "v_proj"])
    with pytest.raises(Exception, match="--force --tasks"):
        experts.main(cfg)
    experts.main(cfg, force=True, tasks=[names[0]])
    assert (run.expert_adapter(names[0]) / "adapter_model.safetensors").read_bytes() == \
        (folders["a"] / "adapter_model.safetensors").read_bytes()


def test_given_experts_are_checked_by_the_config(tmp_path, cache_dir):
    def load(given):
        return load_config(given_config(tmp_path, cache_dir, given))

    with pytest.raises(ConfigError, match="revision"):
        load({"polarity": {"hub": "someone/adapter"}})
    with pytest.raises(ConfigError, match="exactly one of path, hub, checkpoint"):
        load({"polarity": {"path": "a", "checkpoint": "b"}})
    with pytest.raises(ConfigError, match="no task named 'nope'"):
        load({"nope": {"path": "a"}})
    relative = load({"polarity": {"path": "adapters/polarity"}})
    assert relative.experts.given["polarity"].path == str((tmp_path / "adapters" / "polarity").resolve())


def test_a_hub_adapter_that_cannot_be_fetched_is_one_line(tmp_path, monkeypatch):
    """Offline (as here: the real huggingface_hub, no network), the hub source fails with the id and revision."""
    import huggingface_hub.constants

    from sentimerge.experts.config import GivenExpert
    from sentimerge.experts.given import resolve
    from sentimerge.pipeline.core.errors import ModelError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"^hub adapter org/sentiment-lora@v1: cannot download \(") as error:
        resolve(GivenExpert(hub="org/sentiment-lora", revision="v1"), tmp_path)
    assert "\n" not in str(error.value)


def _dora(base: str, folder: Path) -> None:
    peft_adapter(base, folder, use_dora=True)


def _modules_to_save(base: str, folder: Path) -> None:
    peft_adapter(base, folder, modules_to_save=["lm_head"])


def _other_base(base: str, folder: Path) -> None:
    """An adapter of a model with another width: its factors do not fit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    other = folder.parent / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    peft_adapter(str(other), folder)


def _other_base_from_the_hub(base: str, folder: Path) -> None:
    """The same, declaring a hub id as its base (nothing local to compare): the factors' shapes tell."""
    _other_base(base, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))


def _lora_bias_without_base_bias(base: str, folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    peft_adapter(base, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if ".lora_B." in k)
    tensors[key.replace(".weight", ".bias")] = torch.ones(tensors[key].shape[0])
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _missing_weights(base: str, folder: Path) -> None:
    peft_adapter(base, folder)
    (folder / "adapter_model.safetensors").unlink()


def _corrupt_weights(base: str, folder: Path) -> None:
    peft_adapter(base, folder)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("make,kind,message", [
    (_dora, "path", "use_dora"),
    (_modules_to_save, "path", "modules_to_save"),
    (_other_base, "path", "hidden_size 32 (the run's base: 64)"),
    (_other_base_from_the_hub, "path", "the base's model.layers.0.mlp.down_proj.weight takes 128 inputs"),
    (_lora_bias_without_base_bias, "path", "lora_bias"),
    (_missing_weights, "path", "missing adapter_model.safetensors"),
    (_corrupt_weights, "path", "unreadable safetensors"),
    (lambda base, folder: fine_tuned_checkpoint(base, folder, vocabulary=416), "checkpoint",
     "vocab_size 416 (the run's base: 400; a resized vocabulary)"),
], ids=["dora", "modules-to-save", "other-base", "other-base-on-the-hub", "lora-bias", "missing-file", "corrupt-file",
        "resized-vocabulary"])
def test_an_incompatible_given_expert_is_one_line_exit_2_and_nothing_written(base_path, tmp_path, cache_dir, make,
                                                                             kind, message, capsys):
    from sentimerge.pipeline import prepare
    from sentimerge.pipeline.cli import main

    make(base_path, tmp_path / "expert")
    path = given_config(tmp_path / "run", cache_dir, {"polarity": {kind: str(tmp_path / "expert")}})
    prepare.main(load_config(path))
    run = RunDir(load_config(path).resolved_run_dir)
    capsys.readouterr()
    assert main(["experts", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "experts.given.polarity" in err[0] and message in err[0], err
    assert not run.experts.exists() or not any(run.experts.iterdir())  # no expert trained or installed
    assert not is_done(run.expert("polarity"))


def test_a_run_with_given_and_trained_experts_resumes_after_a_kill(base_path, tmp_path, cache_dir):
    from sentimerge.pipeline.killtest import KillHarness

    folders = mixed_experts(base_path, tmp_path / "given")
    config = given_config(tmp_path, cache_dir, {"polarity": {"path": str(folders["b"])},
                                                "aspect3": {"checkpoint": str(folders["c"])}},
                          search={"select": {"top": 2, "per_task": 4}, "gold": {"per_generation": 4}})
    harness = KillHarness(config, tmp_path / "run", tmp_path / "work", stages=("prepare", "experts", "search"),
                          in_process=True)
    harness.prepare_reference()
    trials = list(harness.trials(2, seed=1, modes=("write",), stages=("experts", "search")))
    assert [t.stage for t in trials] == ["experts", "search"] and all(t.killed for t in trials)
    for trial in trials:
        assert trial.ok, (trial.stage, trial.kill_at, trial.differences, trial.stray_files)


def test_merge_only_from_given_experts_and_unlabelled_text(base_path, tmp_path, cache_dir, capsys):
    """What mergekit-evolve users do: given experts, a pool of unlabelled texts per task (no label column; the
    `expert` labeller labels it), `experts` (installs, trains nothing), `search` (the merged model). Stage 3, which
    would train on labels, refuses in one line."""
    from tests.conftest import TINY_TASKS, tiny_rows, write_jsonl

    from sentimerge.pipeline import experts, prepare, search
    from sentimerge.pipeline.cli import main

    for index, task in enumerate(TINY_TASKS):
        peft_adapter(base_path, tmp_path / "adapters" / task["name"], seed=index, r=2)
        rows = [{key: value for key, value in row.items() if key != "label"}
                for row in tiny_rows(task["name"], 24, seed=index)]
        write_jsonl(tmp_path / "pool" / task["name"] / "train.jsonl", rows)
        write_jsonl(tmp_path / "pool" / task["name"] / "dev.jsonl", tiny_rows(task["name"], 12, seed=100 + index))
    tasks = [{**task, "source": {"path": str(tmp_path / "pool" / "{task}" / "{split}.jsonl"),
                                 "unlabelled_train": True}} for task in TINY_TASKS]
    given = {task["name"]: {"path": str(tmp_path / "adapters" / task["name"])} for task in TINY_TASKS}
    path = write_tiny_config(tmp_path / "merge", cache_dir=cache_dir, tasks=tasks,
                             experts={"given": given}, search={**GIVEN_SETTINGS["search"], "weak": {"per_task": 6}})
    cfg = load_config(path)
    prepare.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    report = json.loads((run.prepare / "data_report.json").read_text())["tasks"]["polarity"]["splits"]
    assert report["train"]["unlabelled"] and "labels" in report["dev"]
    experts.main(cfg)
    assert all(read_manifest(run.expert(name))["given"]["kind"] == "adapter" for name in given)
    search.main(cfg)
    weak = [json.loads(line) for line in run.search_weak("polarity").read_text().splitlines()]
    assert weak and all(row["gold"] is None and row["label"] in ("negative", "positive") for row in weak)
    assert is_done(run.search_merged)
    capsys.readouterr()
    assert main(["finetune", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unlabelled" in err[0], err


def test_an_unlabelled_train_split_needs_a_given_expert_and_a_labeller_that_does_not_read_labels(tmp_path, cache_dir):
    from tests.conftest import TINY_TASKS

    tasks = [{**task, "source": {"path": "{data_root}/{task}/{split}.jsonl", "unlabelled_train": task["name"] ==
                                 "polarity"}} for task in TINY_TASKS]
    with pytest.raises(ConfigError, match="task polarity: source.unlabelled_train, but stage 1 would train"):
        load_config(write_tiny_config(tmp_path, cache_dir=cache_dir, tasks=tasks))
    with pytest.raises(ConfigError, match="no gold labels for the weak set"):
        load_config(write_tiny_config(tmp_path, cache_dir=cache_dir, tasks=tasks,
                                      experts={"given": {"polarity": {"path": "x"}}},
                                      search={"weak": {"labellers": {"polarity": "gold"}}}))


def test_an_installed_experts_hash_is_reused_while_its_files_are_unchanged(tmp_path):
    """A 7B checkpoint is not hashed again on every run: the recorded SHA-256 holds while every file keeps its size
    and modification time; any change makes it read the files again."""
    import os

    from sentimerge.experts.given import content_hash, file_stats

    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes(name.encode())
    real = content_hash(folder, "adapter")
    recorded = {"sha256": "recorded", "stats": file_stats(folder, "adapter")}
    assert content_hash(folder, "adapter", recorded) == "recorded"
    (folder / "adapter_model.safetensors").write_bytes(b"changed!")
    assert content_hash(folder, "adapter", recorded) not in ("recorded", real)
    (folder / "adapter_model.safetensors").write_bytes(b"adapter_model.safetensors")
    os.utime(folder / "adapter_model.safetensors", ns=(1, 1))
    assert content_hash(folder, "adapter", recorded) == real
