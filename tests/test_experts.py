"""Stage 1 on the tiny model: the expert folder contract, peft round trip, resume, skip/force, answer-only loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sentimerge.experts.config import ExpertsConfig
from sentimerge.experts.train import allowed_tokens, answer_loss, collate, encode, learning_rate
from sentimerge.pipeline import cli, experts, prepare
from sentimerge.pipeline.core.config import load_config, load_tasks_file
from sentimerge.pipeline.core.errors import SentimergeError
from sentimerge.pipeline.core.rundir import RunDir, is_done, read_jsonl, read_manifest
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path
from tests.conftest import write_tiny_config

# 6 steps of 4 examples, a checkpoint every 2 steps, dev evaluations at steps 3 and 6; dropout on (RNG matters).
SMALL = {"steps": 6, "batch_size": 4, "bucket": 2, "checkpoint_every": 2, "evaluations": 2, "dev_examples": 6,
         "learning_rate": 5e-3, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
         "curriculum": {"pool": 16, "start": 0.5, "full_at": 0.5}}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and busy CI machines make thread barriers slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prepared(folder: Path, cache_dir: Path, **experts_section):
    cfg = load_config(write_tiny_config(folder, cache_dir=cache_dir, experts={**SMALL, **experts_section}))
    prepare.main(cfg)
    return cfg


def resumed_like_whole(folder: Path, cache_dir: Path, task: str, **experts_section) -> tuple[RunDir, RunDir]:
    """Train `task`'s expert once straight through and once interrupted before step 5 and resumed; assert that both
    adapters are equal and return (whole, resumed) run folders for the caller's own checks."""
    whole = prepared(folder / "whole", cache_dir, **experts_section)
    experts.main(whole, tasks=[task])
    broken = prepared(folder / "broken", cache_dir, **experts_section)
    with pytest.raises(Interrupt):
        experts.main(broken, tasks=[task], on_step=stop_at(task, 5))
    experts.main(broken, tasks=[task])
    runs = RunDir(whole.resolved_run_dir), RunDir(broken.resolved_run_dir)
    expected, resumed = (load_file(run.expert_adapter(task) / "adapter_model.safetensors") for run in runs)
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)
    return runs


def test_expert_folder_holds_adapter_logs_and_manifest(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir)
    folders = experts.main(cfg, tasks=["aspect3", "intensity"])
    run = RunDir(cfg.resolved_run_dir)
    assert set(folders) == {"aspect3", "intensity"} and not run.expert("polarity").exists()
    for task in ("aspect3", "intensity"):
        folder = run.expert(task)
        assert is_done(folder) and not run.expert_checkpoint(task).exists()
        assert {p.name for p in run.expert_adapter(task).iterdir()} >= {"adapter_config.json",
                                                                        "adapter_model.safetensors"}
        manifest = read_manifest(folder)
        assert manifest["steps"] == 6 and manifest["examples"] == 24 and manifest["kept_step"] == 6
        metrics = read_jsonl(run.expert_metrics(task))
        assert [row["step"] for row in metrics] == list(range(7))
        assert "dev" in metrics[0] and "loss" not in metrics[0]  # step 0: the zero-shot base model
        assert all({"loss", "lr", "examples_per_s"} <= set(row) for row in metrics[1:])
        assert [row["step"] for row in metrics if "dev" in row] == [0, 3, 6]
        assert manifest["dev"] == metrics[-1]["dev"] and manifest["zero_shot"] == metrics[0]["dev"]
        schedule = read_jsonl(run.expert_schedule(task))
        assert [row["step"] for row in schedule] == list(range(1, 7))
        assert all(len(row["ids"]) == 4 and 0 <= row["difficulty_mean"] <= 1 for row in schedule)
        assert schedule[0]["competence"] == 0.5 and schedule[-1]["competence"] == 1.0
        assert len(read_jsonl(run.expert_difficulty(task))) == 16
        assert "task_difficulty" in manifest and 0 <= manifest["task_difficulty"]["difficulty"] <= 1
        assert run.base_loss_cache(task).is_file()
    assert read_manifest(run.expert("aspect3"))["curriculum"]["skipped_signals"] == []
    assert "agreement" in read_manifest(run.expert("intensity"))["curriculum"]["skipped_signals"]


