"""Stage 3 distilling the task experts (`finetune.distill`, BAM's single-task teachers of one multi-task model):
the KL term, the teacher's annealed share, every row scored by its own task's expert, and the stage trained,
logged, fingerprinted and resumed with it."""

from __future__ import annotations

import json

import pytest
import torch

from sentimerge.experts.distill import ExpertTeachers, distillation_losses, teacher_share
from sentimerge.experts.train import answer_logits, collate
from sentimerge.pipeline import finetune
from sentimerge.pipeline.core.config import DistillSettings, load_config
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.models import peft_quietly
from sentimerge.pipeline.core.prompts import training_example
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl, read_manifest
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path
from tests.conftest import write_tiny_config
from tests.test_finetune import Killed, assert_same_adapter_and_log
from tests.test_merge import make_experts

FINETUNE = {"start": "base", "steps": 6, "per_task": 2, "checkpoint_every": 2, "dev_examples": 4, "evaluations": 1,
            "lora": {"r": 4, "alpha": 8}}


def test_the_distillation_term_is_the_kl_divergence_over_the_answer_tokens():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 2, 11, generator=generator), torch.randn(3, 2, 11, generator=generator)
    targets = torch.tensor([[5, 7], [-100, 4], [-100, -100]])
    kl = torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    losses = distillation_losses(student, teacher, targets, temperature=1.0)
    torch.testing.assert_close(losses, torch.stack([kl[0].mean(), kl[1, 1], torch.tensor(0.0)]))
    assert torch.all(losses[:2] > 0)
    assert torch.allclose(distillation_losses(teacher, teacher, targets, temperature=1.0), torch.zeros(3), atol=1e-6)
    # at temperature T both softmaxes soften and the term is scaled by T^2
    soft = torch.nn.functional.kl_div((student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)
    torch.testing.assert_close(distillation_losses(student, teacher, targets, temperature=2.0)[0], 4 * soft[0].mean())


def test_the_teachers_share_falls_from_its_weight_to_zero_or_stays():
    annealed = DistillSettings(weight=0.6)
    assert [round(teacher_share(annealed, step, 4), 6) for step in range(4)] == [0.6, 0.4, 0.2, 0.0]
    assert teacher_share(DistillSettings(weight=0.6, anneal="none"), 3, 4) == 0.6
    with pytest.raises(ValueError):
        DistillSettings(weight=1.5)


def test_every_row_is_scored_by_its_own_tasks_expert_alone(tiny_experts):
    cfg, paths, _ = tiny_experts
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = RunDir(cfg.resolved_run_dir)
    base = prepared_model_path(run)
    tokenizer = AutoTokenizer.from_pretrained(base)
    teachers = ExpertTeachers(base, adapters={task: run.expert_adapter(task) for task in paths}, checkpoints={},
                              dtype="float32", device=torch.device("cpu"))
    tasks = list(cfg.tasks)
    rows, names = [], []
    for index in (0, 1, 2, 0, 2):  # tasks interleaved, answers of different lengths
        task = tasks[index]
        example = load_prepared(run, task.name, "train")[len(rows)]
        rows.append(training_example(tokenizer, task, example))
        names.append(task.name)
    batch = collate(rows, tokenizer.pad_token_id)
    aligned = teachers.batch_logits(names, rows, tokenizer.pad_token_id, batch["answer_width"], use_autocast=False)
    targets = batch["labels"][:, -batch["answer_width"]:]
    for row, name in enumerate(names):
        with peft_quietly():
            alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                              paths[name]).eval()
        with torch.no_grad():
            own = answer_logits(alone, collate([rows[row]], tokenizer.pad_token_id), torch.device("cpu"),
                                use_autocast=False)[0, :-1]
        width = own.shape[0]
        answered = targets[row, -width:] != -100
        assert answered.any()
        torch.testing.assert_close(aligned[row, -width:][answered], own[answered], atol=1e-4, rtol=1e-4)


