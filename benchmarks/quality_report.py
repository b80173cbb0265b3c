"""The quality report (`sentimerge report`) of a run, kept with the benchmark results.

    python benchmarks/quality_report.py configs/suite.yaml --run-dir SUITE_RUN [--weightings dao,static,...] [--seeds K]

Runs the missing stages and the report's variants (finished ones are skipped: pipeline/report.py), then copies
`<run>/report/report.{md,json}` to benchmarks/results/quality_report_<name>.{md,json} and records the headline
figures in summary.json: retention of the evolved merge and of the run's final model, the weak-vs-gold Spearman over
stage 2's final table, and dao's mean primary metric relative to static (in %); with `--seeds K`, the run's
weighting over K stage 3 seeds (mean, sd, mean difference to static) and the multi-task LoRA's mean. Keys are
`suite_...` for the suite config, `<name>_...` for any other.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import record  # noqa: E402
from sentimerge.pipeline import report  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, run_lock  # noqa: E402
from sentimerge.pipeline.core.runtime import seed_everything, set_threads, setup_logging  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def headline(cfg, result: dict) -> dict[str, float]:
    """The summary keys this report measures (a figure the report could not compute is left out)."""
    retention = result["retention"]
    final = f"final ({cfg.finetune.weighting.name})"
    values = {"retention_evolved": retention["evolved merge"]["of_means"],
              "retention_final": retention[final]["of_means"] if final in retention else None,
              "retention_multitask_lora": retention.get(report.MULTITASK, {}).get("of_means"),
              "weak_gold_spearman": result["weak_vs_gold_spearman"]["final_table"],
              "dao_vs_static_primary_pct": (result["versus_static"] or {}).get("mean_primary_pct", {}).get("dao")}
    seeds = result.get("seeds", {})
    for row in seeds.get("table", []):  # across stage 3 seeds
        if row["model"] == final:
            values.update({"stage3_seeds": seeds["count"], "final_mean_over_seeds": row["mean"],
                           "final_sd_over_seeds": row["sd"],
                           f"{cfg.finetune.weighting.name}_minus_static_over_seeds": row.get("minus static")})
        elif row["model"] == report.MULTITASK:
            values["multitask_lora_mean_over_seeds"] = row["mean"]
    for name, comparison in (result.get("evolved_vs_baselines") or {}).items():  # from stage 2's final table
        values[f"evolved_minus_{name}"] = comparison["mean"]["difference"]
        values[f"evolved_beats_{name}_share"] = comparison["mean"]["p_better"]
    return {f"{cfg.name}_{key}": value for key, value in values.items() if value is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--weightings", default=",".join(report.WEIGHTINGS))
    parser.add_argument("--seeds", type=int, default=1, help="stage 3 seeds per fine-tuned variant (default 1)")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config, run_dir=args.run_dir)
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    command = "python " + shlex.join(["benchmarks/quality_report.py", *sys.argv[1:]])
    run = RunDir(cfg.resolved_run_dir)
    with run_lock(run):
        report.main(cfg, weightings=args.weightings.split(","), seeds=args.seeds, command=command)
    for suffix in ("md", "json"):
        shutil.copyfile(run.report / f"report.{suffix}", RESULTS / f"quality_report_{cfg.name}.{suffix}")
    result = json.loads((run.report / "report.json").read_text(encoding="utf-8"))
    record(headline(cfg, result), command=command)
    print(f"copied to {RESULTS / f'quality_report_{cfg.name}.md'}")


if __name__ == "__main__":
    main()
