"""Loading a task's rows: files are read by `datasets`, then mapped onto canonical examples and validated.

A canonical example is a dict `{"id", "text", "aspect", "label", "meta"}`: `label` is a string of the task's label set
(classification) or a float inside the task's range (regression); `meta` carries per-example metadata (annotator
agreement, domain, ...) through to the curriculum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sentimerge.pipeline.core.errors import DataError, first_line
from sentimerge.pipeline.core.pypi import fetch_pypi_file
from sentimerge.pipeline.core.tasks import SPLITS, TaskSpec

log = logging.getLogger(__name__)

Example = dict[str, Any]
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet"}


def load_task_splits(task: TaskSpec, *, data_root: str | None, cache_dir: Path, seed: int,
                     splits: tuple[str, ...] | None = None) -> dict[str, list[Example]]:
    """Every split of `task` (or just `splits`) as validated canonical examples, subsampled as the spec says."""
    source = task.source
    if source.carve is not None:
        frame, origin = _load_frame(task, None, data_root, cache_dir)
        examples = _canonical(task, frame, origin)
        result = _carve(task, examples, seed)
    else:
        result = {}
        for split in available_splits(task, data_root):
            if splits is not None and split not in splits:
                continue
            frame, origin = _load_frame(task, split, data_root, cache_dir)
            result[split] = _canonical(task, frame, origin, labelled=not (split == "train" and source.unlabelled_train))
    if splits is not None:
        missing = [split for split in splits if split not in result]
        if missing:
            raise DataError(f"task {task.name}: no {'/'.join(missing)} split (it has {', '.join(result) or 'none'})")
        result = {split: result[split] for split in splits}
    for split, examples in result.items():
        if not examples:
            raise DataError(f"task {task.name}: the {split} split is empty")
        limit = task.max_examples.get(split)
        if limit is not None and len(examples) > limit:
            result[split] = sample_examples(examples, limit, seed, f"{task.name}/{split}")
    return result


def available_splits(task: TaskSpec, data_root: str | None) -> list[str]:
    """The splits a (not carved) source has: those of `split_names`, and `test` where a local `{split}` path has a
    test file beside the others although `split_names` does not list it."""
    splits = list(task.source.split_names)
    template = task.source.path
    if (template is not None and "{split}" in template and "test" not in splits
            and ("{data_root}" not in template or data_root is not None)
            and _local_path(task, "test", data_root).is_file()):
        splits.append("test")
    return splits


def source_location(task: TaskSpec, split: str | None, data_root: str | None) -> str:
    """Human-readable name of where a split comes from (a path, a hub id, a package member)."""
    source = task.source
    if source.path is not None:
        return _local_path(task, split, data_root).as_posix()
    if source.hub is not None:
        return f"hub:{source.hub}" + (f"/{source.hub_name}" if source.hub_name else "") + (f"[{split}]" if split else "")
    return f"pypi:{source.pypi.package}=={source.pypi.version}/{source.pypi.member}" + (
        f"/{source.pypi.inner}" if source.pypi.inner else "")


def _local_path(task: TaskSpec, split: str | None, data_root: str | None) -> Path:
    template = task.source.path
    if "{data_root}" in template and data_root is None:
        raise DataError(f"task {task.name}: source.path uses {{data_root}} but no data root is set (use --data-root)")
    if "{split}" in template and split is None:
        raise DataError(f"task {task.name}: source.path has {{split}} but `carve` asks for one table")
    if "{split}" not in template and split is not None:
        raise DataError(f"task {task.name}: source.path has no {{split}}; give `carve` to split one table")
    name = task.source.split_names.get(split, split) if split else None
    return Path(template.format(data_root=data_root or "", task=task.name, split=name or ""))


def _load_frame(task: TaskSpec, split: str | None, data_root: str | None, cache_dir: Path) -> tuple[pd.DataFrame, str]:
    import datasets

    source = task.source
    datasets_cache = str(cache_dir / "datasets")
    if source.hub is not None:
        hub_split = source.split_names.get(split, split) if split else "train"
        try:
            dataset = datasets.load_dataset(source.hub, source.hub_name, split=hub_split, revision=source.revision,
                                            cache_dir=datasets_cache)
        except Exception as error:  # datasets raises many types; the message is what the user needs
            raise DataError(f"task {task.name}: cannot load hub dataset {source.hub!r} split {hub_split!r}: "
                            f"{first_line(error)}") from None
        return dataset.to_pandas(), source_location(task, split, data_root)
    if source.pypi is not None:
        path = fetch_pypi_file(source.pypi, cache_dir)
        origin = source_location(task, split, data_root)
    else:
        path = _local_path(task, split, data_root)
        origin = path.as_posix()
    if not path.is_file():
        raise DataError(f"task {task.name}: data file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{origin}: file is empty")
    file_format = source.format or _FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise DataError(f"task {task.name}: cannot tell the format of {path}; set source.format")
    if file_format == "jsonl":
        _check_jsonl(path)
        builder, options = "json", {}
    elif file_format in ("csv", "tsv"):
        builder, options = "csv", {"sep": "\t" if file_format == "tsv" else ",", **source.read_options}
    else:
        builder, options = "parquet", {}
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=datasets_cache,
                                        **options)
    except Exception as error:
        raise DataError(f"{origin}: cannot read as {file_format}: {first_line(error)}") from None
    return dataset.to_pandas(), origin


def _check_jsonl(path: Path) -> None:
    """Name the first line that is not a JSON object (datasets' own error does not say which)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")


def _canonical(task: TaskSpec, frame: pd.DataFrame, origin: str, *, labelled: bool = True) -> list[Example]:
    """The frame's rows as canonical examples; `labelled=False` (an unlabelled train split): every label is None."""
    source = task.source
    line_offset = 2 if origin.endswith((".csv", ".tsv")) else 1
    frame = frame.reset_index(drop=True)
    frame["__line__"] = frame.index + line_offset
    for column, value in source.where.items():
        if column not in frame.columns:
            raise DataError(f"{origin}: `where` names missing column {column!r} (columns: {', '.join(map(str, frame.columns[:-1]))})")
        frame = frame[frame[column].astype(str) == str(value)]
    for column, minimum in source.at_least.items():
        if column not in frame.columns:
            raise DataError(f"{origin}: `at_least` names missing column {column!r} (columns: {', '.join(map(str, frame.columns[:-1]))})")
        frame = frame[pd.to_numeric(frame[column], errors="coerce") >= minimum]
    needed = {"text": True, "label": labelled, "aspect": "aspect" in task.input_fields, "id": False}
    columns = {field: source.columns.get(field, field) for field in needed}
    available = [str(c) for c in frame.columns if c != "__line__"]
    for field, required in needed.items():
        if required and columns[field] not in frame.columns:
            raise DataError(f"{origin}: missing column {columns[field]!r} for {field} (columns: {', '.join(available)})")
    for key, column in source.meta_columns.items():
        if column not in frame.columns:
            raise DataError(f"{origin}: missing column {column!r} for meta.{key} (columns: {', '.join(available)})")
    has_meta = "meta" in frame.columns
    examples = []
    for row in frame.to_dict("records"):
        where = f"{origin}:{row['__line__']}" if line_offset == 1 else f"{origin} row {row['__line__'] - 1}"
        text = row[columns["text"]]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: {columns['text']!r} must be non-empty text, got {text!r}")
        aspect = None
        if needed["aspect"]:
            aspect = row[columns["aspect"]]
            if not isinstance(aspect, str) or not aspect.strip():
                raise DataError(f"{where}: {columns['aspect']!r} must be non-empty text, got {aspect!r}")
        label = _label(task, row[columns["label"]], where, columns["label"]) if labelled else None
        meta = dict(row["meta"]) if has_meta and isinstance(row["meta"], dict) else {}
        meta = {k: _plain(v) for k, v in meta.items() if v is not None}
        meta.update({key: _plain(row[column]) for key, column in source.meta_columns.items()})
        identifier = row.get(columns["id"]) if columns["id"] in frame.columns else None
        if identifier is None or (isinstance(identifier, float) and math.isnan(identifier)):
            identifier = f"{task.name}-" + hashlib.sha1(f"{text}\x00{aspect}".encode()).hexdigest()[:12]
        examples.append({"id": str(identifier), "text": text, "aspect": aspect, "label": label, "meta": meta})
    return examples


def _label(task: TaskSpec, value: Any, where: str, column: str) -> str | float:
    if task.source.label_map is not None:
        key = _label_key(value)
        if key not in task.source.label_map:
            raise DataError(f"{where}: {column!r} value {key!r} is not in label_map ({', '.join(task.source.label_map)})")
        value = task.source.label_map[key]
    if task.kind == "classification":
        value = _label_key(value)
        if value not in task.labels:
            raise DataError(f"{where}: label {value!r} is not one of {task.labels}")
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: regression label is missing")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: regression label {value!r} is not a number") from None
    low, high = task.range
    if not math.isfinite(number) or not low <= number <= high:
        raise DataError(f"{where}: regression label {number} is outside the range [{low}, {high}]")
    return number


