"""Stage 1: per-task LoRA experts (training loop, checkpoints)."""