def _config(folder, cache_dir, **distill):
    path = write_tiny_config(folder, cache_dir=cache_dir, finetune={**FINETUNE, "distill": distill},
                             export={"dtype": "float32"})
    cfg = load_config(path)
    from sentimerge.pipeline import prepare

    prepare.main(cfg)
    make_experts(cfg)
    return cfg


def test_stage_3_learns_from_the_experts_logs_it_and_resumes_exactly(tmp_path, cache_dir):
    whole = _config(tmp_path / "whole", cache_dir, weight=0.8)
    finetune.main(whole)
    rows = [row for row in read_jsonl(RunDir(whole.resolved_run_dir).finetune_metrics) if "loss" in row]
    assert [row["teacher_share"] for row in rows[:5]] == [0.8, 0.64, 0.48, 0.32, 0.16]  # the last step: share 0
    assert all(row["distill_kl"] > 0 for row in rows[:5]) and "teacher_share" not in rows[5]

    broken = _config(tmp_path / "broken", cache_dir, weight=0.8)

    def kill(step):
        if step == 3:
            raise Killed()

    with pytest.raises(Killed):
        finetune.main(broken, before_step=kill)
    assert not is_done(RunDir(broken.resolved_run_dir).finetune)
    finetune.main(broken)
    assert_same_adapter_and_log(RunDir(whole.resolved_run_dir), RunDir(broken.resolved_run_dir))

    # the teachers move training: without them the same seed trains another adapter
    plain = _config(tmp_path / "plain", cache_dir)
    finetune.main(plain)
    with pytest.raises(AssertionError):
        assert_same_adapter_and_log(RunDir(whole.resolved_run_dir), RunDir(plain.resolved_run_dir))


def test_distillation_is_in_stage_3s_key_and_nowhere_else(tmp_path, cache_dir):
    cfg = _config(tmp_path, cache_dir, weight=0.5)
    run = RunDir(cfg.resolved_run_dir)
    start = prepared_model_path(run)
    plain = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"distill": DistillSettings()})})
    assert finetune.fingerprint(cfg, start) != finetune.fingerprint(plain, start)
    # retraining an expert changes what stage 3 learns from: its key changes with the expert's fingerprint
    manifest = json.loads((run.expert("polarity") / "DONE.json").read_text())
    (run.expert("polarity") / "DONE.json").write_text(json.dumps({**manifest, "fingerprint": "another"}))
    retrained = finetune.fingerprint(cfg, start)
    (run.expert("polarity") / "DONE.json").write_text(json.dumps(manifest))
    assert retrained != finetune.fingerprint(cfg, start)
    # the multi-task LoRA baseline and the shared adapter train without teachers, and keep their keys
    from sentimerge.pipeline import report
    from sentimerge.pipeline.experts import shared_fingerprint

    assert report.multitask_variant(cfg, run, 4).cfg.finetune.distill.weight == 0
    assert shared_fingerprint(cfg, run) == shared_fingerprint(plain, run)


def test_distillation_without_finished_experts_is_refused_and_keeps_a_finished_stage_3(tmp_path, cache_dir):
    path = write_tiny_config(tmp_path, cache_dir=cache_dir, finetune={**FINETUNE, "distill": {"weight": 0.5}})
    cfg = load_config(path)
    from sentimerge.pipeline import prepare

    prepare.main(cfg)
    run = RunDir(cfg.resolved_run_dir)
    with pytest.raises(SentimergeError, match="expert of polarity has not finished"):
        finetune.main(cfg)
    assert not run.finetune_metrics.exists()
    # a finished stage 3 without distillation is not removed by a refused `--force` with it
    plain = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"distill": DistillSettings()})})
    finetune.main(plain)
    with pytest.raises(SentimergeError, match="has not finished"):
        finetune.main(cfg, force=True)
    assert is_done(run.finetune) and finetune.finished_with(read_manifest(run.finetune), plain,
                                                            prepared_model_path(run))