def test_curriculum_draws_easy_examples_first(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir, curriculum={"pool": 16, "start": 0.25, "full_at": 1.0, "pacing": "linear",
                                                    "signals": {"agreement": 1.0}, "stratify": False})
    experts.main(cfg, tasks=["aspect3"])
    run = RunDir(cfg.resolved_run_dir)
    ranked = read_jsonl(run.expert_difficulty("aspect3"))
    agreement = {row["id"]: row["meta"]["agreement"] for row in load_prepared(run, "aspect3", "train")}
    in_order = [agreement[row["id"]] for row in ranked]
    assert in_order == sorted(in_order, reverse=True)  # unanimous examples first
    rank = {row["id"]: row["rank"] for row in ranked}
    first = read_jsonl(run.expert_schedule("aspect3"))[0]
    assert first["available"] == 4 and all(rank[i] < 4 for i in first["ids"])


def test_stratified_curriculum_puts_every_answer_in_the_first_batches(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir, curriculum={"pool": 24, "start": 0.25, "full_at": 1.0, "pacing": "linear",
                                                    "signals": {"agreement": 1.0, "length": 1.0}})
    experts.main(cfg, tasks=["aspect3"])
    run = RunDir(cfg.resolved_run_dir)
    label = {row["id"]: row["label"] for row in load_prepared(run, "aspect3", "train")}
    ranked = read_jsonl(run.expert_difficulty("aspect3"))
    within = {}  # rank of each example among the examples of its own label
    for row in ranked:
        within[row["id"]] = sum(label[other] == label[row["id"]] for other in within)
    first = read_jsonl(run.expert_schedule("aspect3"))[0]
    assert first["available"] == 6  # a quarter of each of the three labels (8 each)
    assert all(within[i] < 2 for i in first["ids"])
    drawn = {label[i] for row in read_jsonl(run.expert_schedule("aspect3"))[:2] for i in row["ids"]}
    assert drawn == {"negative", "neutral", "positive"}


def test_saved_adapter_loads_with_peft_and_reproduces_the_expert(tmp_path, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = prepared(tmp_path, cache_dir, autocast=False)
    run = RunDir(cfg.resolved_run_dir)
    task = cfg.task("polarity")
    base_path = prepared_model_path(run)
    expert = experts.train_expert(cfg, run, task, load_prepared(run, "polarity", "train"),
                                  load_prepared(run, "polarity", "dev"), base_path, fingerprint="test")
    batch = collate(encode(expert.tokenizer, task, load_prepared(run, "polarity", "dev")[:5]),
                    expert.tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    expert.model.eval()
    with torch.no_grad():
        in_memory = expert.model(**inputs).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                           run.expert_adapter("polarity")).eval()
        reloaded = loaded(**inputs).logits
        with loaded.disable_adapter():
            base = loaded(**inputs).logits
    real = batch["attention_mask"].bool()  # left-padding positions hold no prediction (kernels differ there)
    torch.testing.assert_close(reloaded[real], in_memory[real])
    assert (reloaded - base)[real].abs().max() > 1e-3  # the adapter is not a no-op


class Interrupt(Exception):
    pass


def stop_at(task: str, step: int):
    def hook(name: str, current: int) -> None:
        if name == task and current == step:
            raise Interrupt

    return hook


def test_a_run_resumed_with_another_thread_count_warns(tmp_path, cache_dir, caplog):
    """The checkpoint records the torch threads training started with (bf16 rounds by thread split); a resume with
    another count says so, one with the same count does not."""
    cfg = prepared(tmp_path, cache_dir)
    run = RunDir(cfg.resolved_run_dir)
    with pytest.raises(Interrupt):
        experts.main(cfg, tasks=["aspect3"], on_step=stop_at("aspect3", 3))
    assert json.loads((run.expert_checkpoint("aspect3") / "state.json").read_text())["threads"] == 1
    torch.set_num_threads(2)  # the autouse fixture restores the count
    with pytest.raises(Interrupt), caplog.at_level("WARNING", logger="sentimerge"):
        experts.main(cfg, tasks=["aspect3"], on_step=stop_at("aspect3", 5))
    assert [r.getMessage() for r in caplog.records if "thread" in r.getMessage()] == [
        "expert aspect3: resumed with 2 torch thread(s) where it started with 1; bf16 math rounds some outputs "
        "differently with the thread count, so the result may differ slightly from an uninterrupted run's (set "
        "`threads: 1` to match it)"]
    caplog.clear()
    torch.set_num_threads(1)
    with caplog.at_level("WARNING", logger="sentimerge"):
        experts.main(cfg, tasks=["aspect3"])
    assert not [r for r in caplog.records if "thread" in r.getMessage()]
    assert is_done(run.expert("aspect3"))


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, cache_dir):
    whole = prepared(tmp_path / "whole", cache_dir)
    experts.main(whole, tasks=["aspect3"])
    broken = prepared(tmp_path / "broken", cache_dir)
    run = RunDir(broken.resolved_run_dir)
    with pytest.raises(Interrupt):  # killed before step 6, after the checkpoint of step 4 and the log of step 5
        experts.main(broken, tasks=["aspect3"], on_step=stop_at("aspect3", 5))
    assert not is_done(run.expert("aspect3")) and run.expert_checkpoint("aspect3").is_dir()
    assert [row["step"] for row in read_jsonl(run.expert_metrics("aspect3"))][-1] == 5
    experts.main(broken, tasks=["aspect3"])

    expected = load_file(RunDir(whole.resolved_run_dir).expert_adapter("aspect3") / "adapter_model.safetensors")
    resumed = load_file(run.expert_adapter("aspect3") / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)
    rows = read_jsonl(run.expert_metrics("aspect3"))
    reference = read_jsonl(RunDir(whole.resolved_run_dir).expert_metrics("aspect3"))
    assert [row["step"] for row in rows] == list(range(7))  # rows after the checkpoint were not duplicated
    assert [row["loss"] for row in rows[1:]] == pytest.approx([row["loss"] for row in reference[1:]], rel=1e-4)
    assert [row["ids"] for row in read_jsonl(run.expert_schedule("aspect3"))] == [
        row["ids"] for row in read_jsonl(RunDir(whole.resolved_run_dir).expert_schedule("aspect3"))]


