"""Base model provisioning: a hub id resolves through the hub cache (offline here), a tiny model is reproducible."""

from __future__ import annotations

import shutil

import pytest

from sentimerge.pipeline.core.config import ModelSpec
from sentimerge.pipeline.core.errors import ModelError
from sentimerge.pipeline.core.models import load_model, provision_base_model


def test_tiny_model_is_built_once_and_reproducibly(tmp_path):
    spec = ModelSpec(tiny={"num_layers": 1, "hidden_size": 32, "vocab_size": 320, "seed": 3})
    first = provision_base_model(spec, tmp_path / "a", corpus=["good film", "bad film"])
    again = provision_base_model(spec, tmp_path / "a", corpus=["good film", "bad film"])
    other_cache = provision_base_model(spec, tmp_path / "b", corpus=["good film", "bad film"])
    assert first == again
    model_a, tokenizer = load_model(first, dtype="float32")
    model_b, _ = load_model(other_cache, dtype="float32")
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert (a == b).all(), name
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")


def test_hub_id_resolves_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """The hub code path, exercised against a local hub cache (no network): snapshot_download finds the snapshot."""
    built = provision_base_model(ModelSpec(tiny={"num_layers": 1, "hidden_size": 32, "vocab_size": 320}),
                                 tmp_path / "build", corpus=["good", "bad"])
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "hub" / "models--someone--tiny-llama"
    shutil.copytree(built, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = provision_base_model(ModelSpec(hub="someone/tiny-llama"), tmp_path / "cache")
    model, _ = load_model(path, dtype="float32")
    assert model.config.num_hidden_layers == 1
    with pytest.raises(ModelError, match="base_model.hub: cannot fetch 'someone/missing'"):
        provision_base_model(ModelSpec(hub="someone/missing"), tmp_path / "cache")


def test_missing_or_wrong_model_directory_is_named(tmp_path):
    with pytest.raises(ModelError, match="model directory not found"):
        provision_base_model(ModelSpec(path=str(tmp_path / "nope")), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(str(tmp_path / "empty"))


def test_an_adapter_saved_over_a_relative_base_loads_from_any_directory(tmp_path, monkeypatch):
    """save_adapter records a base opened by a relative path as its absolute path: the adapter then loads (base +
    adapter, the same weights) from another working directory; a declared local base that is missing is named."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sentimerge.experts.checkpoint import save_adapter
    from sentimerge.pipeline.core.models import check_model_dir, peft_quietly

    built = provision_base_model(ModelSpec(tiny={"num_layers": 1, "hidden_size": 32, "vocab_size": 320}),
                                 tmp_path / "cache", corpus=["good film", "bad film"])
    shutil.copytree(built, tmp_path / "runs" / "demo" / "shared" / "model")
    monkeypatch.chdir(tmp_path)
    base = AutoModelForCausalLM.from_pretrained("runs/demo/shared/model", dtype=torch.float32)
    torch.manual_seed(0)
    with peft_quietly():
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path / "runs" / "demo" / "adapter")
    config = json.loads((tmp_path / "runs" / "demo" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "runs" / "demo" / "shared" / "model").resolve())
    monkeypatch.chdir(tmp_path / "runs")
    loaded, _ = load_model(str(tmp_path / "runs" / "demo" / "adapter"), dtype="float32")
    expected = model.merge_and_unload().state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.allclose(tensor, expected[name]), name
    config["base_model_name_or_path"] = "runs/demo/shared/gone"
    (tmp_path / "runs" / "demo" / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="base model runs/demo/shared/gone not found"):
        check_model_dir(tmp_path / "runs" / "demo" / "adapter")
