"""What a stage reads of the stages before it in the run directory: the prepared examples and base model, the keys
that say which upstream result a finished stage was built on, and the config's checks against the base model."""

from __future__ import annotations

import json
from pathlib import Path

from sentimerge.merge.lora import Delta, read_adapter, read_checkpoint
from sentimerge.merge.recipe import lora_reference
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.models import check_model_dir
from sentimerge.pipeline.core.rundir import RunDir, digest, is_done, read_jsonl, read_manifest


def search_key(run: RunDir) -> str | None:
    """The fingerprint a search was started with (what stage 3 hashes of stage 2), None before it started."""
    if not run.search_state.is_file():
        return None
    return json.loads(run.search_state.read_text(encoding="utf-8"))["fingerprint"]


def prepared_key(run: RunDir) -> str:
    """What the later stages hash of stage 0: its config fingerprint and the hashes of the data it froze (a run
    prepared before data hashes were kept: the fingerprint alone, so that it keeps its later stages)."""
    manifest = read_manifest(run.prepare)
    if "data" not in manifest:
        return manifest.get("fingerprint")
    return digest({"fingerprint": manifest.get("fingerprint"), "data": manifest["data"]})


def load_prepared(run: RunDir, task: str, split: str) -> list[dict]:
    """The canonical examples `prepare` froze for `task` and `split` (what every later stage reads)."""
    path = run.data(task, split)
    if not is_done(run.prepare):
        raise SentimergeError(f"{run.prepare}: not prepared; run `sentimerge prepare` first")
    if not path.is_file():
        raise SentimergeError(f"{path}: task {task!r} has no prepared {split} split")
    return read_jsonl(path)


def prepared_model_path(run: RunDir) -> str:
    """The prepared base model's folder. Raises `SentimergeError` before `prepare` finished or when it is gone."""
    if not is_done(run.prepare):
        raise SentimergeError(f"{run.prepare}: not prepared; run `sentimerge prepare` first")
    read_manifest(run.prepare)
    try:
        path = json.loads(run.base_model.read_text(encoding="utf-8"))["path"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise SentimergeError(f"{run.base_model}: missing or corrupted; run `sentimerge prepare --force`") from None
    check_model_dir(Path(path))
    return path


def merge_base_path(run: RunDir, shared: bool) -> str:
    """The model the experts train on and stage 2 merges their deltas onto: the prepared base model, or with a
    shared adapter (`shared`: `experts.shared.examples` > 0) base + shared adapter (`<run>/shared/model`).

    Raises: `SentimergeError` when the shared adapter has not finished (run `sentimerge experts`)."""
    if not shared:
        return prepared_model_path(run)
    if not is_done(run.shared):
        raise SentimergeError(f"{run.shared}: the shared adapter has not finished; run `sentimerge experts` first")
    check_model_dir(run.shared_model)
    return str(run.shared_model)


def given_source(run: RunDir, task: str) -> dict | None:
    """The manifest's record of an expert given instead of trained ({kind, folder, source, sha256}), or None."""
    return read_manifest(run.expert(task)).get("given")


def expert_deltas(run: RunDir, task: str, base_path: str) -> dict[str, Delta]:
    """The finished expert of `task` as deltas per base weight (`sentimerge.merge.lora`): its LoRA adapter's
    factors, or the task vector of a given full checkpoint against the base model in `base_path`."""
    given = given_source(run, task)
    if given and given["kind"] == "checkpoint":
        return read_checkpoint(Path(given["folder"]), Path(base_path))
    return read_adapter(run.expert_adapter(task))


def expert_reference(run: RunDir, task: str, base_path: str) -> str:
    """How a mergekit recipe names the expert of `task`: `base+adapter`, or a given checkpoint's folder."""
    given = given_source(run, task)
    if given and given["kind"] == "checkpoint":
        return str(Path(given["folder"]).resolve())
    return lora_reference(base_path, str(run.expert_adapter(task).resolve()))

