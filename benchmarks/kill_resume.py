"""Kill tests: SIGKILL each stage at seeded random points, resume it, and compare with an uninterrupted run.

    python benchmarks/kill_resume.py [--config configs/tiny.yaml] [--trials 20] [--seed 0]

Half the trials kill at the N-th write of the artifact layer (N uniform over the stage's writes, so kills land
between a temporary file and its rename as often as after it); half kill after a random delay (uniform over the last
65% of the stage's reference wall time; the first third is Python starting up). Each trial restores the run
directory as the reference left it before the stage, kills the stage, runs it again, and compares every artifact and
log with the reference (wall-clock fields aside; tensors to 1e-6). Writes
`benchmarks/results/kill_resume.{md,json}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sentimerge.pipeline.killtest import KillHarness  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sentimerge-kill-") as work:
        harness = KillHarness(Path(args.config), Path(work) / "run", Path(work))
        print("reference run, stage by stage ...", flush=True)
        harness.prepare_reference()
        for stage in harness.stages:
            print(f"  {stage:9s} {harness.seconds[stage]:6.1f} s, {harness.points[stage]:4d} write points", flush=True)
        trials = []
        for trial in harness.trials(args.trials, args.seed):
            trials.append(trial)
            status = "ok" if trial.ok else "FAILED: " + "; ".join(trial.differences[:3] + trial.stray_files[:3])
            print(f"  trial {trial.index:2d} {trial.stage:9s} {trial.mode:5s} at {trial.kill_at:<7g} "
                  f"{'killed' if trial.killed else 'finished first'} after {trial.writes_before_kill} writes: "
                  f"{status}", flush=True)

    killed = sum(t.killed for t in trials)
    failed = [t for t in trials if not t.ok]
    lines = ["| trial | stage | kill mode | kill at | killed | writes before the kill | resumed | differences | "
             "stray files |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t.index} | {t.stage} | {t.mode} | {t.kill_at:g} | {'yes' if t.killed else 'no'} | "
              f"{t.writes_before_kill} | "
              f"{'ok' if t.resume_code == 0 else f'exit {t.resume_code}'} | {len(t.differences)} | {len(t.stray_files)} |"
              for t in trials]
    midway = sum(t.killed and t.writes_before_kill > 0 for t in trials)
    summary = (f"{len(trials)} trials ({killed} killed mid-stage, {midway} of them after the stage had written "
               f"something; {len(trials) - killed} finished before the kill), "
               f"{len(trials) - len(failed)} resumed to artifacts equal to the uninterrupted run, {len(failed)} failed.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/kill_resume.py " + " ".join(sys.argv[1:])
    (out / "kill_resume.md").write_text(
        f"# Kill and resume\n\n`{command.strip()}` on {platform.node() or 'this machine'}, "
        f"{time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s in all.\n\n{summary}\n\n"
        "Write points per stage: " + ", ".join(f"{s} {n}" for s, n in harness.points.items()) + ".\n\n"
        + "\n".join(lines) + "\n")
    (out / "kill_resume.json").write_text(json.dumps(
        {"command": command.strip(), "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
         "trials": len(trials), "killed": killed, "failed": len(failed), "write_points": harness.points,
         "reference_seconds": {s: round(v, 1) for s, v in harness.seconds.items()},
         "results": [dataclasses.asdict(t) for t in trials]}, indent=2) + "\n")
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