def _label_key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _plain(value: Any) -> Any:
    """numpy scalars to Python scalars, so metadata serialises as JSON."""
    return value.item() if isinstance(value, np.generic) else value


def _carve(task: TaskSpec, examples: list[Example], seed: int) -> dict[str, list[Example]]:
    """Split one table into the shares of `carve`, seeded and stratified by label (by quantile for regression).

    Rows with the same input are kept together so that no text is in two splits.
    """
    from sklearn.model_selection import train_test_split

    groups: dict[tuple, list[Example]] = defaultdict(list)
    for example in examples:
        groups[(_carve_key(example["text"]), example["aspect"])].append(example)
    keys = list(groups)
    strata = [_stratum(task, groups[key][0]["label"]) for key in keys]
    if task.kind == "regression":
        strata = list(pd.qcut(pd.Series(strata), q=min(5, len(set(strata))), labels=False, duplicates="drop"))
    shares = dict(task.source.carve)
    result: dict[str, list[Example]] = {}
    remaining, remaining_strata, remaining_share = keys, strata, 1.0
    for split in [s for s in SPLITS if s in shares and s != "train"]:
        fraction = shares[split] / remaining_share
        stratify = remaining_strata if _can_stratify(remaining_strata, fraction) else None
        remaining, taken, remaining_strata, _ = train_test_split(
            remaining, remaining_strata, test_size=fraction, random_state=seed, stratify=stratify)
        result[split] = [example for key in taken for example in groups[key]]
        remaining_share -= shares[split]
    result["train"] = [example for key in remaining for example in groups[key]]
    return {split: result[split] for split in SPLITS if split in result}


