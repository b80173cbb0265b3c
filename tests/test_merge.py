"""Stage 2's merge: methods against their closed forms, the resident merge, the genome, and mergekit equivalence."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sentimerge.merge.engine import InMemoryMerge, MergeFailed
from sentimerge.merge.genome import Genome
from sentimerge.merge.lora import read_adapter
from sentimerge.merge.methods import METHODS, get_method
from sentimerge.merge.recipe import build_recipe, lora_reference, run_mergekit
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.rundir import RunDir, write_json_atomic, write_manifest
from sentimerge.pipeline.core.upstream import prepared_model_path

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def make_experts(cfg, *, rank: int = 4, targets: list[str] | None = None) -> dict[str, str]:
    """A finished expert per task: a peft LoRA on the tiny base with seeded random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sentimerge.pipeline.core.models import peft_quietly

    run = RunDir(cfg.resolved_run_dir)
    base = prepared_model_path(run)
    paths = {}
    for seed, task in enumerate(cfg.tasks):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or TARGETS, init_lora_weights=False)
        with peft_quietly():
            peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # peft's random B is tiny; make deltas comparable to the weights
                    param.normal_(0, 0.5)
        peft_model.save_pretrained(run.expert_adapter(task.name))
        write_json_atomic(run.expert(task.name) / "train_ids.json", [])
        write_manifest(run.expert(task.name), stage="experts")
        paths[task.name] = str(run.expert_adapter(task.name))
    return paths


def load_base(cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(prepared_model_path(RunDir(cfg.resolved_run_dir)), dtype=torch.float32)


def _coefficients(genome: Genome, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 1.4, genome.size)


def _closed_form_deltas(adapters, genome: Genome, weight: str) -> torch.Tensor:
    return torch.stack([adapters[e][weight].delta() if weight in adapters[e] else torch.zeros(1)
                        for e in genome.experts])


def test_registries_list_their_parts():
    from sentimerge.merge.labellers import LABELLERS

    assert sorted(METHODS.names()) == ["dare_linear", "dare_ties", "task_arithmetic", "ties"]
    assert sorted(LABELLERS.names()) == ["expert", "gold", "lexicon"]


def test_unknown_method_fails_with_a_suggestion(tmp_path, cache_dir):
    from sentimerge.pipeline.core.config import load_config
    from tests.conftest import write_tiny_config

    path = write_tiny_config(tmp_path, cache_dir=cache_dir, search={"method": "tie", "weak": {"labeller": "lexicn"}})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "unknown merge method 'tie' (did you mean 'ties'?)" in str(error.value)
    assert "unknown weak labeller 'lexicn' (did you mean 'lexicon'?)" in str(error.value)
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        get_method("tis")


def test_genome_expands_groups_and_parts():
    genome = Genome(("a", "b"), num_layers=5, group_size=2, split_attention_mlp=True)
    assert (genome.groups, genome.size) == (3, 12)
    coefficients = genome.layer_coefficients(np.arange(12.0))
    assert coefficients.shape == (2, 5, 2)
    assert coefficients[0, :, 0].tolist() == [0, 0, 2, 2, 4]  # layers 0-1 share group 0, layer 4 is group 2 alone
    assert coefficients[1, :, 1].tolist() == [7, 7, 9, 9, 11]
    assert genome.labels()[:3] == ["a/L0-1/attention", "a/L0-1/mlp", "a/L2-3/attention"]
    assert genome.one_hot("b").reshape(2, 3, 2)[1].min() == 1 and genome.one_hot("b")[:6].max() == 0


@pytest.mark.parametrize("split", [False, True])
def test_task_arithmetic_equals_its_closed_form(tiny_experts, split):
    cfg, _, adapters = tiny_experts
    model = load_base(cfg)
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1, split)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    merger = InMemoryMerge(model, adapters, genome, get_method("task_arithmetic"))
    candidate = _coefficients(genome)
    layer_coefficients = genome.layer_coefficients(candidate)
    merged = merger.merged_state(candidate)
    assert set(merged) == {w for factors in adapters.values() for w in factors}
    for weight, value in merged.items():
        layer = int(weight.split(".layers.")[1].split(".")[0])
        part = (0 if "attn" in weight else 1) if split else 0
        expected = base[weight].clone()
        for e, expert in enumerate(genome.experts):
            factors = adapters[expert][weight]
            expected += layer_coefficients[e, layer, part] * factors.scale * factors.b @ factors.a
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-5)


