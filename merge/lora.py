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


def safetensors_headers(folder: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """name -> (shape, file) of every tensor in the folder's *.safetensors files (one or sharded), from their headers
    only. Raises ModelError naming a file that cannot be read."""
    from safetensors import SafetensorError, safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    tensors[name] = (tuple(handle.get_slice(name).get_shape()), file)
        except (SafetensorError, OSError) as error:
            raise ModelError(f"{file}: unreadable safetensors file ({str(error).strip() or type(error).__name__})") \
                from None
    return tensors


def _tensor(headers: dict[str, tuple[tuple[int, ...], Path]], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(headers[name][1]), "pt") as handle:
        return handle.get_tensor(name)


def checkpoint_problems(folder: Path, base: Path) -> list[str]:
    """Why the full checkpoint in `folder` is not a checkpoint of the base model in `base` (empty: it is): no or
    unreadable weights, tensors missing on either side, a shape that differs (a resized vocabulary among them), or an
    `lm_head.weight` apart from the embeddings where the base ties them (`tie_word_embeddings`)."""
    try:
        tensors, base_tensors = safetensors_headers(folder), safetensors_headers(base)
    except ModelError as error:
        return [str(error)]
    if not tensors:
        return [f"{folder}: no *.safetensors weights (save the checkpoint with save_pretrained)"]
    tied = "lm_head.weight" not in base_tensors and "model.embed_tokens.weight" in base_tensors
    missing = [name for name in base_tensors if name not in tensors]
    extra = [name for name in tensors if name not in base_tensors and not (tied and name == "lm_head.weight")]
    problems = []
    if missing:
        problems.append(f"{folder}: lacks {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''} of the "
                        "run's base model")
    if extra:
        problems.append(f"{folder}: has {', '.join(extra[:3])}{' and more' if len(extra) > 3 else ''}, which the "
                        "run's base model does not")
    for name, (shape, _) in tensors.items():
        if name in base_tensors and shape != base_tensors[name][0]:
            hint = " (a resized vocabulary)" if "embed" in name or "lm_head" in name else ""
            problems.append(f"{folder}: {name} has shape {shape}, the base {base_tensors[name][0]}{hint}")
            break
    if not problems and tied and "lm_head.weight" in tensors and not torch.equal(
            _tensor(tensors, "lm_head.weight"), _tensor(tensors, "model.embed_tokens.weight")):
        problems.append(f"{folder}: lm_head.weight differs from model.embed_tokens.weight, but the base ties them "
                        "(tie_word_embeddings): the merge would have to untie them")
    return problems


def read_checkpoint(folder: Path, base: Path) -> dict[str, DenseDelta]:
    """The task vector of a full checkpoint of the same base: every tensor that differs from the base's, as
    checkpoint - base in float32 (unchanged tensors are left out; a tied `lm_head.weight` is the embeddings).

    Raises ModelError with the first of `checkpoint_problems`."""
    problems = checkpoint_problems(folder, base)
    if problems:
        raise ModelError(problems[0])
    tensors, base_tensors = safetensors_headers(folder), safetensors_headers(base)
    deltas = {}
    for name in base_tensors:
        delta = _tensor(tensors, name).float() - _tensor(base_tensors, name).float()
        if delta.any():
            deltas[name] = DenseDelta(name, delta)
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
