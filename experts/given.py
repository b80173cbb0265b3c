"""Experts given instead of trained (`experts.given`): a peft LoRA adapter on disk or on the hub, or a full
fine-tuned checkpoint of the run's base model whose task vector (checkpoint - base) is the expert.

Everything is checked before any model loads or any expert trains, from the files' headers: the adapter's config
(`sentimerge.merge.lora.adapter_problems`: DoRA, `modules_to_save`, ...), that every tensor exists in the base with
a fitting shape (a different architecture or a resized vocabulary shows here), that a LoRA bias has a base bias to
go to, and, where the adapter's declared base (`base_model_name_or_path`) is a local folder, that its config and its
weights are the run's base's. An accepted adapter is copied into the expert's folder (`adapter/`, peft's format); a
checkpoint stays where it is and is read by reference. Either way the expert's manifest records the source and the
SHA-256 of its files, which is its fingerprint: changed files are refused until `--force` imports them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from sentimerge.experts.config import GivenExpert
from sentimerge.merge.lora import PEFT_PREFIX, adapter_problems, checkpoint_problems, safetensors_headers
from sentimerge.pipeline.core.errors import ModelError

log = logging.getLogger("sentimerge.experts")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_ARCHITECTURE = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "tie_word_embeddings")


def resolve(given: GivenExpert, cache_dir: Path) -> Path:
    """The local folder of a given expert; a hub adapter is downloaded (adapter files only) into `cache_dir`.

    Raises: ModelError when the hub cannot be reached or has no such adapter at that revision."""
    if given.hub is None:
        return Path(given.path or given.checkpoint)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(given.hub, revision=given.revision, allow_patterns=list(ADAPTER_FILES),
                                      cache_dir=str(cache_dir / "hub")))
    except Exception as error:  # hub errors come in many kinds (offline, 404, auth): one line each
        message = str(error).strip().splitlines()
        raise ModelError(f"hub adapter {given.hub}@{given.revision}: cannot download "
                         f"({message[0] if message else type(error).__name__})") from None


def _architecture(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return {key: config.get(key) for key in _ARCHITECTURE}


def _differences(mine: dict | None, base: dict | None) -> str | None:
    """How one model's architecture differs from the run's base, in one phrase (None: it does not)."""
    if mine is None or base is None:
        return None
    different = [f"{key} {mine[key]} (the run's base: {base[key]}{'; a resized vocabulary' * (key == 'vocab_size')})"
                 for key in _ARCHITECTURE if mine[key] is not None and base[key] is not None and mine[key] != base[key]]
    return ", ".join(different) or None


def check_adapter(folder: Path, base: Path) -> list[str]:
    """Why the peft adapter in `folder` cannot be merged into the base model in `base` (empty: it can)."""
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    if missing:
        return [f"{folder}: not a peft adapter, missing {', '.join(missing)}"]
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"{folder / 'adapter_config.json'}: not valid JSON ({error})"]
    problems = [f"{folder / 'adapter_config.json'}: {problem}" for problem in adapter_problems(config)]
    try:
        tensors = safetensors_headers(folder)
    except ModelError as error:
        return [*problems, str(error)]
    base_tensors = safetensors_headers(base)
    declared = config.get("base_model_name_or_path")
    difference = _differences(_architecture(Path(declared)), _architecture(base)) if declared and \
        Path(declared).is_dir() else None
    if difference:  # the shapes below would only repeat it
        return [*problems, f"{folder}: trained on another model: its declared base {declared} has {difference}"]
    for name, (shape, _) in tensors.items():
        module, _, kind = name.removeprefix(PEFT_PREFIX).partition(".lora_")
        if ".lora_" not in name:
            continue  # read_adapter names what it cannot merge
        weight = f"{module}.weight"
        if weight not in base_tensors:
            problems.append(f"{folder}: {name} adapts {module}, which the run's base model does not have")
            break
        out, inp = base_tensors[weight][0][:2] if not config.get("fan_in_fan_out") else base_tensors[weight][0][1::-1]
        if kind.startswith("A.") and kind.endswith("weight") and shape[1:] != (inp,):
            problems.append(f"{folder}: {name} has shape {shape}, the base's {weight} takes {inp} inputs")
            break
        if kind.startswith("B.") and kind.endswith("weight") and shape[:1] != (out,):
            problems.append(f"{folder}: {name} has shape {shape}, the base's {weight} has {out} outputs")
            break
        if kind.startswith("B.") and kind.endswith("bias") and f"{module}.bias" not in base_tensors:
            problems.append(f"{folder}: lora_bias: {module} has no bias in the run's base model to merge it into")
            break
    theirs = safetensors_headers(Path(declared)) if not problems and declared and Path(declared).is_dir() else {}
    if theirs:
        different = _different_weights(theirs, base_tensors, [f"{name.removeprefix(PEFT_PREFIX).split('.lora_')[0]}"
                                                              ".weight" for name in tensors if ".lora_A." in name])
        if different:
            problems.append(f"{folder}: declares base {declared}, whose {different} differs from the run's base "
                            "model: it was trained on another model")
    return problems


def _different_weights(theirs: dict, ours: dict, weights: list[str]) -> str | None:
    """The first of `weights` whose values differ between two local models (their `safetensors_headers`; None: all
    equal)."""
    import torch
    from safetensors import safe_open

    for weight in dict.fromkeys(weights):
        if weight not in theirs or weight not in ours:
            return weight
        with safe_open(str(theirs[weight][1]), "pt") as a, safe_open(str(ours[weight][1]), "pt") as b:
            if not torch.equal(a.get_tensor(weight), b.get_tensor(weight)):
                return weight
    return None


def check_checkpoint(folder: Path, base: Path) -> list[str]:
    """Why the full checkpoint in `folder` is not a checkpoint of the base model in `base` (empty: it is): another
    architecture in one line, else `sentimerge.merge.lora.checkpoint_problems`."""
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    difference = _differences(_architecture(folder), _architecture(base))
    if difference:
        return [f"{folder}: not a checkpoint of the run's base model: {difference}"]
    return checkpoint_problems(folder, base)


def _files(folder: Path, kind: str) -> list[Path]:
    """The files that make the expert: an adapter's two files; a checkpoint's config and weights."""
    files = [folder / name for name in ADAPTER_FILES] if kind == "adapter" else \
        sorted([*folder.glob("*.safetensors"), folder / "config.json"])
    return [file for file in files if file.is_file()]


def file_stats(folder: Path, kind: str) -> list[list]:
    """[name, size, mtime in ns] of each of the expert's files: while they hold, its recorded hash holds (a 7B
    checkpoint is not read again on every run)."""
    return [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in _files(folder, kind)]


def content_hash(folder: Path, kind: str, known: dict | None = None) -> str:
    """SHA-256 over the expert's files; `known` (a manifest's `given` record) is reused when its `stats` still
    match `file_stats`."""
    if known and known.get("stats") == file_stats(folder, kind) and known.get("sha256"):
        return known["sha256"]
    digest = hashlib.sha256()
    for file in _files(folder, kind):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def install(source: Path, kind: str, folder: Path) -> None:
    """Copy an adapter's files into the expert's `adapter/` folder (a checkpoint is read where it is)."""
    if kind == "adapter":
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            shutil.copy2(source / name, folder / "adapter" / name)