def test_checkpoint_of_another_config_is_not_reused(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir)
    with pytest.raises(Interrupt):
        experts.main(cfg, tasks=["polarity"], on_step=stop_at("polarity", 3))
    changed = cfg.model_copy(update={"experts": ExpertsConfig.model_validate({**SMALL, "learning_rate": 1e-3})})
    with pytest.raises(SentimergeError, match="--force"):
        experts.main(changed, tasks=["polarity"])
    experts.main(changed, tasks=["polarity"], force=True)
    assert read_manifest(RunDir(cfg.resolved_run_dir).expert("polarity"))["steps"] == 6


def test_keep_best_keeps_the_evaluated_step_with_the_best_dev_metric(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir, keep="best", evaluations=3, dev_examples=12, learning_rate=2e-2)
    experts.main(cfg, tasks=["intensity"])
    run = RunDir(cfg.resolved_run_dir)
    evaluated = [row for row in read_jsonl(run.expert_metrics("intensity")) if "dev" in row and row["step"] > 0]
    assert [row["step"] for row in evaluated] == [2, 4, 6]
    best = max(evaluated, key=lambda row: (row["dev"]["primary"], -row["step"]))
    manifest = read_manifest(run.expert("intensity"))
    assert manifest["kept_step"] == best["step"] and manifest["dev"] == best["dev"]


def test_finished_expert_is_kept_unless_forced(tmp_path, cache_dir):
    cfg = prepared(tmp_path, cache_dir, steps=2, evaluations=1)
    run = RunDir(cfg.resolved_run_dir)
    experts.main(cfg, tasks=["polarity"])
    manifest = run.expert("polarity") / "DONE.json"
    first = manifest.read_text()
    experts.main(cfg, tasks=["polarity"])
    assert manifest.read_text() == first
    (run.expert("polarity") / "marker").write_text("from the first training")
    experts.main(cfg, tasks=["polarity"], force=True)
    assert is_done(run.expert("polarity")) and not (run.expert("polarity") / "marker").exists()


