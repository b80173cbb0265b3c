"""`make demo` as a newcomer runs it: a fresh clone, no virtual environment, no model cache; wall time and peak memory.

    python benchmarks/fresh_demo.py [--commit HEAD] [--workdir /tmp/fresh-demo] [--no-record]

Clones this repository at `--commit` into `--workdir` (emptied first), then runs `make demo` there under GNU time with
`SENTIMERGE_CACHE` pointing into the work directory, so the venv is created and the base model converted from its
PyPI wheel as on a new machine (pip's own download cache is the machine's: PyPI may be slower). Records in
summary.json `demo_wall_seconds` (the whole `make demo`, venv included), `demo_peak_rss_mb` (the largest process's
peak resident memory), `demo_venv_seconds` and `demo_pipeline_seconds`, and the demo's test-split comparisons of the
evolved merge (`python benchmarks/demo_report.py` on the fresh run writes the rest). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--workdir", default="/tmp/fresh-demo")
    parser.add_argument("--no-record", action="store_true", help="print the figures without writing summary.json")
    args = parser.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    clone = work / "sentimerge"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.commit], check=True, capture_output=True,
                            text=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", commit], check=True)
    env = {**os.environ, "SENTIMERGE_CACHE": str(work / "cache")}
    env.pop("VIRTUAL_ENV", None)
    log = work / "make-demo.log"
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(["/usr/bin/time", "-v", "make", "demo"], cwd=clone, env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if code:
        raise SystemExit(f"make demo exited with {code}; see {log}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    info = json.loads((clone / "runs" / "demo" / "run.json").read_text())
    pipeline = info["total_seconds"]
    values = {"demo_wall_seconds": wall, "demo_peak_rss_mb": peak_kb / 1024, "demo_pipeline_seconds": pipeline,
              "demo_venv_seconds": wall - pipeline}
    print(json.dumps({key: round(value, 1) for key, value in values.items()}, indent=2))
    print(f"stages (s): {info['seconds']}; run directory {clone / 'runs' / 'demo'}")
    if not args.no_record:
        record(values, command=f"python benchmarks/fresh_demo.py --commit {commit[:12]}",
               notes="fresh clone, no venv, empty SENTIMERGE_CACHE, pip's download cache as found; "
                     "venv seconds = make demo minus the pipeline's stages")


if __name__ == "__main__":
    main()