def test_expert_alone_equals_peft_merge(tiny_experts):
    from peft import PeftModel

    cfg, paths, adapters = tiny_experts
    model = load_base(cfg)
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 2)
    merged = InMemoryMerge(model, adapters, genome, get_method("task_arithmetic")).merged_state(
        genome.one_hot("aspect3"))
    reference = PeftModel.from_pretrained(load_base(cfg), paths["aspect3"]).merge_and_unload().state_dict()
    for weight, value in merged.items():
        torch.testing.assert_close(value, reference[weight], rtol=0, atol=1e-5)


def test_ties_equals_trim_elect_disjoint_mean(tiny_experts):
    cfg, _, adapters = tiny_experts
    model = load_base(cfg)
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    merger = InMemoryMerge(model, adapters, genome, get_method("ties"), density=0.3)
    candidate = _coefficients(genome, seed=1)
    layer_coefficients = genome.layer_coefficients(candidate)
    for weight, value in merger.merged_state(candidate).items():
        layer = int(weight.split(".layers.")[1].split(".")[0])
        trimmed = []
        for expert in genome.experts:
            delta = adapters[expert][weight].delta()
            keep = int(0.3 * delta.numel())
            threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
            trimmed.append(torch.where(delta.abs() >= threshold, delta, 0.0))
        weights = torch.tensor(layer_coefficients[:, layer, 0], dtype=torch.float32)
        weighted = torch.stack(trimmed) * weights[:, None, None]
        sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = weighted.sign() == sign
        count = (weights[:, None, None] * agree).sum(0)
        expected = base[weight] + (weighted * agree).sum(0) / torch.where(count == 0, 1.0, count)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-5)


def test_dare_masks_are_drawn_once_and_seeded(tiny_experts):
    cfg, _, adapters = tiny_experts
    model = load_base(cfg)
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1)
    candidate = _coefficients(genome, seed=2)
    first = InMemoryMerge(model, adapters, genome, get_method("dare_linear"), density=0.5, seed=3)
    again = InMemoryMerge(model, adapters, genome, get_method("dare_linear"), density=0.5, seed=3)
    other = InMemoryMerge(model, adapters, genome, get_method("dare_linear"), density=0.5, seed=4)
    a, b, c = first.merged_state(candidate), again.merged_state(candidate), other.merged_state(candidate)
    assert all(torch.equal(a[w], b[w]) for w in a)
    assert all(torch.equal(a[w], first.merged_state(candidate)[w]) for w in a)  # masks do not move between candidates
    assert not all(torch.equal(a[w], c[w]) for w in a)
    full = InMemoryMerge(model, adapters, genome, get_method("dare_linear"), density=1.0)
    arithmetic = InMemoryMerge(model, adapters, genome, get_method("task_arithmetic"))
    for weight, value in full.merged_state(candidate).items():
        torch.testing.assert_close(value, arithmetic.merged_state(candidate)[weight], rtol=0, atol=1e-5)


def test_apply_writes_the_resident_model_and_rejects_non_finite(tiny_experts):
    cfg, _, adapters = tiny_experts
    model = load_base(cfg).to(torch.bfloat16)
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1)
    merger = InMemoryMerge(model, adapters, genome, get_method("task_arithmetic"))
    candidate = _coefficients(genome, seed=5)
    merger.apply(candidate)
    params = dict(model.named_parameters())
    for weight, value in merger.merged_state(candidate).items():
        assert params[weight].dtype == torch.bfloat16
        assert torch.equal(params[weight], value.to(torch.bfloat16))
    with pytest.raises(MergeFailed, match="not finite"):
        merger.apply(np.full(genome.size, np.inf))


