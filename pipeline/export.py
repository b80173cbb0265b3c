"""`sentimerge export CONFIG`: write the one checkpoint users take away.

The stage 3 adapter is merged into stage 2's merged model (in float32, then cast to `export.dtype`) and saved as a
plain `transformers` checkpoint (safetensors, tokenizer, chat template). Next to it: `sentimerge_tasks.yaml` (how each
task is prompted and answered; `sentimerge predict` needs nothing else), `mergekit_config.yml` (stage 2's recipe),
`sentimerge_config.yaml` (the resolved run config), `provenance.json` (package version, git revision, base model,
data sources with hashes), `eval.md` (the exported model scored after reloading it with `transformers` alone, on the
examples of stage 2's final tables: dev, and test where every task has one) and a `README.md` model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import torch
import yaml

from sentimerge.pipeline.core import __version__
from sentimerge.pipeline.core.config import RunConfig, dump_config
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.evaluation import (
    evaluate_model,
    evaluation_splits,
    final_examples,
    markdown_table,
    split_heading,
)
from sentimerge.pipeline.core.models import (
    DTYPES,
    attention_kwargs,
    cast_weights,
    load_model,
    peft_quietly,
    pick_device,
)
from sentimerge.pipeline.core.rundir import (
    EXPORT_TASKS,
    RunDir,
    digest,
    fresh_dir,
    is_done,
    read_manifest,
    write_csv_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from sentimerge.pipeline.core.upstream import prepared_model_path, search_key

log = logging.getLogger("sentimerge.export")


def sources(cfg: RunConfig, run: RunDir) -> tuple[str, Path | None]:
    """(model to start from, adapter to merge into it or None), checked before anything loads."""
    if cfg.export.source == "finetune":
        if not is_done(run.finetune):
            raise SentimergeError(f"{run.finetune}: stage 3 has not finished; run `sentimerge finetune` first "
                                  "(or set export.source: search)")
        return read_manifest(run.finetune)["start"], run.finetune_adapter
    if not is_done(run.search):
        raise SentimergeError(f"{run.search}: stage 2 has not finished; run `sentimerge search` first")
    return str(run.search_merged), None


def main(cfg: RunConfig, *, force: bool = False) -> Path:
    run = RunDir(cfg.resolved_run_dir)
    if is_done(run.export) and not force:
        exported_from = read_manifest(run.export).get("upstream")
        if exported_from is not None and exported_from != upstream_key(cfg, run):
            raise SentimergeError(f"{run.export}: exported from another stage {3 if cfg.export.source == 'finetune' else 2}"
                                  " result; run `sentimerge export --force` to export again")
        log.info("export: already done in %s", run.export)
        _complete_evaluations(cfg, run)
        return run.export
    start, adapter = sources(cfg, run)
    upstream = upstream_key(cfg, run)
    # the examples of stage 2's final tables, so that the run's results table compares every row on the same ones
    splits = {split: final_examples(run, cfg, split) for split in evaluation_splits(run, cfg)}
    started = time.time()
    with fresh_dir(run.export, overwrite=True) as folder:
        _write_model(start, adapter, folder, cfg)
        write_text_atomic(folder / EXPORT_TASKS, yaml.safe_dump(
            {"tasks": [task.model_dump(mode="json", exclude_defaults=False) for task in cfg.tasks]},
            sort_keys=False, allow_unicode=True))
        write_text_atomic(folder / "sentimerge_config.yaml", dump_config(cfg))
        if run.search_recipe.is_file():
            shutil.copyfile(run.search_recipe, folder / "mergekit_config.yml")
        heatmap = run.search_plots / "coefficients.png"
        if heatmap.is_file():
            shutil.copyfile(heatmap, folder / "coefficients.png")
        write_json_atomic(folder / "provenance.json", _provenance(cfg, run, start, adapter))

        model, tokenizer = load_model(str(folder), dtype=cfg.export.dtype, device=pick_device(cfg.device))
        tables = _score_splits(model, tokenizer, cfg, run, splits, folder)
        first, table = next(iter(tables.items()))  # dev unless `search.gold.splits` left it out
        write_text_atomic(folder / "eval.md", "\n".join(
            f"{split_heading(split, splits[split])}\n\n{markdown_table(t.drop(columns='examples_per_s'))}"
            for split, t in tables.items()))
        write_text_atomic(folder / "README.md", model_card(cfg, run, tables, splits, folder))
        write_manifest(folder, stage="export", upstream=upstream, start=start, adapter=str(adapter) if adapter else None,
                       dtype=cfg.export.dtype, mean_primary=float(table["primary"].iloc[-1]), mean_primary_split=first,
                       seconds=round(time.time() - started, 1))
    log.info("export: %s (mean %s primary %.3f)", run.export, first, table["primary"].iloc[-1])
    return run.export


def upstream_key(cfg: RunConfig, run: RunDir) -> str | None:
    """What the export hashes of the stage it exports: stage 3's fingerprint and upstream, or stage 2's."""
    if cfg.export.source == "finetune":
        if not is_done(run.finetune):
            return None
        manifest = read_manifest(run.finetune)
        return digest({"fingerprint": manifest.get("fingerprint"), "upstream": manifest.get("upstream")})
    return search_key(run)


def _complete_evaluations(cfg: RunConfig, run: RunDir) -> None:
    """An export finished before a split's evaluation existed (a test split prepared since, or an export of an
    earlier version): score the exported model on it, beside the others. The model itself does not change."""
    missing = [split for split in evaluation_splits(run, cfg) if not run.export_eval(split).is_file()]
    if not missing:
        return
    model, tokenizer = load_model(str(run.export), dtype=cfg.export.dtype, device=pick_device(cfg.device))
    _score_splits(model, tokenizer, cfg, run, {split: final_examples(run, cfg, split) for split in missing},
                  run.export)


def _score_splits(model, tokenizer, cfg: RunConfig, run: RunDir, splits: dict[str, dict[str, list[dict]]],
                  folder: Path) -> dict:
    """The exported model's metrics table on each split's examples, each written to `folder` (`eval*.csv`)."""
    tables = {}
    for split, data in splits.items():
        log.info("export: scoring the exported model on %s", split)
        tables[split], _ = evaluate_model(model, tokenizer, list(cfg.tasks), data, batch_size=cfg.evaluate.batch_size)
        write_csv_atomic(folder / run.export_eval(split).name, tables[split])
    return tables


def merged_model(start: str, adapter: Path | None, cfg: RunConfig):
    """The start model with the stage 3 adapter merged in float32, then cast to `export.dtype`: the exported
    weights (also what `report` scores, in memory)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32,
                                                 trust_remote_code=cfg.base_model.trust_remote_code,
                                                 **attention_kwargs(pick_device(cfg.device)))
    if adapter is not None:
        from peft import PeftModel

        with peft_quietly():
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return cast_weights(model, DTYPES[cfg.export.dtype])  # not .to(dtype): RoPE's inv_freq stays float32


