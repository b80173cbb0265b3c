"""`sentimerge predict --model DIR --task NAME TEXT...`: label texts with an exported model.

Uses only what the export directory holds: the checkpoint, its tokenizer and chat template, and the task specs
(`sentimerge_tasks.yaml`) that say how each task is prompted and answered. Texts come from the command line or
from a file (`--file`, one text per line, or JSON Lines with `text` and `aspect`). Prints one JSON object per text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sentimerge.pipeline.core.config import positive_int
from sentimerge.pipeline.core.errors import ModelError, SentimergeError
from sentimerge.pipeline.core.rundir import EXPORT_TASKS
from sentimerge.pipeline.core.tasks import TaskSpec


def load_export_tasks(model_dir: Path) -> dict[str, TaskSpec]:
    """The task specs an export directory carries, by name."""
    from sentimerge.pipeline.core.config import load_tasks_file

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
    from sentimerge.pipeline.core.scoring import score_task

    scores = score_task(model, tokenizer, task, inputs, batch_size=batch_size)
    return _rows(task, inputs, scores, scores.predictions)


def _rows(task: TaskSpec, inputs: list[dict], scores, predictions: list) -> list[dict]:
    probs, ties = scores.probs, scores.ties.tolist()
    results = []
    for row, (item, prediction) in enumerate(zip(inputs, predictions)):
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


class SentimentModel:
    """An exported sentimerge checkpoint, ready to label texts for any of its tasks (`sentimerge.load_model`).

    `tasks` maps each task's name to its spec (labels or score range, prompt). The model answers the way every
    table of the pipeline scored it: each allowed answer's log-probability after the task's prompt, LM head in
    float32."""

    def __init__(self, folder: str | Path, *, dtype: str = "bfloat16", device: str = "auto"):
        from sentimerge.pipeline.core import models

        self.folder = Path(folder)
        models.check_model_dir(self.folder)
        self.tasks: dict[str, TaskSpec] = load_export_tasks(self.folder)
        self.model, self.tokenizer = models.load_model(str(self.folder), dtype=dtype,
                                                       device=models.pick_device(device))

    def __repr__(self) -> str:
        return f"SentimentModel({str(self.folder)!r}, tasks={list(self.tasks)})"

    def _scores(self, task: str, inputs: list[dict], batch_size: int):
        from sentimerge.pipeline.core.config import suggest
        from sentimerge.pipeline.core.scoring import score_task

        if task not in self.tasks:
            raise SentimergeError(f"{self.folder}: no task {task!r}{suggest(task, list(self.tasks))}")
        spec = self.tasks[task]
        if "aspect" in spec.input_fields and any(not item.get("aspect") for item in inputs):
            raise SentimergeError(f"task {task} needs an aspect for every text")
        try:
            scores = score_task(self.model, self.tokenizer, spec, inputs, batch_size=batch_size)
            predictions = scores.predictions  # raises ModelError on non-finite scores: named with the folder here
        except ModelError as error:
            raise ModelError(f"{self.folder}: {error}") from None
        return spec, scores, predictions

    def predict_rows(self, task: str, inputs: list[dict], *, batch_size: int = 16) -> list[dict]:
        """One dict per input row `{"text": ..., "aspect": ...}`: what `sentimerge predict` prints."""
        spec, scores, predictions = self._scores(task, inputs, batch_size)
        return _rows(spec, inputs, scores, predictions)

    def predict(self, texts: str | Sequence[str], task: str, *, aspects: str | Sequence[str] | None = None,
                batch_size: int = 16) -> pd.DataFrame:
        """Label (classification) or score (regression) each text for `task`, in batches of `batch_size`.

        Returns one row per text: `text` (and `aspect`), then for a classification task `label`, `probability`
        (of that label, renormalised over the task's labels) and `tie` (True when two labels were equally likely;
        the first listed was taken); for a regression task `score` (the expected value in the task's range); then
        `p(<answer>)` for every label or every level of the scale. `aspects`: one string for every text or one per
        text (aspect-based tasks need them).

        Raises: `SentimergeError` for an unknown task, a missing aspect or as many aspects as texts; `ModelError`
        when the model yields non-finite scores."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        aspects = [aspects] * len(texts) if aspects is None or isinstance(aspects, str) else list(aspects)
        if len(aspects) != len(texts):
            raise SentimergeError(f"predict: {len(texts)} texts but {len(aspects)} aspects")
        inputs = [{"text": text, "aspect": aspect} for text, aspect in zip(texts, aspects)]
        spec, scores, predictions = self._scores(task, inputs, batch_size)
        probs = scores.probs.float().numpy()
        frame = pd.DataFrame({"text": texts, **({"aspect": aspects} if any(aspects) else {})})
        if spec.kind == "classification":
            frame["label"] = list(predictions)
            frame["probability"] = probs.max(axis=1).round(4)
            frame["tie"] = scores.ties.numpy().astype(bool)
        else:
            frame["score"] = [round(float(value), 4) for value in predictions]
        for column, answer in enumerate(spec.answers):
            frame[f"p({answer})"] = probs[:, column].round(4)
        return frame


def load_model(folder: str | Path, *, dtype: str = "bfloat16", device: str = "auto") -> SentimentModel:
    """An exported checkpoint (`sentimerge export` writes one; `sentimerge.export_dir(cfg)` finds it) as a
    `SentimentModel`. `dtype`: bfloat16, float16 or float32; `device`: auto, cpu, cuda or mps.

    Raises: `SentimergeError` when the folder is not a sentimerge export."""
    return SentimentModel(folder, dtype=dtype, device=device)


def main(model_dir: str, task_name: str, texts: list[str], *, file: str | None = None, aspect: str | None = None,
         dtype: str = "bfloat16", batch_size: int = 16) -> list[dict]:
    from sentimerge.pipeline.core.config import suggest
    from sentimerge.pipeline.core.models import check_model_dir

    folder = Path(model_dir)
    check_model_dir(folder)
    tasks = load_export_tasks(folder)  # everything about the input is checked before the model loads
    if task_name not in tasks:
        raise SentimergeError(f"{folder}: no task {task_name!r}{suggest(task_name, list(tasks))}")
    inputs = read_inputs(texts, file, aspect)
    if "aspect" in tasks[task_name].input_fields and any(not item.get("aspect") for item in inputs):
        raise SentimergeError(f"task {task_name} needs an aspect: pass --aspect or `aspect` in the JSON lines")
    results = load_model(folder, dtype=dtype).predict_rows(task_name, inputs, batch_size=batch_size)
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
    from sentimerge.pipeline.cli import run_module

    sys.exit(run_module("predict"))
