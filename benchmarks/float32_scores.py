"""How much did scoring from a float32 LM head move the tables? The same models, scored both ways, side by side.

    python benchmarks/float32_scores.py CONFIG --run-dir R [--batch-size 16]

For a finished search, every model of stage 2's final tables (zero-shot base, each expert, uniform, TIES, the evolved
merge; merged in memory exactly as the search scores them) and the exported model, on the final tables' examples of
each evaluation split (dev, and test where every task has one), scored with the LM head in bf16 (the scorer before
2026-11-30) and in float32 (`sentimerge.pipeline.core.scoring.float32_head`). Reports each model's mean primary metric both ways,
the difference, how many classification predictions changed, and how many examples had two exactly tied answers.
Writes benchmarks/results/float32_scores_<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import finished_search, machine, record  # noqa: E402
from sentimerge.merge.engine import InMemoryMerge  # noqa: E402
from sentimerge.merge.fitness import encode_set  # noqa: E402
from sentimerge.merge.methods import get_method  # noqa: E402
from sentimerge.pipeline.core import scoring  # noqa: E402
from sentimerge.pipeline.core.candidates import load_search_inputs
from sentimerge.pipeline.core.evaluation import evaluation_splits, final_examples, markdown_table
from sentimerge.pipeline.core.metrics import compute_metrics  # noqa: E402
from sentimerge.pipeline.core.models import load_model  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir, is_done, write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HEADS = {"bf16 head": lambda model: contextlib.nullcontext(), "float32 head": scoring.float32_head}


def score_both_ways(model, tokenizer, sets, batch_size: int) -> dict[str, dict]:
    """Per head: each task's primary metric, the mean, the predictions and the number of tied examples."""
    result = {}
    for head_name, head in HEADS.items():
        tasks, predictions, ties = {}, {}, 0
        with mock.patch.object(scoring, "float32_head", head):
            for scored in sets:
                logprobs = scoring.score_prompts(model, scored.prompts, scored.answers,
                                                 pad_id=tokenizer.pad_token_id, batch_size=batch_size)
                scores = scoring.TaskScores(scored.task, logprobs)
                predictions[scored.task.name] = scores.predictions
                ties += int(scores.ties.sum())
                tasks[scored.task.name] = compute_metrics(scored.task, scored.labels,
                                                          predictions[scored.task.name])["primary"]
        result[head_name] = {"tasks": tasks, "mean": float(np.mean(list(tasks.values()))),
                             "predictions": predictions, "ties": ties}
    return result


def changed_predictions(sets, both: dict[str, dict]) -> int:
    return sum(a != b for scored in sets if scored.task.kind == "classification"
               for a, b in zip(*(both[head]["predictions"][scored.task.name] for head in HEADS)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--batch-size", type=int, help="scoring batch (default: the search's, so that the float32 "
                        "column reproduces its final tables; bf16 model math moves a few predictions with the batch)")
    args = parser.parse_args()
    cfg, run = finished_search(args.config, args.run_dir)
    args.batch_size = args.batch_size or cfg.search.batch_size
    started = time.time()
    table = compare_heads(cfg, run, args.batch_size)
    command = "python " + shlex.join(["benchmarks/float32_scores.py", *sys.argv[1:]])
    examples = {split: {name: len(rows) for name, rows in final_examples(run, cfg, split).items()}
                for split in evaluation_splits(run, cfg)}
    text = (f"# Scores from a bf16 and a float32 LM head ({cfg.name})\n\n{time.strftime('%Y-%m-%d')}, {machine()}, "
            f"seed {cfg.seed}, model in bf16, scoring batch {args.batch_size}; `{command}` "
            f"({time.time() - started:.0f} s). The same models on the same examples ({examples}); mean of the tasks' "
            "primary metrics; `changed`: classification predictions that differ; `ties`: examples whose two best "
            "answers scored exactly the same (the first listed was taken).\n\n" + markdown_table(table))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"float32_scores_{cfg.name}.json", {"command": command, "examples": examples,
                                                                    "rows": table.to_dict(orient="records")})
    write_text_atomic(RESULTS / f"float32_scores_{cfg.name}.md", text)
    record({f"{cfg.name}_bf16_ties_share": table["ties bf16"].sum() / max(1, table["examples"].sum()),
            f"{cfg.name}_float32_ties_share": table["ties float32"].sum() / max(1, table["examples"].sum())},
           notes="share of scored examples (every final-table model, every split) whose two best answers tied")
    print(text)


def compare_heads(cfg, run: RunDir, batch_size: int) -> pd.DataFrame:
    """One row per evaluation split and model: mean primary metric from each head, changed predictions, ties."""
    model, tokenizer, adapters, genome = load_search_inputs(cfg, run)
    baselines = json.loads(run.search_baselines.read_text(encoding="utf-8"))
    selected = json.loads(run.search_selected.read_text(encoding="utf-8"))
    models = [(name, b["method"], b["coefficients"]) for name, b in baselines.items() if not name.startswith("uniform@")]
    models.append(("evolved", cfg.search.method, selected["coefficients"]))
    rows = []
    for split in evaluation_splits(run, cfg):
        data = final_examples(run, cfg, split)
        sets = [encode_set(tokenizer, task, data[task.name], [e["label"] for e in data[task.name]])
                for task in cfg.tasks]
        for name, method, coefficients in models:  # one merger at a time, each on the restored base
            merger = InMemoryMerge(model, adapters, genome, get_method(method), density=cfg.search.density,
                                   seed=cfg.seed, keep_deltas=False)
            merger.apply(np.asarray(coefficients, dtype=float))
            rows.append(_row(split, name, sets, score_both_ways(model, tokenizer, sets, batch_size)))
            merger.restore()
        if is_done(run.export):
            exported, _ = load_model(str(run.export), dtype=cfg.export.dtype)
            rows.append(_row(split, "final (export)", sets, score_both_ways(exported, tokenizer, sets, batch_size)))
    return pd.DataFrame(rows)


def _row(split: str, name: str, sets, both: dict[str, dict]) -> dict:
    bf16, float32 = both["bf16 head"], both["float32 head"]
    return {"split": split, "model": name, "examples": sum(len(s.examples) for s in sets),
            "mean bf16": bf16["mean"], "mean float32": float32["mean"],
            "float32 - bf16": float32["mean"] - bf16["mean"], "changed": changed_predictions(sets, both),
            "ties bf16": bf16["ties"], "ties float32": float32["ties"]}


if __name__ == "__main__":
    main()