def test_answer_loss_is_cross_entropy_on_the_answer_tokens_only(prepared_tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = RunDir(prepared_tiny.resolved_run_dir)
    path = prepared_model_path(run)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    task = prepared_tiny.task("aspect3")
    encoded = encode(tokenizer, task, load_prepared(run, "aspect3", "train")[:4])
    assert len({len(ids) for ids, _ in encoded}) > 1  # padding is exercised
    with torch.no_grad():
        loss = answer_loss(model, collate(encoded, tokenizer.pad_token_id), torch.device("cpu"), use_autocast=False)
        per_token, counted = [], 0
        for ids, labels in encoded:  # one unpadded sequence at a time, full logits
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            per_token.append(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            counted += int((targets != -100).sum())
            assert targets[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the end of turn is taught too
    assert counted > 2 * len(encoded)  # multi-token answers: the first answer token is not the only target
    torch.testing.assert_close(loss, torch.stack(per_token).sum() / counted, rtol=1e-4, atol=1e-5)


def test_answer_loss_over_the_answers_renormalises_each_answer_token_over_the_answers_continuing_its_prefix(
        prepared_tiny):
    """`experts.answer_space: answers`: the t-th answer token's softmax runs over the t-th tokens of the task's answers
    that share the gold answer's first t tokens; the end of turn keeps the vocabulary; other logits get no gradient."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sentimerge.pipeline.core.prompts import answer_tokens

    run = RunDir(prepared_tiny.resolved_run_dir)
    path = prepared_model_path(run)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    task = prepared_tiny.task("aspect3")
    answers = answer_tokens(tokenizer, task).answers
    assert max(len(answer) for answer in answers) > 1  # later answer tokens are renormalised too
    encoded = encode(tokenizer, task, load_prepared(run, "aspect3", "train")[:4])
    batch = collate(encoded, tokenizer.pad_token_id)
    loss = answer_loss(model, batch, torch.device("cpu"), use_autocast=False, answers=answers)
    total, counted = 0.0, 0
    with torch.no_grad():
        for ids, labels in encoded:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            targets = labels[1:]
            start = next(i for i, token in enumerate(targets) if token != -100)
            gold = next(a for a in answers if tuple(targets[start:start + len(a)]) == a)
            for i in range(start, len(targets)):
                t = i - start
                if t < len(gold):
                    keep = sorted({a[t] for a in answers if len(a) > t and a[:t] == gold[:t]})
                    total += -torch.log_softmax(logits[i, keep], -1)[keep.index(targets[i])].item()
                else:
                    total += torch.nn.functional.cross_entropy(logits[i], torch.tensor(targets[i])).item()
                counted += 1
    assert loss.item() == pytest.approx(total / counted, rel=1e-4)
    assert loss.item() < answer_loss(model, batch, torch.device("cpu"), use_autocast=False).item()
    # answers "3 4", "3 5" and "6" and a row answering "3 5" then end of turn (9): {3, 6}, then {4, 5}, then all
    toy = ((3, 4), (3, 5), (6,))
    allowed = allowed_tokens(torch.tensor([[-100, 3, 5, 9]]), toy, 10)
    assert [torch.nonzero(allowed[0, i]).flatten().tolist() for i in range(4)] == \
        [list(range(10)), [3, 6], [4, 5], list(range(10))]
    logits = torch.randn(1, 4, 10, requires_grad=True)
    torch.nn.functional.cross_entropy(logits.masked_fill(~allowed, float("-inf"))[0], torch.tensor([-100, 3, 5, 9]),
                                      ignore_index=-100).backward()
    assert logits.grad[0, 1][~allowed[0, 1]].abs().sum() == 0 and logits.grad[0, 1][[3, 6]].abs().sum() > 0
    with pytest.raises(ValueError, match="row 0's answer tokens"):
        allowed_tokens(torch.tensor([[-100, 10**6, 5]]), answers, 10)


@pytest.mark.parametrize("loss_of", ["answer_loss", "per_example_losses"])
def test_shared_prefix_batch_gives_the_same_loss_and_gradients(prepared_tiny, loss_of):
    """Computing the common prefix once per batch is an exact rewrite: loss and LoRA gradients match the plain
    left-padded batch, for one task (stage 1) and for a batch mixing tasks (stage 3)."""
    from sentimerge.experts.config import LoraSettings
    from sentimerge.experts.multitask import per_example_losses
    from sentimerge.experts.train import load_lora_model, shared_prefix_length

    run = RunDir(prepared_tiny.resolved_run_dir)
    model, tokenizer = load_lora_model(prepared_model_path(run), LoraSettings(r=4, alpha=8, dropout=0.0),
                                       dtype="float32", device=torch.device("cpu"), seed=0)
    for name in model.state_dict():  # B = 0 at initialisation: give the adapter weights that change the output
        if "lora_B" in name:
            model.get_parameter(name).data.normal_(0, 0.1)
    encoded = encode(tokenizer, prepared_tiny.task("aspect3"), load_prepared(run, "aspect3", "train")[:5])
    mixed = encoded[:3] + encode(tokenizer, prepared_tiny.task("polarity"), load_prepared(run, "polarity", "train")[:3])
    for rows in (encoded, mixed):
        results = []
        for share in (False, True):
            batch = collate(rows, tokenizer.pad_token_id, share_prefix=share, min_saved_tokens=0)
            model.zero_grad()
            if loss_of == "answer_loss":
                loss = answer_loss(model, batch, torch.device("cpu"), use_autocast=False)
            else:
                capture = []
                loss = per_example_losses(model, batch, torch.device("cpu"), use_autocast=False, capture=capture)
                assert capture[0].shape[:2] == (len(rows), batch["answer_width"] + 1)  # the rows' head input only
            loss.sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss.detach(), grads, batch["prefix_ids"]))
        (plain, plain_grads, none), (shared, shared_grads, prefix) = results
        assert none is None and prefix is not None and len(prefix) == shared_prefix_length(rows) >= 8
        torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-6)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_autocast_without_peft_input_casts_gives_the_same_bits(prepared_tiny):
    """Under bf16 autocast, LoRA layers that keep their input in bf16 (`autocast(..., model)`) give the same loss and
    gradients, to the last bit, as peft's default cast of the input to the adapter's float32 and back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sentimerge.experts.config import LoraSettings
    from sentimerge.experts.train import autocast, load_lora_model

    run = RunDir(prepared_tiny.resolved_run_dir)
    model, tokenizer = load_lora_model(prepared_model_path(run), LoraSettings(r=4, alpha=8, dropout=0.0),
                                       dtype="bfloat16", device=torch.device("cpu"), seed=0)
    for name in model.state_dict():
        if "lora_B" in name:
            model.get_parameter(name).data.normal_(0, 0.1)
    rows = encode(tokenizer, prepared_tiny.task("aspect3"), load_prepared(run, "aspect3", "train")[:4])
    batch = collate(rows, tokenizer.pad_token_id)
    casts, results = [], []
    for passed in (None, model):
        model.zero_grad()
        with autocast(torch.device("cpu"), True, passed):
            casts.append({m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer)})
        with autocast(torch.device("cpu"), True, passed):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert casts == [{True}, {False}]  # the switch is real, and restored after the block
    assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][name], grad) for name, grad in results[1][1].items())