def _write_model(start: str, adapter: Path | None, folder: Path, cfg: RunConfig) -> None:
    from transformers import AutoTokenizer

    merged_model(start, adapter, cfg).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(start, trust_remote_code=cfg.base_model.trust_remote_code).save_pretrained(folder)


def git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _provenance(cfg: RunConfig, run: RunDir, start: str, adapter: Path | None) -> dict:
    report = json.loads(run.data_report.read_text(encoding="utf-8"))
    return {
        "sentimerge_version": __version__, "git_revision": git_revision(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": cfg.seed,
        "base_model": {"spec": cfg.base_model.model_dump(mode="json"), "path": prepared_model_path(run)},
        "shared_adapter": ({"model": str(run.shared_model), **{k: v for k, v in read_manifest(run.shared).items()
                                                              if k in ("steps", "examples", "fingerprint")}}
                           if cfg.experts.shared.examples else None),
        "merged_model": start, "finetune_adapter": str(adapter) if adapter else None,
        "data": {name: {"source": task["source"],
                        "splits": {split: {"examples": info["examples"], "sha256": info["sha256"]}
                                   for split, info in task["splits"].items()}}
                 for name, task in report["tasks"].items()},
    }


def model_card(cfg: RunConfig, run: RunDir, tables: dict, splits: dict[str, dict[str, list]], folder: Path) -> str:
    """The export's README.md: what the model is, how to prompt each task, how well it does, how it was made."""
    base = cfg.base_model.hub or (f"{cfg.base_model.gguf.package}=={cfg.base_model.gguf.version}"
                                  if cfg.base_model.gguf else "a local model")
    lines = ["---", "library_name: transformers", "tags: [sentiment, lora, model-merging, sentimerge]", "---", "",
             f"# {cfg.name}: one sentiment specialist for {len(cfg.tasks)} tasks", "",
             f"Made with sentimerge {__version__} from {base}: one LoRA expert per task, merged layer-wise with "
             "CMA-ES on weak labels, then fine-tuned on all tasks at once with dynamic task weights "
             f"(`{cfg.finetune.weighting.name}`). Load it with plain `transformers`:", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
             "```", "", "or answer directly: `sentimerge predict --model PATH --task TASK \"some text\"`.", "",
             "## Tasks and how to prompt them", "",
             "Send one user message through the chat template: the instruction, the line "
             "`Answer with one of: ...`, a blank line, `Text: ...` (and `Aspect: ...`). The model answers with one of "
             "the answers; regression answers are levels spread evenly over the range (the prediction is their "
             "probability-weighted mean)." + (
                 " A task with demonstrations is asked after them: each a user message of the same form and the "
                 "assistant's answer, in the order `sentimerge_tasks.yaml` lists them (`sentimerge predict` does "
                 "this)." if any(task.demonstrations for task in cfg.tasks) else ""), "",
             "| task | kind | answers | instruction | demonstrations |", "|---|---|---|---|---|"]
    for task in cfg.tasks:
        kind = "classification" if task.kind == "classification" else f"regression in {list(task.range)}"
        lines.append(f"| {task.name} | {kind} | {', '.join(task.answers)} | {task.instruction.strip()} | "
                     f"{len(task.demonstrations)} |")
    lines += ["", "## Evaluation", "", "Primary metric per task (`primary`) and their unweighted mean. The run's "
              "settings were chosen on dev; a test split, where the tasks have one, chose nothing: its numbers are the "
              "ones to expect on new data.", ""]
    for split, table in tables.items():
        lines += ["#" + split_heading(split, splits[split]), "", markdown_table(table.drop(columns="examples_per_s")), ""]
    if (folder / "coefficients.png").is_file():
        lines += ["## Merge coefficients", "", "![layer-wise merge coefficients](coefficients.png)", "",
                  "The stage 2 recipe is `mergekit_config.yml`: `mergekit-yaml mergekit_config.yml OUT` rebuilds the "
                  "merged model before fine-tuning." + (
                      " Stage 3's adapter started as that merge (the experts' LoRA factors stacked, each scaled by "
                      "its coefficient, `finetune.init: experts`) and was merged into the experts' base model, which "
                      "`provenance.json` names." if cfg.finetune.init == "experts" else ""), ""]
    lines += ["## Provenance", "", "`provenance.json` lists the package version, git revision, base model and every "
              "data source with the hashes of the prepared splits; `sentimerge_config.yaml` is the resolved run config.",
              ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="export again even if an export exists")


def run_from_args(args: argparse.Namespace, cfg: RunConfig) -> None:
    main(cfg, force=args.force)


if __name__ == "__main__":
    from sentimerge.pipeline.cli import run_module

    run_module("export")
