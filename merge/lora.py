"""An expert's task vector, read per adapted weight: a peft LoRA adapter as low-rank factors (delta = scale * B @ A)
or, for a full checkpoint of the same base and for LoRA biases, as a dense delta (expert weight - base weight)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sentimerge.pipeline.core.errors import ModelError

PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight of one expert: `weight` is the base model's parameter name."""

    weight: str
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    scale: float
    transposed: bool = False  # peft's fan_in_fan_out: the base weight is stored [in, out] (GPT-2's Conv1D)

    def delta(self) -> torch.Tensor:
        delta = (self.b.float() @ self.a.float()) * self.scale
        return delta.T if self.transposed else delta

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the base weight this delta applies to."""
        out_in = (self.b.shape[0], self.a.shape[1])
        return out_in[::-1] if self.transposed else out_in


@dataclass(frozen=True)
class DenseDelta:
    """One changed tensor of one expert given in full: `value` = expert - base, float32, the base tensor's shape
    (a full checkpoint's task vector; a LoRA bias, `lora_bias`, whose delta is scale * lora_B.bias)."""

    weight: str
    value: torch.Tensor

    def delta(self) -> torch.Tensor:
        return self.value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)


Delta = LoraFactors | DenseDelta


def adapter_problems(config: dict) -> list[str]:
    """What in a peft `adapter_config.json` this merge cannot take as a task vector (empty: mergeable). DoRA is
    refused: its magnitude vector rescales each merged column by the norm of (W0 + delta), which is not a sum of
    task vectors; `modules_to_save` holds whole modules (usually the LM head) that would replace the base's."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        problems.append("use_dora: DoRA's magnitude vectors are not a task vector; merge a plain LoRA")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: full copies of modules cannot be merged as "
                        "deltas")
    if config.get("layer_replication"):
        problems.append("layer_replication changes the architecture")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            problems.append(f"{key} {config.get(key)!r} is not a positive number")
    return problems


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup for a module (`peft.utils.other.get_pattern_key`)."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def adapter_scale(config: dict, module: str) -> float:
    """LoRA scale of `module` (its name in the base model): alpha / r, or alpha / sqrt(r) with rsLoRA, with r and
    alpha from `rank_pattern` / `alpha_pattern` where they name the module (as peft builds the layer)."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


def read_adapter(folder: Path) -> dict[str, Delta]:
    """Every LoRA factor pair of a peft adapter folder, keyed by the base weight it changes, plus a dense delta of
    the base bias for each `lora_B.bias` (peft's `lora_bias`).

    Follows peft's own scaling: `use_rslora`, `rank_pattern`, `alpha_pattern` and `fan_in_fan_out`; adapters with
    `layers_to_transform` simply have no factors elsewhere. Raises ModelError naming the folder and the field for
    what cannot be merged (`adapter_problems`) and for missing, unreadable or incomplete weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "no such folder"
        raise ModelError(f"{folder}: not a peft adapter (needs adapter_config.json and adapter_model.safetensors; "
                         f"found: {found or 'nothing'})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{config_path}: not valid JSON ({error})") from None
    problems = adapter_problems(config)
    if problems:
        raise ModelError(f"{folder}: " + "; ".join(problems))
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{weights_path}: unreadable safetensors file ({error})") from None
    names = [key for key in tensors if ".lora_A." not in key and ".lora_B." not in key]
    if names:  # e.g. an embedding's LoRA (lora_embedding_A/B): never dropped silently
        kinds = [re.search(r"\.(lora_\w+?)(?:\.|$)", key) for key in names]
        unmergeable = sorted({kind.group(1) if kind else key.rsplit(".", 1)[-1] for kind, key in zip(kinds, names)})
        raise ModelError(f"{folder}: holds weights that are not linear LoRA factors ({', '.join(unmergeable)}: "
                         f"{names[0]}{' and more' if len(names) > 1 else ''}); sentimerge merges lora_A/lora_B pairs "
                         "of linear layers only: train without them (target_modules of linear layers)")
    deltas: dict[str, Delta] = {}
    transposed = bool(config.get("fan_in_fan_out"))
    for key, a in tensors.items():
        if ".lora_A." not in key or not key.endswith(".weight"):
            continue
        module = key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise ModelError(f"{folder}: {key} has no matching lora_B")
        a, b = tensors[key], tensors[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ModelError(f"{folder}: {key} {tuple(a.shape)} and lora_B {tuple(b.shape)} are not LoRA factors "
                             "of one rank")
        scale = adapter_scale(config, module)
        deltas[f"{module}.weight"] = LoraFactors(f"{module}.weight", a, b, scale, transposed)
        bias = tensors.get(b_key.removesuffix(".weight") + ".bias")
        if bias is not None:
            deltas[f"{module}.bias"] = DenseDelta(f"{module}.bias", bias.float() * scale)
    if not deltas:
        raise ModelError(f"{folder}: the adapter has no LoRA weights")
    return deltas


def read_checkpoint(folder: Path, base: Path) -> dict[str, DenseDelta]:
    """The task vector of a full checkpoint of the same base: every tensor that differs from the base's, as
    checkpoint - base in float32 (unchanged tensors are left out). Input and output embeddings tied in the base
    (`tie_word_embeddings`) are one tensor: a checkpoint's separate `lm_head.weight` must equal its embeddings.

    Both folders hold `*.safetensors` files (one or sharded). Raises ModelError naming the folder and the tensor for
    a tensor missing on either side, a shape that differs (a resized vocabulary among them) or unreadable files."""
    from safetensors import SafetensorError, safe_open

    def handles(path: Path) -> dict[str, Path]:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{path}: no *.safetensors weights (a full checkpoint saved with save_pretrained)")
        names = {}
        for file in files:
            try:
                with safe_open(str(file), "pt") as handle:
                    names.update(dict.fromkeys(handle.keys(), file))
            except (SafetensorError, OSError) as error:
                raise ModelError(f"{file}: unreadable safetensors file ({error})") from None
        return names

    def tensor(files: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(files[name]), "pt") as handle:
            return handle.get_tensor(name)

    expert_files, base_files = handles(folder), handles(base)
    tied = "lm_head.weight" not in base_files and "model.embed_tokens.weight" in base_files
    extra = sorted(set(expert_files) - set(base_files) - ({"lm_head.weight"} if tied else set()))
    missing = sorted(set(base_files) - set(expert_files))
    if extra or missing:
        raise ModelError(f"{folder}: not a checkpoint of the run's base model: "
                         + "; ".join(part for part in (f"tensors the base lacks: {', '.join(extra[:3])}" if extra
                                                       else "", f"missing: {', '.join(missing[:3])}" if missing
                                                       else "") if part))
    deltas = {}
    for name in base_files:
        value, base_value = tensor(expert_files, name), tensor(base_files, name)
        if value.shape != base_value.shape:
            hint = " (a resized vocabulary)" if "embed" in name or "lm_head" in name else ""
            raise ModelError(f"{folder}: {name} has shape {tuple(value.shape)}, the base {tuple(base_value.shape)}"
                             f"{hint}")
        delta = value.float() - base_value.float()
        if delta.any():
            deltas[name] = DenseDelta(name, delta)
    if tied and "lm_head.weight" in expert_files:
        if not torch.equal(tensor(expert_files, "lm_head.weight"), tensor(expert_files, "model.embed_tokens.weight")):
            raise ModelError(f"{folder}: lm_head.weight differs from model.embed_tokens.weight, but the base ties "
                             "them (tie_word_embeddings): the merge would have to untie them")
    return deltas


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
