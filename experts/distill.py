"""The task experts as teachers of stage 3 (`finetune.distill`; BAM, Clark et al., ACL 2019, arXiv 1907.04829).

Every example of a stage 3 batch is scored, without gradient, by its own task's expert on the experts' base (LoRA
experts share one copy of that model, each as a named adapter; a given full checkpoint is a model of its own). The
student's per-example loss mixes its answer cross-entropy with the KL divergence from the expert's next-token
distribution at the same answer positions (`distillation_losses`), the teacher's share falling over training
(`teacher_share`). `pipeline/finetune.py` builds the teachers; `experts/multitask.py` mixes the losses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from sentimerge.experts.train import answer_logits, collate
from sentimerge.pipeline.core.config import DistillSettings
from sentimerge.pipeline.core.models import DTYPES, attention_kwargs, peft_quietly


def teacher_share(settings: DistillSettings, step: int, total_steps: int) -> float:
    """The teacher's share s of step `step` (0-based) of `total_steps`: `weight` throughout (`anneal: none`), or
    falling linearly from `weight` at the first step to 0 at the last (`anneal: linear`, BAM's teacher annealing)."""
    if settings.anneal == "none" or total_steps <= 1:
        return settings.weight
    return settings.weight * (1.0 - step / (total_steps - 1))


def distillation_losses(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """Per example, T^2 x KL(teacher_T || student_T) in nats, the mean over its answer tokens.

    `student` and `teacher`: logits [B, W, vocab] at the positions that predict `targets` [B, W] (-100 where no
    answer token is predicted, as the cross-entropy masks them); softmax at temperature T over the whole vocabulary,
    in float32. Returns [B]; 0 where the two distributions agree. The T^2 factor keeps the gradient's scale
    independent of T (Hinton, Vinyals and Dean, 2015)."""
    log_student = (student.float() / temperature).log_softmax(-1)
    log_teacher = (teacher.float() / temperature).log_softmax(-1)
    token_kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)  # [B, W]
    counted = targets != -100
    return (token_kl * counted).sum(-1) / counted.sum(-1).clamp(min=1) * temperature ** 2


class ExpertTeachers:
    """Each task's expert, on the experts' base, as a no-gradient scorer of stage 3's batches.

    `adapters` maps a task to its expert's peft LoRA adapter folder; `checkpoints` maps a task to a full checkpoint
    (a given expert). The adapters are loaded onto one copy of `base_path` as adapters named by task."""

    def __init__(self, base_path: str, *, adapters: dict[str, Path], checkpoints: dict[str, Path], dtype: str,
                 device: torch.device, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        def load(path: str | Path):
            return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                        **attention_kwargs(device)).to(device).eval()

        self.models: dict[str, object] = {task: load(path) for task, path in checkpoints.items()}
        self.device = device
        self._lora = None
        if adapters:
            from peft import PeftModel

            names = list(adapters)
            with peft_quietly():
                lora = PeftModel.from_pretrained(load(base_path), str(adapters[names[0]]), adapter_name=names[0])
                for name in names[1:]:
                    lora.load_adapter(str(adapters[name]), adapter_name=name)
            self._lora = lora.eval()
            self.models.update({name: lora for name in names})

    @torch.no_grad()
    def _logits(self, group: list[str], encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, *,
                use_autocast: bool) -> torch.Tensor:
        """Logits [rows, answer_width + 1, vocab] of `encoded` rows (a `collate` batch of them alone, no shared
        prefix), row i scored by the expert of `group[i]`: the LoRA experts in one forward of the shared model with
        each row's own adapter (peft's mixed-adapter batch, `adapter_names`), a full checkpoint on its own."""
        batch = collate(list(encoded), pad_id)
        model = self.models[group[0]]
        extra = {"adapter_names": list(group)} if model is self._lora else {}
        return answer_logits(model, batch, self.device, use_autocast=use_autocast, forward_kwargs=extra)

    def batch_logits(self, tasks: Sequence[str], encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
                     answer_width: int, *, use_autocast: bool) -> torch.Tensor:
        """Teacher logits [B, answer_width, vocab] aligned with a `collate` batch of `encoded` (B rows, their tasks
        in `tasks`, its `answer_width`): every row scored by its own task's expert, the LoRA experts' rows in one
        forward, each given checkpoint's rows in one of their own. Every batch ends at its last column, so a row's
        last answer positions are the same tokens in the teachers' batch and in the student's; columns before a
        teachers' batch's own answer width hold zeros, where the targets mask them."""
        groups: dict[object, list[int]] = {}
        for row, task in enumerate(tasks):
            groups.setdefault(id(self.models[task]), []).append(row)
        return aligned_logits(((rows, self._logits([tasks[row] for row in rows], [encoded[row] for row in rows],
                                                   pad_id, use_autocast=use_autocast))
                               for rows in groups.values()), len(encoded), answer_width)


def aligned_logits(parts: Iterable[tuple[list[int], torch.Tensor]], size: int, answer_width: int) -> torch.Tensor:
    """[size, answer_width, vocab] from parts (row indices, `answer_logits` of a `collate` batch of those rows
    alone [rows, width + 1, vocab]): each part's rows at their indices, right-aligned (every batch ends at its last
    column, so a row's last answer positions are the same tokens in both batches); zeros before a part's width."""
    aligned = None
    for rows, logits in parts:
        width = logits.shape[1] - 1
        if aligned is None:
            aligned = logits.new_zeros((size, answer_width, logits.shape[-1]))
        aligned[rows, answer_width - width:] = logits[:, :-1]
    return aligned
