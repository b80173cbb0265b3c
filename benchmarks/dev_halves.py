"""A data root whose dev split is half of each task's dev split and whose test split is the other half, so that a
suite without test splits can be confirmed on examples that no choice looked at.

    python benchmarks/dev_halves.py ../shared/data runs/suite_halves [--seed 0]

For every `<task>/dev.jsonl` under SOURCE: the examples are ordered by a seeded hash of their id and split in two;
the first half becomes `<task>/dev.jsonl` (the pipeline chooses its settings on it: checkpoints, search selection,
final tables) and the second `<task>/test.jsonl`, which a `{split}` path finds without further configuration, so
`sentimerge run`, `report` and benchmarks/sharing.py score it beside dev as the split that chose nothing.
`train.jsonl` is linked, not copied. Run a config on it with `--data-root DEST` (or the override `data_root=DEST`).
Writes DEST/halves.json with the seed and the counts; refuses a DEST that holds other files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def rank_key(example_id: str, seed: int) -> int:
    """The seeded hash examples are ordered by; the first half of the order is dev, the second test."""
    return int(hashlib.sha256(f"{seed}/{example_id}".encode()).hexdigest(), 16)


def split_task(source: Path, dest: Path, seed: int) -> dict[str, int]:
    lines = [line for line in (source / "dev.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        if "id" not in json.loads(line):
            raise SystemExit(f"{source / 'dev.jsonl'}:{number}: no `id` field")
    ordered = sorted(lines, key=lambda line: rank_key(json.loads(line)["id"], seed))
    cut = len(ordered) // 2
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "dev.jsonl").write_text("\n".join(ordered[:cut]) + "\n", encoding="utf-8")
    (dest / "test.jsonl").write_text("\n".join(ordered[cut:]) + "\n", encoding="utf-8")
    train = dest / "train.jsonl"
    if train.is_symlink() or train.exists():
        train.unlink()
    train.symlink_to((source / "train.jsonl").resolve())
    return {"dev": cut, "test": len(ordered) - cut}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a data root with <task>/{train,dev}.jsonl")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tasks = sorted(path.parent for path in args.source.glob("*/dev.jsonl"))
    if not tasks:
        sys.exit(f"{args.source}: no <task>/dev.jsonl")
    if args.dest.exists() and not (args.dest / "halves.json").is_file() and any(args.dest.iterdir()):
        sys.exit(f"{args.dest}: not empty and not written by this script")
    counts = {task.name: split_task(task, args.dest / task.name, args.seed) for task in tasks}
    (args.dest / "halves.json").write_text(json.dumps({"source": str(args.source.resolve()), "seed": args.seed,
                                                       "counts": counts}, indent=2) + "\n", encoding="utf-8")
    for name, count in counts.items():
        print(f"{name:15s} dev {count['dev']:5d}  test (unseen dev half) {count['test']:5d}")


if __name__ == "__main__":
    main()
