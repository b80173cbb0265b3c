"""Scoring efficiency: achieved bf16 FLOP/s of the scoring forward against the machine's measured matmul peak, and
examples/s with and without reuse of the prompts' shared prefix, and with the LM head in float32 (what the scorer
does) or in bf16 (what it did), measured side by side in one run.

    python benchmarks/scoring_efficiency.py configs/demo.yaml --run-dir RUN [--examples 96] [--batch-size 16]

FLOPs are counted from the shapes each forward actually computed (a hook on the model reads the batch, the new
tokens and the cached length): 2 x (parameters of the decoder's linear layers) per computed token, attention
4 x hidden x (attended length) per token and layer, and the LM head only at the positions whose logits are kept.
Padding counts as computed (it is); `useful` FLOPs count only real tokens of the full prompts. The peak is the best
of bf16 matmuls of the model's own shapes and a large square one, measured in the same run.
Writes benchmarks/results/scoring_efficiency.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine, record  # noqa: E402
from sentimerge.pipeline.core import scoring  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.models import load_model  # noqa: E402
from sentimerge.pipeline.core.prompts import answer_tokens, prompt_ids  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir  # noqa: E402
from sentimerge.pipeline.core.runtime import set_threads  # noqa: E402
from sentimerge.pipeline.core.scoring import score_prompts  # noqa: E402
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path

RESULTS = ROOT / "benchmarks" / "results"


def matmul_peak(shapes: list[tuple[int, int, int]], seconds: float = 1.5) -> dict[str, float]:
    """Best bf16 FLOP/s per (m, k, n) shape, each timed for about `seconds`."""
    result = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        a @ b
        best, started = 0.0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            tick = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - tick))
        result[f"{m}x{k}x{n}"] = best
    return result


class FlopCounter:
    """Counts the FLOPs of every forward of a causal LM from the shapes it computes."""

    def __init__(self, model):
        config = model.config
        self.hidden, self.layers, self.vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
        decoder = model.get_decoder()
        self.linear_params = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
        self.executed = 0.0
        self.tokens = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        batch, new = ids.shape
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        attended = past + (new + 1) / 2  # causal: a token attends to the cache and the new tokens before it
        keep = kwargs.get("logits_to_keep", 0)  # positions kept: a count (0: all) or an index tensor
        keep = keep.numel() if torch.is_tensor(keep) else keep or new
        self.executed += batch * (2 * self.linear_params * new + 4 * self.hidden * attended * new * self.layers
                                  + 2 * self.hidden * self.vocab * keep)
        self.tokens += batch * new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir")
    parser.add_argument("--examples", type=int, default=96, help="per task, from the dev split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(args.config, run_dir=args.run_dir)
    set_threads(cfg.threads)
    run = RunDir(cfg.resolved_run_dir)
    model, tokenizer = load_model(prepared_model_path(run), dtype="bfloat16")
    counter = FlopCounter(model)
    work = []
    for task in cfg.tasks:
        prompts = [prompt_ids(tokenizer, task, e) for e in load_prepared(run, task.name, "dev")[:args.examples]]
        work.append((prompts, answer_tokens(tokenizer, task).answers))
    examples = sum(len(p) for p, _ in work)
    real_tokens = sum(len(x) for p, _ in work for x in p)
    useful = sum(len(x) for p, _ in work for x in p) * 2 * counter.linear_params

    hidden, inter = model.config.hidden_size, getattr(model.config, "intermediate_size", 4 * model.config.hidden_size)
    peak_shapes = [(1024, hidden, inter), (1024, inter, hidden), (2048, 2048, 2048)]
    rows = {}
    variants = [("full prompts", False, True), ("shared prefix computed once", True, True),
                ("shared prefix, LM head in bf16 (before float32 scores)", True, False)]
    for name, reuse, float32 in variants * 2:  # interleaved, so drift in the machine's speed hits every variant
        counter.executed, counter.tokens = 0.0, 0
        head = scoring.float32_head if float32 else (lambda model: contextlib.nullcontext())
        started = time.perf_counter()
        with mock.patch.object(scoring, "float32_head", head):
            for _ in range(args.repeats):
                for prompts, answers in work:
                    score_prompts(model, prompts, answers, pad_id=tokenizer.pad_token_id,
                                  batch_size=args.batch_size, reuse_prefix=reuse)
        seconds = time.perf_counter() - started
        row = {"seconds": seconds / args.repeats, "examples_per_s": examples * args.repeats / seconds,
               "executed_tflops": counter.executed / seconds / 1e12, "tokens_computed": counter.tokens // args.repeats,
               "useful_tflops": useful * args.repeats / seconds / 1e12}
        if name not in rows or row["examples_per_s"] > rows[name]["examples_per_s"]:
            rows[name] = row
    peaks = matmul_peak(peak_shapes)
    peak = max(peaks.values())
    for row in rows.values():
        row["executed_utilization"] = row["executed_tflops"] * 1e12 / peak
    speedup = rows["shared prefix computed once"]["examples_per_s"] / rows["full prompts"]["examples_per_s"]
    float32_cost = (rows["shared prefix, LM head in bf16 (before float32 scores)"]["examples_per_s"]
                    / rows["shared prefix computed once"]["examples_per_s"])
    lines = ["| scoring | examples/s | tokens computed | executed TFLOP/s | share of matmul peak | useful TFLOP/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['examples_per_s']:.1f} | {r['tokens_computed']} | {r['executed_tflops']:.3f} | "
              f"{r['executed_utilization']:.1%} | {r['useful_tflops']:.3f} |" for n, r in rows.items()]
    text = (f"# Scoring efficiency\n\n`python benchmarks/scoring_efficiency.py {' '.join(sys.argv[1:])}`, "
            f"{time.strftime('%Y-%m-%d')}, {machine()}.\n\n{examples} dev prompts ({real_tokens} real tokens, mean "
            f"{real_tokens / examples:.0f}) over {', '.join(t.name for t in cfg.tasks)}; batches of {args.batch_size}; "
            f"bf16.\n\nbf16 matmul peak measured in the same run: "
            + ", ".join(f"{s} {v / 1e12:.2f} TFLOP/s" for s, v in peaks.items())
            + f" (peak used: {peak / 1e12:.2f}).\n\n" + "\n".join(lines)
            + f"\n\nPrefix reuse: {speedup:.2f}x examples/s. The float32 LM head (scores that do not tie) costs "
            f"{float32_cost:.3f}x the time of a bf16 head.\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scoring_efficiency.md").write_text(text)
    (RESULTS / "scoring_efficiency.json").write_text(json.dumps(
        {"peak_flops": peaks, "rows": rows, "prefix_speedup": speedup, "float32_head_time_ratio": float32_cost,
         "examples": examples}, indent=2) + "\n")
    record({"scoring_flop_utilization": rows["shared prefix computed once"]["executed_utilization"]},
           notes="executed FLOP/s of the scoring forwards (prefix reuse on) / best bf16 matmul FLOP/s, same run")
    print(text)


if __name__ == "__main__":
    main()
