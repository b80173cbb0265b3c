"""Stage 3's teacher forward (`finetune.distill`): peft's mixed-adapter batch against one forward per task.

    python benchmarks/teacher_forward.py RUN --name NAME [--steps 20] [--per-task 2]

RUN is a finished run directory with experts (its `config.yaml` is the config it ran with). Both ways score the same
stage 3 batches (`per_task` training examples of every task per batch, drawn as stage 3 draws them) with the experts
loaded once by `ExpertTeachers`: `batch_logits` (the committed way: one forward of the whole batch, every row through
its own expert's adapter, `adapter_names`) and one forward per task of that task's rows with its adapter set
(`set_adapter`, the way the first distillation runs were measured). First both score the first batches in float32,
where their teacher distributions must agree to 1e-4 (or it stops): the same computation. Then each is timed in
the config's dtype on a second pass (the first builds the kernels), in the same process, alternating; the largest
difference of their bf16 distributions at the answer positions is reported beside the times (bf16 rounds the two
batch shapes differently). Writes benchmarks/results/teacher_forward_NAME.{md,json}: seconds per batch, their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine  # noqa: E402
from sentimerge.experts.distill import ExpertTeachers, aligned_logits  # noqa: E402
from sentimerge.experts.multitask import TaskBalancedSampler  # noqa: E402
from sentimerge.experts.train import answer_logits, collate  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.models import pick_device  # noqa: E402
from sentimerge.pipeline.core.prompts import training_example  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir  # noqa: E402
from sentimerge.pipeline.core.runtime import set_threads, setup_logging  # noqa: E402
from sentimerge.pipeline.core.upstream import load_prepared, merge_base_path  # noqa: E402


def per_task_forward(teachers: ExpertTeachers, tasks: list[str], rows: list, pad_id: int, answer_width: int,
                     use_autocast: bool) -> torch.Tensor:
    """The teachers' logits [B, answer_width, vocab] from one forward per task (`set_adapter`), aligned as
    `ExpertTeachers.batch_logits` aligns them."""
    model = teachers._lora

    def forward(task: str) -> tuple[list[int], torch.Tensor]:
        picked = [row for row, name in enumerate(tasks) if name == task]
        model.set_adapter(task)
        with torch.no_grad():
            return picked, answer_logits(model, collate([rows[row] for row in picked], pad_id), teachers.device,
                                         use_autocast=use_autocast)

    return aligned_logits((forward(task) for task in dict.fromkeys(tasks)), len(rows), answer_width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--name", required=True, help="results go to benchmarks/results/teacher_forward_NAME.*")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-task", type=int, default=2)
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(Path(args.run) / "config.yaml", run_dir=args.run)
    set_threads(cfg.threads)
    run = RunDir(cfg.resolved_run_dir)
    base = merge_base_path(run, bool(cfg.experts.shared.examples))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    names = [task.name for task in cfg.tasks]
    adapters = {name: run.expert_adapter(name) for name in names}
    train = {task.name: load_prepared(run, task.name, "train") for task in cfg.tasks}
    sampler = TaskBalancedSampler([len(train[name]) for name in names], args.per_task, cfg.seed)
    batches = []
    for _ in range(args.steps):
        drawn = sampler.next_batch()
        rows = [training_example(tokenizer, cfg.tasks[t], train[names[t]][i]) for t, i in drawn]
        batches.append(([names[t] for t, _ in drawn], rows, collate(rows, tokenizer.pad_token_id)["answer_width"]))
    exact = ExpertTeachers(base, adapters=adapters, checkpoints={}, dtype="float32", device=pick_device(cfg.device))
    for tasks, rows, width in batches[:3]:
        mixed = exact.batch_logits(tasks, rows, tokenizer.pad_token_id, width, use_autocast=False)
        apart = per_task_forward(exact, tasks, rows, tokenizer.pad_token_id, width, False)
        answered = collate(rows, tokenizer.pad_token_id)["labels"][:, -width:] != -100  # zeros elsewhere in either
        if not torch.allclose(mixed.softmax(-1)[answered], apart.softmax(-1)[answered], atol=1e-4):
            raise SystemExit("in float32 the two ways' teacher distributions differ: not the same computation")
    del exact
    teachers = ExpertTeachers(base, adapters=adapters, checkpoints={}, dtype=cfg.base_model.dtype,
                              device=pick_device(cfg.device))
    autocast = cfg.finetune.autocast
    ways = {
        "mixed-adapter batch (committed)": lambda tasks, rows, width: teachers.batch_logits(
            tasks, rows, tokenizer.pad_token_id, width, use_autocast=autocast),
        "one forward per task": lambda tasks, rows, width: per_task_forward(
            teachers, tasks, rows, tokenizer.pad_token_id, width, autocast),
    }
    seconds = {name: [] for name in ways}
    largest = 0.0
    for timed in (False, True):
        for tasks, rows, width in batches:
            outputs = {}
            for name, way in ways.items():
                started = time.perf_counter()
                outputs[name] = way(tasks, rows, width)
                if timed:
                    seconds[name].append(time.perf_counter() - started)
            first, second = (output.float().softmax(-1) for output in outputs.values())
            answered = collate(rows, tokenizer.pad_token_id)["labels"][:, -width:] != -100
            largest = max(largest, float((first - second).abs().amax(-1)[answered].max()))
    committed, per_task = (float(np.median(values)) for values in seconds.values())
    result = {"run": args.run, "steps": args.steps, "rows_per_batch": args.per_task * len(names),
              "seconds_per_batch": {name: round(float(np.median(v)), 4) for name, v in seconds.items()},
              "per_task_over_mixed": round(per_task / committed, 3),
              "largest_probability_difference": round(largest, 4), "machine": machine()}
    out = ROOT / "benchmarks" / "results"
    (out / f"teacher_forward_{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Stage 3's teacher forward: mixed-adapter batch against one forward per task", "",
             f"`python benchmarks/teacher_forward.py {args.run} --name {args.name} --steps {args.steps} --per-task "
             f"{args.per_task}`; {machine()}; {result['rows_per_batch']} rows per batch, medians over {args.steps} "
             "batches (second pass).",
             "", "| way | seconds per batch |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in result["seconds_per_batch"].items()]
    lines += ["", f"One forward per task takes {result['per_task_over_mixed']:.2f}x the mixed-adapter batch's time. "
              "In float32 the two give the same teacher distributions (to 1e-4); in the config's dtype they differ "
              f"by up to {largest:.3f} in probability at an answer position (bf16 rounds the two batch shapes "
              "differently)."]
    (out / f"teacher_forward_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
