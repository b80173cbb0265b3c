"""Resumable training state, in safetensors (tensors) and JSON (everything else); no pickle anywhere.

A checkpoint folder holds the trainable weights, the optimizer's moments, the torch RNG state, optionally the best
weights so far, and `state.json` (step, sampler state, optimizer hyper-parameters, anything the loop adds). It is
written under a temporary name and renamed into place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sentimerge.pipeline.core import faults
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import sweep_leftovers, write_json_atomic

STATE = "state.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, param in params.items() if param.requires_grad and name not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state_dict split into flat tensors and JSON (param groups, which keys are tensors)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().clone().contiguous()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *info["plain"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"torch_cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    return tensors


def load_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[key] for key in sorted(tensors) if key.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(folder: Path, *, model, optimizer, state: dict, best: dict[str, torch.Tensor] | None) -> None:
    """Write the checkpoint to `folder` atomically (temporary folder, then rename)."""
    sweep_leftovers(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_cpu(trainable_state(model)), tmp / "trainable.safetensors")
    tensors, info = optimizer_tensors(optimizer)
    save_file(_cpu(tensors), tmp / "optimizer.safetensors")
    save_file(rng_tensors(), tmp / "rng.safetensors")
    if best is not None:
        save_file(_cpu(best), tmp / "best.safetensors")
    write_json_atomic(tmp / STATE, {**state, "optimizer": info})
    faults.point("built checkpoint/")
    stale = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, stale)
    os.replace(tmp, folder)
    faults.point("renamed checkpoint/")
    shutil.rmtree(stale, ignore_errors=True)


def read_state(folder: Path) -> dict | None:
    """The checkpoint's JSON state, or None when there is no complete checkpoint."""
    path = folder / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SentimergeError(f"{path}: corrupted checkpoint ({error.msg}); delete {folder} to restart this "
                              "training from its beginning") from None
    if not isinstance(state, dict) or "step" not in state or "fingerprint" not in state:
        raise SentimergeError(f"{path}: corrupted checkpoint (no step or fingerprint); delete {folder} to restart")
    return state


def restore_checkpoint(folder: Path, *, model, optimizer, device: torch.device) -> tuple[dict, dict | None]:
    """Load weights, optimizer and RNG from `folder`; returns (state, best weights or None)."""
    state = read_state(folder)
    load_trainable_state(model, {k: v.to(device) for k, v in load_file(folder / "trainable.safetensors").items()})
    tensors = {k: v.to(device) for k, v in load_file(folder / "optimizer.safetensors").items()}
    load_optimizer(optimizer, tensors, state["optimizer"])
    load_rng(load_file(folder / "rng.safetensors"))
    best_path = folder / "best.safetensors"
    best = load_file(best_path) if best_path.is_file() else None
    return state, best


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


def save_adapter(model, target: Path) -> None:
    """The adapter in peft's own format, written under a temporary name and renamed into place (a model holding
    several named adapters, as Hybrid LoRA's, gets one subfolder per adapter: peft's layout). peft records the base
    model as it was opened; a local folder opened by a relative path is recorded as its absolute path, so that
    `sentimerge evaluate --model <adapter>` (or peft's `AutoPeftModelForCausalLM`) finds it from any directory."""
    sweep_leftovers(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for config in sorted(tmp.rglob("adapter_config.json")):  # peft writes target_modules from a set: sort it
        settings = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(settings.get("target_modules"), list):
            settings["target_modules"] = sorted(settings["target_modules"])
        base = settings.get("base_model_name_or_path")
        if base and Path(base).is_dir():
            settings["base_model_name_or_path"] = str(Path(base).resolve())
        config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    faults.point("built adapter/")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    faults.point("renamed adapter/")