def _stratum(task: TaskSpec, label: str | float) -> Any:
    return label if task.kind == "classification" else float(label)


def _can_stratify(strata: list, fraction: float) -> bool:
    counts = pd.Series(strata).value_counts()
    return len(counts) > 1 and counts.min() >= 2 and fraction * len(strata) >= len(counts)


def sample_examples(examples: list[Example], limit: int, seed: int, salt: str) -> list[Example]:
    """A seeded sample that keeps file order; the same seed and salt always pick the same rows."""
    rng = np.random.default_rng([seed, int(hashlib.sha1(salt.encode()).hexdigest()[:8], 16)])
    chosen = np.sort(rng.choice(len(examples), size=limit, replace=False))
    return [examples[i] for i in chosen]


def _carve_key(text: str) -> str:
    """The text as carving groups rows. Not `_normalise`: a different grouping would carve every split anew, and the
    splits that every earlier number was measured on would change; the leak check reports what this one misses."""
    return re.sub(r"\s+", " ", text.strip().lower())


def _normalise(text: str) -> str:
    """The text as a leak or duplicate check compares it: Unicode NFKC (NFC and NFD forms, full-width letters are
    one text), case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).strip().casefold())


def _input_key(example: Example) -> str:
    return _normalise(example["text"]) + "\x00" + (example["aspect"] or "")


def find_conflicts(data: dict[str, dict[str, list[Example]]]) -> list[dict]:
    """Inputs (text and aspect) that a split of a classification task holds more than once with different labels."""
    conflicts = []
    for task, splits in data.items():
        for split, examples in splits.items():
            labels: dict[str, set] = defaultdict(set)
            first: dict[str, Example] = {}
            for example in examples:
                if isinstance(example["label"], str):
                    key = _input_key(example)
                    labels[key].add(example["label"])
                    first.setdefault(key, example)
            conflicts += [{"task": task, "split": split, "id": first[key]["id"], "labels": sorted(found),
                           "text": first[key]["text"][:120]} for key, found in labels.items() if len(found) > 1]
    return conflicts


def find_leaks(data: dict[str, dict[str, list[Example]]]) -> list[dict]:
    """Inputs (text and aspect) in a training split and in an evaluation split, of the same task or another one."""
    seen_in_train: dict[str, list[str]] = defaultdict(list)
    for task, splits in data.items():
        for example in splits.get("train", []):
            seen_in_train[_input_key(example)].append(task)
    leaks = []
    for task, splits in data.items():
        for split, examples in splits.items():
            if split == "train":
                continue
            for example in examples:
                owners = seen_in_train.get(_input_key(example))
                if owners:
                    for owner in sorted(set(owners)):
                        leaks.append({"eval_task": task, "eval_split": split, "id": example["id"],
                                      "train_task": owner, "text": example["text"][:120]})
    return leaks
