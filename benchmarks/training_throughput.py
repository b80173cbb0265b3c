"""Training throughput of stage 1 (and the stage 3 per-example loss) against a plain peft loop, same data.

    python benchmarks/training_throughput.py configs/demo.yaml --run-dir RUN [--examples 64] [--batch-size 8]

sentimerge's loop: bf16 base weights and bf16 autocast (LoRA weights and optimizer in fp32), batches grouped by
length, loss logits only at the answer positions, no LoRA dropout, the prompt prefix every example of a batch shares
(system turn, instruction, answer list) computed once per batch, eager attention on CPU. Stage 1 rows train batches
of one task (as the experts do), stage 3 rows batches that mix the tasks; the rows without the shared prefix or
with sdpa attention show what each of the two contributes. The plain loop: what a user writes from the peft
docs: the model in fp32, every example padded to the longest one, full logits and the model's own loss, the same LoRA
rank and targets (peft's usual dropout 0.05). Both train the same examples for the same number of steps, timed on
a second pass (the first, untimed, builds each batch shape's kernels); tokens/s counts the real (non-pad) tokens.
Writes benchmarks/results/training_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.summary import machine, record  # noqa: E402
from sentimerge.experts.config import ExpertsConfig  # noqa: E402
from sentimerge.experts.multitask import per_example_losses  # noqa: E402
from sentimerge.experts.train import answer_loss, collate, encode, load_lora_model  # noqa: E402
from sentimerge.pipeline.core.config import load_config  # noqa: E402
from sentimerge.pipeline.core.models import set_attention  # noqa: E402
from sentimerge.pipeline.core.rundir import RunDir  # noqa: E402
from sentimerge.pipeline.core.runtime import set_threads  # noqa: E402
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path

RESULTS = ROOT / "benchmarks" / "results"


def batches_by_length(encoded, batch_size: int):
    ordered = sorted(encoded, key=lambda pair: len(pair[0]))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def batches_by_task(encoded_by_task: list[list], batch_size: int):
    """Stage 1's batches: one task each, grouped by length within the task."""
    return [batch for encoded in encoded_by_task for batch in batches_by_length(encoded, batch_size)]


def timed(steps, run_step) -> float:
    """Seconds for one pass over `steps`, after an untimed pass: oneDNN builds its bf16 kernels once per shape, and a
    long training run sees each batch width many times, so the steady state is what counts."""
    for batch in steps:
        run_step(batch)
    started = time.perf_counter()
    for batch in steps:
        run_step(batch)
    return time.perf_counter() - started


def ours(base: str, batches, pad_id: int, lora, *, per_example: bool, share_prefix: bool = True,
         attention: str = "auto") -> float:
    set_attention(attention)
    try:
        model, _ = load_lora_model(base, lora, dtype="bfloat16", device=torch.device("cpu"), seed=0)
    finally:
        set_attention("auto")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(pairs):
        batch = collate(pairs, pad_id, share_prefix=share_prefix)
        if per_example:
            loss = per_example_losses(model, batch, torch.device("cpu"), use_autocast=True).mean()
        else:
            loss = answer_loss(model, batch, torch.device("cpu"), use_autocast=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(batches, step)


def plain_peft(base: str, encoded, batch_size: int, pad_id: int, lora) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.05,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    longest = max(len(ids) for ids, _ in encoded)

    def step(pairs):
        ids = torch.full((len(pairs), longest), pad_id)
        labels = torch.full((len(pairs), longest), -100)
        mask = torch.zeros((len(pairs), longest), dtype=torch.long)
        for row, (tokens, targets) in enumerate(pairs):  # right padding, as the docs' collators do
            ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, :len(tokens)] = torch.tensor(targets)
            mask[row, :len(tokens)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed([encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)], step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    cfg = load_config(args.config, run_dir=args.run_dir)
    set_threads(cfg.threads)
    run = RunDir(cfg.resolved_run_dir)
    base = prepared_model_path(run)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_task = -(-args.examples // len(cfg.tasks))
    by_task = [encode(tokenizer, task, load_prepared(run, task.name, "train")[:per_task]) for task in cfg.tasks]
    encoded = [pair for rows in by_task for pair in rows]
    tokens = sum(len(ids) for ids, _ in encoded)
    lora = cfg.experts.lora if cfg.experts else ExpertsConfig().lora
    one_task, mixed = batches_by_task(by_task, args.batch_size), batches_by_length(encoded, args.batch_size)

    rows = {}
    variants = [
        ("sentimerge stage 1 (answer loss)", lambda: ours(base, one_task, pad_id, lora, per_example=False)),
        ("stage 1 without the shared prefix", lambda: ours(base, one_task, pad_id, lora, per_example=False,
                                                            share_prefix=False)),
        ("stage 1 with sdpa attention", lambda: ours(base, one_task, pad_id, lora, per_example=False,
                                                      attention="sdpa")),
        ("stage 1 as before (no shared prefix, sdpa)", lambda: ours(base, one_task, pad_id, lora, per_example=False,
                                                                    share_prefix=False, attention="sdpa")),
        ("sentimerge stage 3 (per-example losses, mixed tasks)", lambda: ours(base, mixed, pad_id, lora,
                                                                             per_example=True)),
        ("plain peft, fp32, padded to the longest", lambda: plain_peft(base, encoded, args.batch_size, pad_id, lora)),
    ]
    for name, measure in variants:
        seconds = measure()
        rows[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                      "examples_per_s": round(len(encoded) / seconds, 2)}
        print(f"{name:52s} {seconds:7.1f} s  {tokens / seconds:8.1f} tokens/s  {len(encoded) / seconds:6.2f} ex/s",
              flush=True)
    plain = rows["plain peft, fp32, padded to the longest"]["tokens_per_s"]
    for row in rows.values():
        row["speedup"] = round(row["tokens_per_s"] / plain, 2)
    lines = ["| loop | seconds | tokens/s | examples/s | speed-up vs plain peft |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['seconds']} | {r['tokens_per_s']} | {r['examples_per_s']} | {r['speedup']}x |" for name, r in rows.items()]
    header = (f"# Training throughput\n\n`python benchmarks/training_throughput.py {' '.join(sys.argv[1:])}`, "
              f"{time.strftime('%Y-%m-%d')}, {machine()}.\n\n{len(encoded)} examples ({tokens} real tokens, mean "
              f"{tokens / len(encoded):.0f}) from {', '.join(t.name for t in cfg.tasks)}, batches of {args.batch_size}, "
              f"LoRA r={lora.r} on {lora.target_modules}.\n\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training_throughput.md").write_text(header + "\n".join(lines) + "\n")
    (RESULTS / "training_throughput.json").write_text(json.dumps({"examples": len(encoded), "tokens": tokens, "rows": rows}, indent=2) + "\n")
    before = rows["stage 1 as before (no shared prefix, sdpa)"]["tokens_per_s"]
    record({"training_speedup_vs_plain_peft": rows["sentimerge stage 1 (answer loss)"]["speedup"],
            "training_speedup_shared_prefix_eager": rows["sentimerge stage 1 (answer loss)"]["tokens_per_s"] / before})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