def test_restore_writes_the_base_back(tiny_experts):
    cfg, _, adapters = tiny_experts
    model = load_base(cfg).to(torch.bfloat16)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1)
    merger = InMemoryMerge(model, adapters, genome, get_method("ties"))
    merger.apply(_coefficients(genome, seed=5))
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())
    merger.restore()
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("method,split", [("task_arithmetic", True), ("ties", False)])
def test_mergekit_recipe_reproduces_the_in_memory_merge(tiny_experts, tmp_path, method, split):
    from safetensors.torch import load_file

    cfg, paths, adapters = tiny_experts
    model = load_base(cfg)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1, split)
    merger = InMemoryMerge(model, adapters, genome, get_method(method), density=0.4)
    candidate = _coefficients(genome, seed=6)
    base_path = prepared_model_path(RunDir(cfg.resolved_run_dir))
    references = {task: lora_reference(base_path, path) for task, path in paths.items()}
    recipe = build_recipe(base_path, references, genome, candidate, get_method(method), density=0.4,
                          out_dtype="float32")
    assert yaml.safe_load(yaml.safe_dump(recipe))["models"][1]["model"] == f"{base_path}+{paths['polarity']}"
    with warnings.catch_warnings(record=True) as caught:  # a clean console: mergekit's peft load warns no more
        warnings.simplefilter("always")
        run_mergekit(recipe, tmp_path / "out", cache=tmp_path / "cache")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = merger.merged_state(candidate)
    difference = max(float((merged[w] - v).abs().max()) for w, v in expected.items())
    assert difference < 1e-5, difference
    untouched = [name for name in merged if name not in expected]
    assert untouched and all(torch.equal(merged[name], base[name]) for name in untouched)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_recomputed_deltas_merge_exactly_like_resident_ones(tiny_experts, method):
    cfg, _, adapters = tiny_experts
    model = load_base(cfg)
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1)
    kept = InMemoryMerge(model, adapters, genome, get_method(method), density=0.5, seed=1)
    streamed = InMemoryMerge(model, adapters, genome, get_method(method), density=0.5, seed=1, keep_deltas=False)
    assert all(t.deltas is not None for t in kept.targets) and all(t.deltas is None for t in streamed.targets)
    for seed in (7, 8):
        candidate = _coefficients(genome, seed=seed)
        a, b = kept.merged_state(candidate), streamed.merged_state(candidate)
        assert a.keys() == b.keys() and all(torch.equal(a[w], b[w]) for w in a)


def _applied(merger: InMemoryMerge, candidate: np.ndarray) -> dict[str, torch.Tensor]:
    merger.apply(candidate)
    return {t.weight: t.param.detach().clone() for t in merger.targets}


def test_compiled_merge_writes_exactly_what_eager_does(tiny_experts):
    cfg, _, adapters = tiny_experts
    model = load_base(cfg).to(torch.bfloat16)  # the search's resident copy: the kernel also casts to bf16
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1)
    eager = InMemoryMerge(model, adapters, genome, get_method("ties"), density=0.5, seed=1)
    compiled = InMemoryMerge(model, adapters, genome, get_method("ties"), density=0.5, seed=1, compile=True)
    assert eager.compiled is False and compiled.compiled is None
    for seed in (7, 8):
        candidate = _coefficients(genome, seed=seed)
        a, b = _applied(eager, candidate), _applied(compiled, candidate)
        reference = eager.merged_state(candidate)
        assert all(torch.equal(a[w], reference[w].to(torch.bfloat16)) for w in a)
        assert a.keys() == b.keys() and all(torch.equal(a[w], b[w]) for w in a)
    if shutil.which("g++") or shutil.which("clang++"):  # inductor's CPU backend needs a C++ compiler
        assert compiled.compiled is True
    with pytest.raises(MergeFailed, match="not finite"):  # the fused finiteness check still guards the candidate
        compiled.apply(np.full(genome.size, np.inf))
    low_rank = InMemoryMerge(model, adapters, genome, get_method("task_arithmetic"), compile=True)
    assert low_rank.compiled is False  # a weighted sum on the LoRA factors: one matmul, nothing to fuse


def test_a_failing_compile_falls_back_to_eager_with_a_warning(tiny_experts, monkeypatch, caplog):
    cfg, _, adapters = tiny_experts
    model = load_base(cfg)
    genome = Genome(tuple(adapters), model.config.num_hidden_layers, 1)
    candidate = _coefficients(genome, seed=7)
    eager = InMemoryMerge(model, adapters, genome, get_method("ties"), density=0.5, seed=1)

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    merger = InMemoryMerge(model, adapters, genome, get_method("ties"), density=0.5, seed=1, compile=True)
    expected = _applied(eager, candidate)  # after both took the base weights: apply overwrites the model
    with caplog.at_level("WARNING", logger="sentimerge.merge"):
        merged, again = _applied(merger, candidate), _applied(merger, candidate)
    assert merger.compiled is False
    assert [r.getMessage() for r in caplog.records] == [
        "merge: torch.compile of ties failed, merging in eager mode (slower): "
        "InvalidCxxCompiler: No working C++ compiler found"]
    assert all(torch.equal(merged[w], expected[w]) and torch.equal(again[w], expected[w]) for w in expected)


def test_an_adapter_with_an_embedding_lora_is_refused_not_merged_without_it(prepared_tiny):
    """peft's embedding LoRA (lora_embedding_A/B) is no lora_A/lora_B pair: it was left out of every merge, baseline
    and recipe without a word (logits up to 0.26 from peft's own merge_and_unload)."""
    from sentimerge.pipeline.core.errors import ModelError

    paths = make_experts(prepared_tiny, targets=["q_proj", "embed_tokens"])
    with pytest.raises(ModelError, match=r"not linear LoRA factors \(lora_embedding_A, lora_embedding_B"):
        read_adapter(Path(paths["polarity"]))
