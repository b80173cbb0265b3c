"""The mergekit recipe of a candidate: the same coefficients as a `mergekit-yaml` config, and running it.

Each LoRA expert is a `base+adapter` reference, a full checkpoint its folder; its `weight` is a per-layer list (one
entry per decoder layer, which mergekit's gradient interpolation maps exactly onto the layers), split by `filter` into
attention and MLP lists when the genome is. The merge runs in float32 (LoRAs applied in float32 too) and is written
in the run's dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from sentimerge.merge.genome import Genome
from sentimerge.merge.methods import MergeMethod
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.models import peft_quietly

PART_FILTERS = {"attention": "attn", "mlp": "mlp"}


def _rounded(values) -> list[float]:
    return [float(v) for v in values]  # full float precision: the recipe must reproduce the merge exactly


def lora_reference(base_path: str, adapter: str) -> str:
    """mergekit's reference to a LoRA expert: the base with the adapter applied (`BASE+ADAPTER`)."""
    for ref in (base_path, adapter):
        if "+" in ref:
            raise SentimergeError(f"{ref}: mergekit cannot reference a path containing '+'")
    return f"{base_path}+{adapter}"


def build_recipe(base_path: str, references: dict[str, str], genome: Genome, candidate: np.ndarray,
                 method: MergeMethod, *, density: float, out_dtype: str) -> dict:
    """A mergekit config (as a dict) equivalent to the in-memory merge of `candidate`. `references` maps each expert
    of the genome, in its order, to the model mergekit reads: `lora_reference(base, adapter)` for a LoRA adapter, the
    checkpoint's folder for a full checkpoint."""
    if list(references) != list(genome.experts):
        raise ValueError(f"experts {list(references)} do not match the genome's {list(genome.experts)}")
    if "+" in base_path:
        raise SentimergeError(f"{base_path}: mergekit cannot reference a path containing '+'")
    coefficients = genome.layer_coefficients(candidate)
    models = [{"model": base_path}]
    for index, (expert, reference) in enumerate(references.items()):
        if genome.split_attention_mlp:
            weight = [{"filter": PART_FILTERS[part], "value": _rounded(coefficients[index, :, p])}
                      for p, part in enumerate(genome.parts)]
            # the catch-all for tensors matching neither filter (norms; embeddings at t = 0): a LoRA expert has no
            # delta there, a checkpoint's gets the attention values, as `merge.engine.merge_position` places it
            weight.append({"value": weight[0]["value"]})
        else:
            weight = _rounded(coefficients[index, :, 0])
        models.append({"model": reference,
                       "parameters": {"weight": weight, **method.mergekit_parameters(density)}})
    return {"merge_method": method.mergekit_method, "base_model": base_path, "models": models,
            "dtype": "float32", "out_dtype": out_dtype}


def recipe_yaml(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False)


def run_mergekit(recipe: dict, out: Path, *, cache: Path) -> None:
    """Merge `recipe` to `out` with mergekit (what `mergekit-yaml recipe.yml out` does), on CPU."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(lora_merge_cache=str(cache), lora_merge_dtype="float32", cuda=False, copy_tokenizer=True,
                           quiet=True, write_model_card=True)
    with peft_quietly():  # mergekit loads each base+LoRA with peft
        run_merge(config, str(out), options=options, config_source=recipe_yaml(recipe))
