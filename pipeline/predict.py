"""`sentimerge predict --model DIR --task NAME TEXT...`: label texts with an exported model.

Uses only what the export directory holds: the checkpoint, its tokenizer and chat template, and the task specs
(`sentimerge_tasks.yaml`) that say how each task is prompted and answered. Texts come from the command line or
from a file (`--file`, one text per line, or JSON Lines with `text` and `aspect`). Prints one JSON object per text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import positive_int
from pipeline.errors import ModelError, SentimergeError
from pipeline.rundir import EXPORT_TASKS
from pipeline.tasks import TaskSpec


def load_export_tasks(model_dir: Path) -> dict[str, TaskSpec]:
    """The task specs an export directory carries, by name."""
    from pipeline.config import load_tasks_file

    path = model_dir / EXPORT_TASKS
    if not path.is_file():
        raise SentimergeError(f"{model_dir}: not a sentimerge export (no {EXPORT_TASKS})")
    return {task.name: task for task in load_tasks_file(path).tasks}


def read_inputs(texts: list[str], file: str | None, aspect: str | None) -> list[dict]:
    inputs = [{"text": text, "aspect": aspect} for text in texts]
    if file:
        path = Path(file)
        if not path.is_file():
            raise SentimergeError(f"{path}: file not found")
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):  # BOM or not
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SentimergeError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(row.get("text"), str):
                    raise SentimergeError(f"{path}:{number}: needs a `text` string")
                inputs.append({"text": row["text"], "aspect": row.get("aspect", aspect)})
            else:
                inputs.append({"text": line, "aspect": aspect})
    if not inputs:
        raise SentimergeError("predict: give texts on the command line or --file")
    return inputs


def predict(model, tokenizer, task: TaskSpec, inputs: list[dict], *, batch_size: int = 16) -> list[dict]:
    """Label (with its probability) or score (with the level distribution) per input."""
    from pipeline.scoring import score_task

    scores = score_task(model, tokenizer, task, inputs, batch_size=batch_size)
    probs, ties = scores.probs, scores.ties.tolist()
    results = []
    for row, (item, prediction) in enumerate(zip(inputs, scores.predictions)):
        result = {"text": item["text"], **({"aspect": item["aspect"]} if item.get("aspect") else {})}
        if task.kind == "classification":
            result.update(label=prediction, probability=round(float(probs[row].max()), 4))
            if ties[row]:  # two answers equally likely: the label is the first of them in the task's list
                result["tie"] = True
        else:
            result.update(score=round(float(prediction), 4),
                          levels={answer: round(float(p), 4) for answer, p in zip(task.answers, probs[row])})
        results.append(result)
    return results


def main(model_dir: str, task_name: str, texts: list[str], *, file: str | None = None, aspect: str | None = None,
         dtype: str = "bfloat16", batch_size: int = 16) -> list[dict]:
    from pipeline.config import suggest
    from pipeline.models import check_model_dir, load_model, pick_device

    folder = Path(model_dir)
    check_model_dir(folder)
    tasks = load_export_tasks(folder)
    if task_name not in tasks:
        raise SentimergeError(f"{folder}: no task {task_name!r}{suggest(task_name, list(tasks))}")
    task = tasks[task_name]
    inputs = read_inputs(texts, file, aspect)
    if "aspect" in task.input_fields and any(not item.get("aspect") for item in inputs):
        raise SentimergeError(f"task {task_name} needs an aspect: pass --aspect or `aspect` in the JSON lines")
    model, tokenizer = load_model(str(folder), dtype=dtype, device=pick_device("auto"))
    try:
        results = predict(model, tokenizer, task, inputs, batch_size=batch_size)
    except ModelError as error:
        raise ModelError(f"{folder}: {error}") from None
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an export directory (`sentimerge export` writes one)")
    parser.add_argument("--task", required=True, help="the task to answer, by name")
    parser.add_argument("texts", nargs="*", metavar="TEXT")
    parser.add_argument("--file", help="texts, one per line, or JSON Lines with `text` (and `aspect`)")
    parser.add_argument("--aspect", help="the aspect (target) for aspect-based tasks")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch-size", type=positive_int, default=16)


def run_from_args(args: argparse.Namespace, cfg: None) -> None:
    main(args.model, args.task, args.texts, file=args.file, aspect=args.aspect, dtype=args.dtype,
         batch_size=args.batch_size)


if __name__ == "__main__":
    from pipeline.cli import run_module

    sys.exit(run_module("predict"))
