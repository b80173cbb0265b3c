"""Stage 3 options against their off-switch on finished runs: the same merged model, seed and examples, one option
changed; and in-context demonstrations for the run's own final model.

    python benchmarks/stage3_ablation.py runs/sharing/separate/seed0 runs/sharing/separate/seed1 ... \\
        --name demo --variant "paced: task_pacing.pacing=linear" \\
        --variant "famo: weighting.name=famo" --variant "famo_next_batch: weighting.name=famo, weighting.options.same_batch=0" \\
        [--demonstrations 3]

Each RUN is a finished run directory (its `config.yaml` is the resolved config it ran with). A variant is a name and
dotted overrides of the `finetune` section; it trains stage 3 again from the run's merged model with the run's seed
into `RUN/report/ablation-<name>/` (resumable, kept) and is scored on the run's final-table examples of every split
(`report.evaluate_variant`, cached). The reference is the run's own stage 3 (its `finetune/`), or `--reference NAME`.
`--demonstrations K` scores the run's own final model again with K demonstrations per task before every question
(`sentimerge demonstrations`' draw: train rows outside dev and test, seeded by the data seed). Per variant, run and
split: the mean primary metric, its difference to the reference with a paired bootstrap interval; over the runs: the
mean and sd of the differences and the runs where the variant is ahead. `--against-multitask` adds, for the reference
and every variant, the difference to the run's multi-task LoRA (`sentimerge report`'s, trained on the base with the
pipeline's whole example budget; trained here if the report has not). Writes
benchmarks/results/stage3_ablation_<name>.{md,json} after every run; `--record KEY` puts the first variant's mean
difference in summary.json (KEY: test, KEY_dev: dev). `--seeds K --reference NAME` trains every variant, the
reference included, with K stage 3 seeds (the run's seed, +1, ...) into `ablation-<name>-seed<s>`, the weighting
grid's folders (`--reference dao-level_ce --variant "dao-level_ce: weighting.name=dao, regression_loss=level_ce"`
reuses its dao cells); the summary is then over runs x stage 3 seeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sharing import parse_variant, variant_config  # noqa: E402
from benchmarks.summary import record  # noqa: E402
from sentimerge.pipeline import finetune, report  # noqa: E402
from sentimerge.pipeline.api import session  # noqa: E402
from sentimerge.pipeline.core.config import RunConfig, load_config  # noqa: E402
from sentimerge.pipeline.core.data import load_task_splits  # noqa: E402
from sentimerge.pipeline.core.evaluation import evaluation_splits, final_examples, markdown_table  # noqa: E402
from sentimerge.pipeline.core.metrics import paired_bootstrap  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir  # noqa: E402
from sentimerge.pipeline.core.runtime import setup_logging  # noqa: E402
from sentimerge.pipeline.core.tasks import TaskSpec  # noqa: E402
from sentimerge.pipeline.demonstrations import draw_demonstrations  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def finetune_variant(cfg: RunConfig, run: RunDir, name: str, overrides: dict, *,
                     label: str | None = None) -> report.Variant:
    """Stage 3 with `overrides` of the finetune section, into RUN/report/ablation-<name>; labelled `final (<label>)`
    (default: the name)."""
    changed = variant_config(cfg, {f"finetune.{key}": value for key, value in overrides.items()}, cfg.seed, run.root)
    return report.Variant(f"final ({label or name})", f"ablation-{name}", run.report / f"ablation-{name}", changed)


def seeded_variants(cfg: RunConfig, run: RunDir, variants: list[tuple[str, dict]],
                    stage3_seed: int | None) -> dict[str, report.Variant]:
    """The variants trained with `finetune.seed = stage3_seed` into `ablation-<name>-seed<s>` (the weighting grid's
    folders: `dao-level_ce` names its `dao`, `level_ce` cells), labelled by the name alone so that the seeds of a
    variant pool in the summary; `stage3_seed=None`: as given, into `ablation-<name>`."""
    if stage3_seed is None:
        return {name: finetune_variant(cfg, run, name, overrides) for name, overrides in variants}
    return {name: finetune_variant(cfg, run, f"{name}-seed{stage3_seed}", {**overrides, "seed": stage3_seed},
                                   label=name) for name, overrides in variants}


def with_demonstrations(cfg: RunConfig, k: int) -> RunConfig:
    """`cfg` whose tasks carry K drawn demonstrations each (the command's rule and defaults)."""
    tasks = []
    for task in cfg.tasks:
        splits = load_task_splits(task, data_root=cfg.data_root, cache_dir=cfg.resolved_cache_dir,
                                  seed=cfg.resolved_data_seed)
        demos = draw_demonstrations(task, splits, k, seed=cfg.resolved_data_seed, pool=256,
                                    signals=cfg.experts.curriculum.signals,
                                    label_polarity=cfg.experts.curriculum.label_polarity)
        tasks.append(TaskSpec.model_validate({**task.model_dump(mode="json", exclude_unset=True),
                                              "demonstrations": demos}))
    return cfg.model_copy(update={"tasks": tasks})


def predictions_of(scored: tuple) -> dict[str, list]:
    return {name: [row["prediction"] for row in rows] for name, rows in scored[1].items()}


def compare_run(folder: Path, variants: list[tuple[str, dict]], *, reference_name: str | None = None,
                demonstrations: int = 0, against_multitask: bool = False, data_root: str | None = None,
                stage3_seed: int | None = None) -> list[dict]:
    """One finished run: train the variants' stage 3 (resumable, kept), score them on the run's final-table examples of
    every split and compare each with the reference (and with the multi-task LoRA when asked): one row per variant,
    reference and split, with the mean primary metric of both and the paired bootstrap interval of the difference.
    `stage3_seed`: train every variant with that stage 3 seed instead of the run's (`seeded_variants`); the
    reference must then be one of them (the run's own stage 3 has the run's seed only)."""
    rows = []
    cfg = load_config(folder / "config.yaml", run_dir=str(folder), data_root=data_root)
    run = RunDir(cfg.resolved_run_dir)
    own = report.Variant(f"final ({cfg.finetune.weighting.name})", f"finetune-{cfg.finetune.weighting.name}",
                         run.finetune, cfg)
    if stage3_seed is not None and reference_name is None:
        raise ValueError("stage 3 seeds other than the run's need --reference: the run's own stage 3 has one seed")
    built = seeded_variants(cfg, run, variants, stage3_seed)
    reference = built[reference_name] if reference_name else own
    arms = [variant for variant in built.values() if variant is not reference]
    multitask = report.multitask_variant(cfg, run, report.budgets(cfg)["multitask_steps"]) \
        if against_multitask else None
    if demonstrations:
        demo_cfg = with_demonstrations(cfg, demonstrations)
        arms.append(report.Variant(f"final, {demonstrations} demonstrations",
                                   f"{own.key}-k{demonstrations}", run.finetune, demo_cfg))
    with session(cfg):
        for variant in [reference, *arms]:
            if variant.folder != run.finetune:
                finetune.main(variant.cfg, folder=variant.folder)
        if multitask is not None:
            report.train(multitask, run)
        for split in evaluation_splits(run, cfg):
            examples = final_examples(run, cfg, split)
            gold = {name: [row["label"] for row in data] for name, data in examples.items()}
            base = report.evaluate_variant(reference, run, examples, split=split)
            pairs = [(variant, reference, base) for variant in arms]
            if multitask is not None:
                baseline = report.evaluate_variant(multitask, run, examples, split=split)
                pairs += [(variant, multitask, baseline) for variant in [reference, *arms]]
            for variant, against, against_scored in pairs:
                scored = report.evaluate_variant(variant, run, examples, split=split)
                versus = paired_bootstrap(list(cfg.tasks), gold, predictions_of(scored),
                                          predictions_of(against_scored), seed=cfg.seed)["mean"]
                rows.append({"variant": variant.label, "reference": against.label, "run": str(folder),
                             "seed": cfg.seed if stage3_seed is None else stage3_seed, "split": split,
                             "value": float(scored[0]["primary"].mean()),
                             "reference_value": float(against_scored[0]["primary"].mean()),
                             "difference": versus["difference"], "low": versus["low"], "high": versus["high"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--name", required=True, help="the results file's name: stage3_ablation_<name>")
    parser.add_argument("--variant", action="append", default=[], help="NAME: finetune.key=value, ...")
    parser.add_argument("--reference", help="a variant's name (default: the run's own stage 3)")
    parser.add_argument("--demonstrations", type=int, default=0, help="also score the run's final model with K")
    parser.add_argument("--data-root", help="the runs' data root, for runs whose config.yaml holds it relative to "
                                            "the directory they were started from (benchmarks/sharing.py variants)")
    parser.add_argument("--against-multitask", action="store_true",
                        help="also compare the reference and every variant with the run's multi-task LoRA")
    parser.add_argument("--seeds", type=int, default=0,
                        help="train each variant with K stage 3 seeds (the run's seed, +1, ...) into "
                             "ablation-<name>-seed<s>, the weighting grid's folders; needs --reference")
    parser.add_argument("--record", metavar="KEY", help="record the first variant's mean difference over the runs in "
                                                        "summary.json: KEY on test (it chose nothing), KEY_dev on dev")
    args = parser.parse_args()
    setup_logging()
    variants = [parse_variant(text) for text in args.variant]
    command = "python " + shlex.join(["benchmarks/stage3_ablation.py", *sys.argv[1:]])
    rows = []
    if args.seeds and not args.reference:
        parser.error("--seeds needs --reference: the run's own stage 3 has one seed")
    for folder in args.runs:
        run_seed = load_config(folder / "config.yaml", run_dir=str(folder), data_root=args.data_root).seed
        for stage3_seed in [run_seed + offset for offset in range(args.seeds)] or [None]:
            rows += compare_run(folder, variants, reference_name=args.reference, demonstrations=args.demonstrations,
                                against_multitask=args.against_multitask, data_root=args.data_root,
                                stage3_seed=stage3_seed)
            summary = write_results(args.name, command, pd.DataFrame(rows))
    if args.record:
        first = summary[(summary["variant"] == summary["variant"].iloc[0])
                        & (summary["reference"] == summary["reference"].iloc[0])].set_index("split")
        record({f"{args.record}{'' if split == 'test' else f'_{split}'}": float(first.loc[split, "difference"])
                for split in first.index}, command=command,
               notes=f"{first['variant'].iloc[0]} minus {first['reference'].iloc[0]}, mean over {len(args.runs)} runs")


def write_results(name: str, command: str, rows: pd.DataFrame) -> pd.DataFrame:
    summary = []
    for (variant, reference, split), group in rows.groupby(["variant", "reference", "split"], sort=False):
        differences = group["difference"]
        summary.append({"variant": variant, "reference": reference, "split": split, "runs": len(group),
                        "mean": group["value"].mean(), "reference_mean": group["reference_value"].mean(),
                        "difference": differences.mean(),
                        "sd": differences.std(ddof=1) if len(group) > 1 else np.nan,
                        "ahead": f"{int((differences > 0).sum())} of {len(group)}"})
    summary = pd.DataFrame(summary)
    text = (f"# Stage 3 options against their off-switch: {name}\n\n`{command}`\n\nPer run (mean primary metric over "
            "tasks; difference to the reference with a paired bootstrap 95% interval over the same examples):\n\n"
            + markdown_table(rows) + "\nOver the runs (seeds):\n\n" + markdown_table(summary))
    (RESULTS / f"stage3_ablation_{name}.md").write_text(text, encoding="utf-8")
    (RESULTS / f"stage3_ablation_{name}.json").write_text(json.dumps(
        {"command": command, "rows": report.records(rows), "summary": report.records(summary)}, indent=2) + "\n",
        encoding="utf-8")
    print(text)
    return summary


if __name__ == "__main__":
    main()
