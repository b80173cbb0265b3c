"""Reading a peft LoRA adapter as low-rank factors: for each target weight, delta = scale * B @ A."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sentimerge.pipeline.core.errors import ModelError

_PREFIX = "base_model.model."
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight of one expert: `weight` is the base model's parameter name."""

    weight: str
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    scale: float

    def delta(self) -> torch.Tensor:
        return (self.b.float() @ self.a.float()) * self.scale


def read_adapter(folder: Path) -> dict[str, LoraFactors]:
    """Every LoRA factor pair of a peft adapter folder, keyed by the base weight it changes."""
    from safetensors.torch import load_file

    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{folder}: not a peft adapter (needs adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is not supported")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            problems.append(f"{key} is not supported")
    if config.get("modules_to_save"):
        problems.append("modules_to_save (full copies of modules) cannot be merged as deltas")
    if problems:
        raise ModelError(f"{folder}: " + "; ".join(problems))
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(weights_path))
    names = [key for key in tensors if ".lora_A." not in key and ".lora_B." not in key]
    if names:  # e.g. an embedding's LoRA (lora_embedding_A/B) or LoRA biases: never dropped silently
        kinds = [re.search(r"\.(lora_\w+?)(?:\.|$)", key) for key in names]
        unmergeable = sorted({kind.group(1) if kind else key.rsplit(".", 1)[-1] for kind, key in zip(kinds, names)})
        raise ModelError(f"{folder}: holds weights that are not linear LoRA factors ({', '.join(unmergeable)}: "
                         f"{names[0]}{' and more' if len(names) > 1 else ''}); sentimerge merges lora_A/lora_B pairs of "
                         "linear layers only: train without them (target_modules of linear layers)")
    factors = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix(_PREFIX)
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise ModelError(f"{folder}: {key} has no matching lora_B")
        factors[f"{module}.weight"] = LoraFactors(f"{module}.weight", a, tensors[b_key], scale)
    if not factors:
        raise ModelError(f"{folder}: the adapter has no LoRA weights")
    return factors


def layer_of(weight: str) -> int | None:
    match = _LAYER.search(weight)
    return int(match.group(1)) if match else None


def part_of(weight: str) -> str:
    """`attention` or `mlp`: which half of a decoder layer a weight belongs to."""
    if "attn" in weight or "attention" in weight:
        return "attention"
    if "mlp" in weight or "feed_forward" in weight:
        return "mlp"
    raise ModelError(f"{weight}: cannot tell whether it is an attention or an MLP weight")