def test_shared_prefix_stops_before_the_first_answer_token():
    rows = [([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [-100] * 10 + [11, 12, 13])] * 2
    from sentimerge.experts.train import shared_prefix_length

    assert shared_prefix_length(rows) == 9  # identical rows: the logit that predicts token 11 stays in the rows
    assert shared_prefix_length([rows[0], ([9] + rows[0][0][1:], rows[0][1])]) == 0
    batch = collate(rows, 0, share_prefix=True, min_saved_tokens=9)
    assert batch["prefix_ids"].tolist() == list(range(1, 10)) and batch["answer_width"] == 3
    # 9 tokens x 1 other row save 9 positions: below the default threshold the prefix is not worth its own pass
    assert collate(rows, 0, share_prefix=True)["prefix_ids"] is None
    assert collate(rows, 0, share_prefix=True, min_saved_tokens=10)["prefix_ids"] is None


def test_learning_rate_warms_up_then_decays():
    cfg = ExpertsConfig(steps=20, learning_rate=1e-3, warmup=0.1, schedule="cosine", min_lr_ratio=0.1)
    rates = [learning_rate(step, cfg) for step in range(20)]
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] == pytest.approx(1e-4)


def test_budget_in_examples_or_steps():
    assert ExpertsConfig(examples=100, batch_size=8).total_steps == 13
    assert ExpertsConfig(steps=7).total_steps == 7
    with pytest.raises(ValueError, match="not both"):
        ExpertsConfig(steps=7, examples=100)


def test_cli_rejects_an_unknown_task_before_training(tiny_config_path, capsys):
    code = cli.main(["experts", str(tiny_config_path), "--tasks", "polarty"])
    assert code == 2
    assert "no task named 'polarty' (did you mean 'polarity'?)" in capsys.readouterr().err


def test_cli_needs_a_prepared_run(tiny_config_path, capsys):
    assert cli.main(["experts", str(tiny_config_path)]) == 2
    assert "not prepared" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    if "base_model" in raw:
        cfg = load_config(path)
        assert cfg.experts.total_steps >= 1 and cfg.experts.curriculum.pacing in ("linear", "sqrt", "none")
    else:
        assert load_tasks_file(path).tasks
