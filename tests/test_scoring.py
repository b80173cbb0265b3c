"""Scoring answers by log-probability: batched, left-padded, KV-cached scoring equals the closed form."""

from __future__ import annotations

import pytest
import torch

from sentimerge.pipeline.core.errors import ModelError
from sentimerge.pipeline.core.models import load_model
from sentimerge.pipeline.core.prompts import answer_tokens, prompt_ids, training_example
from sentimerge.pipeline.core.rundir import RunDir
from sentimerge.pipeline.core.scoring import TaskScores, score_prompts, score_task
from sentimerge.pipeline.core.upstream import load_prepared, prepared_model_path


@pytest.fixture
def tiny(prepared_tiny):
    run = RunDir(prepared_tiny.resolved_run_dir)
    model, tokenizer = load_model(prepared_model_path(run), dtype="float32")
    return prepared_tiny, run, model, tokenizer


def _brute_force(model, prompt: list[int], answer: tuple[int, ...]) -> float:
    """log P(answer | prompt) from one unpadded forward over prompt + answer."""
    ids = torch.tensor([prompt + list(answer)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer))


@pytest.mark.parametrize("reuse_prefix", [True, False], ids=["shared-prefix-cache", "full-prompts"])
@pytest.mark.parametrize("task_name", ["polarity", "aspect3", "intensity"])
def test_batched_scores_equal_unpadded_full_sequence_logprobs(tiny, task_name, reuse_prefix):
    cfg, run, model, tokenizer = tiny
    task = cfg.task(task_name)
    examples = load_prepared(run, task_name, "dev")[:7]
    prompts = [prompt_ids(tokenizer, task, e) for e in examples]
    answers = answer_tokens(tokenizer, task).answers
    if task_name != "intensity":
        assert any(len(a) > 1 for a in answers), "the tiny tokenizer should split some labels (tests the cache path)"
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise left padding"
    if reuse_prefix:
        shared = next(i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1)
        assert shared >= 8, "the prompts share a prefix worth caching"
    scores = score_prompts(model, prompts, answers, pad_id=tokenizer.pad_token_id, batch_size=3,
                           reuse_prefix=reuse_prefix)
    expected = torch.tensor([[_brute_force(model, p, a) for a in answers] for p in prompts])
    torch.testing.assert_close(scores, expected, atol=2e-4, rtol=1e-4)


def test_scores_do_not_depend_on_batch_size(tiny):
    cfg, run, model, tokenizer = tiny
    task = cfg.task("aspect3")
    examples = load_prepared(run, "aspect3", "dev")
    one = score_task(model, tokenizer, task, examples, batch_size=1).logprobs
    many = score_task(model, tokenizer, task, examples, batch_size=5).logprobs
    torch.testing.assert_close(one, many, atol=2e-4, rtol=1e-4)


def test_regression_prediction_is_the_probability_weighted_level_value(tiny):
    cfg, _, _, _ = tiny
    task = cfg.task("intensity")  # range [-3, 3], 5 levels: -3, -1.5, 0, 1.5, 3
    logprobs = torch.log(torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]) + 1e-12)
    assert TaskScores(task, logprobs).predictions == pytest.approx([0.75, -3.0], abs=1e-6)


def test_classification_prediction_is_the_most_likely_label(tiny):
    cfg, _, _, _ = tiny
    task = cfg.task("aspect3")
    scores = TaskScores(task, torch.tensor([[-3.0, -1.0, -2.0], [-0.1, -5.0, -4.0]]))
    assert scores.predictions == ["neutral", "negative"]
    torch.testing.assert_close(scores.probs.sum(-1), torch.ones(2))


def test_training_example_puts_the_loss_on_the_answer_and_end_of_turn_only(tiny):
    cfg, run, _, tokenizer = tiny
    task = cfg.task("polarity")
    example = load_prepared(run, "polarity", "train")[0]
    input_ids, labels = training_example(tokenizer, task, example)
    prompt = prompt_ids(tokenizer, task, example)
    answer = answer_tokens(tokenizer, task)
    taught = [t for t in labels if t != -100]
    assert input_ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    assert taught == list(answer.answers[task.labels.index(example["label"])]) + [answer.end_of_turn]
    assert tokenizer.decode([answer.end_of_turn]) == "<|im_end|>"


def test_answers_that_prefix_each_other_are_rejected(tiny):
    cfg, _, _, tokenizer = tiny
    task = cfg.task("polarity").model_copy(update={"verbalizers": {"negative": "positive", "positive": "positive positive"}})
    with pytest.raises(ModelError, match="prefix"):
        answer_tokens(tokenizer, task)


def test_the_answer_token_cache_does_not_keep_a_tokenizer_alive(prepared_tiny):
    """A stage's tokenizer (tens of MB for a real vocabulary) is freed when the stage lets it go: the answer-token
    cache holds it weakly, and the cached answers equal a fresh encoding."""
    import gc
    import weakref

    from transformers import AutoTokenizer

    run = RunDir(prepared_tiny.resolved_run_dir)
    tokenizer = AutoTokenizer.from_pretrained(prepared_model_path(run))
    task = prepared_tiny.task("polarity")
    first = answer_tokens(tokenizer, task)
    assert answer_tokens(tokenizer, task) is first
    assert first.answers == tuple(tuple(tokenizer(a, add_special_tokens=False).input_ids) for a in task.answers)
    alive = weakref.ref(tokenizer)
    del tokenizer
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_frozen_weights_score_exactly_like_trainable_ones(prepared_tiny, dtype):
    """A peft base or a merged-and-unloaded model is frozen; its scores must not depend on it (nor its speed: torch's
    matmul took another path for a strided last position, an expanded copy of the output embedding)."""
    run = RunDir(prepared_tiny.resolved_run_dir)
    model, tokenizer = load_model(prepared_model_path(run), dtype=dtype)
    task = prepared_tiny.task("polarity")
    prompts = [prompt_ids(tokenizer, task, e) for e in load_prepared(run, "polarity", "dev")]
    answers = answer_tokens(tokenizer, task).answers
    scores = {}
    for trainable in (True, False):
        model.requires_grad_(trainable)
        scores[trainable] = score_prompts(model, prompts, answers, pad_id=tokenizer.pad_token_id, batch_size=4)
    assert torch.equal(scores[True], scores[False])


def test_bf16_model_keeps_the_order_of_answers_closer_than_bf16_resolution(prepared_tiny):
    """bf16 logits of magnitude 16-32 come in steps of 1/8 nat: two answers closer than that tied or swapped, and
    argmax picked the first label. The scorer's LM head runs in float32, so its order is the float32 head's."""
    run = RunDir(prepared_tiny.resolved_run_dir)
    model, tokenizer = load_model(prepared_model_path(run), dtype="bfloat16")
    task = prepared_tiny.task("polarity")
    prompts = [prompt_ids(tokenizer, task, e) for e in load_prepared(run, "polarity", "dev")]
    first, second = 100, 101  # two answer tokens whose output embeddings differ by a small, seeded direction
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)  # logits spread over tens of nats, as in a trained model
        hidden = torch.stack([model.model(torch.tensor([p])).last_hidden_state[0, -1] for p in prompts]).float()
        centre = hidden.mean(0)
        direction = torch.randn(hidden.shape[1], generator=torch.Generator().manual_seed(0))
        direction -= (direction @ centre) / (centre @ centre) * centre  # the gap varies in sign across prompts
        direction *= 0.05 / ((hidden - centre) @ direction).abs().mean()
        head = model.lm_head.weight
        head[second] = (head[first].float() + direction).to(head.dtype)
        logits = hidden @ head.float().T
        expected = torch.log_softmax(logits, -1)[:, [first, second]]
        bf16_logprobs = torch.log_softmax(logits.bfloat16().float(), -1)[:, [first, second]]
    gap = expected[:, 1] - expected[:, 0]
    assert logits.max() - logits.min() > 16 and gap.abs().max() < 1 / 8, "the case the test is about"
    assert (bf16_logprobs[:, 1] == bf16_logprobs[:, 0]).any(), "bf16 logits tie on some of these prompts"

    scores = score_prompts(model, prompts, ((first,), (second,)), pad_id=tokenizer.pad_token_id, batch_size=4)
    torch.testing.assert_close(scores, expected, atol=5e-3, rtol=0)  # bf16 batching noise
    decided = gap.abs() > 1e-2
    assert decided.sum() >= len(prompts) // 2
    assert torch.equal((scores[:, 1] > scores[:, 0])[decided], (gap > 0)[decided])


def test_ties_are_counted_and_logged_not_hidden(tiny, caplog):
    cfg, _, _, _ = tiny
    task = cfg.task("aspect3")
    scores = TaskScores(task, torch.tensor([[-1.0, -1.0, -3.0], [-0.5, -2.0, -0.25], [-2.0, -0.7, -0.7]]))
    assert scores.ties.tolist() == [True, False, True]
    with caplog.at_level("WARNING", logger="sentimerge.scoring"):
        assert scores.predictions == ["negative", "positive", "neutral"]
    assert "aspect3: 2 of 3 examples have two answers with exactly equal" in caplog.text
    regression = TaskScores(cfg.task("intensity"), torch.zeros(2, 5))
    assert not regression.ties.any()


def test_batch_size_below_one_is_refused(tiny):
    cfg, run, model, tokenizer = tiny
    task = cfg.task("polarity")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        score_task(model, tokenizer, task, load_prepared(run, "polarity", "dev"), batch_size=0)


def test_scoring_uses_the_current_cache_argument(tiny):
    """The KV cache goes to the model under the name this transformers release documents (`past_key_values` is
    deprecated in 5.2x and printed a warning per run): no deprecation warning from the shared-prefix cache path or
    from multi-token answers."""
    import warnings

    cfg, run, model, tokenizer = tiny
    task = cfg.task("aspect3")
    examples = load_prepared(run, "aspect3", "dev")[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        scores = score_prompts(model, [prompt_ids(tokenizer, task, e) for e in examples],
                               answer_tokens(tokenizer, task).answers, pad_id=tokenizer.pad_token_id, batch_size=2,
                               reuse_prefix=True)
    assert torch.isfinite(scores).all()


def test_attention_setting_picks_the_kernel_and_both_score_alike(prepared_tiny):
    """`attention: auto` loads eager attention on CPU (faster for short prompts); sdpa scores the same."""
    from sentimerge.pipeline.core.models import attention_kwargs, set_attention

    run = RunDir(prepared_tiny.resolved_run_dir)
    task = prepared_tiny.task("aspect3")
    examples = load_prepared(run, "aspect3", "dev")
    scores = {}
    try:
        for name in ("auto", "sdpa", "eager"):
            set_attention(name)
            model, tokenizer = load_model(prepared_model_path(run), dtype="float32")
            scores[name] = (model.config._attn_implementation, score_task(model, tokenizer, task, examples).logprobs)
        set_attention("auto")
        assert attention_kwargs("cuda") == {} and attention_kwargs("cpu") == {"attn_implementation": "eager"}
        with pytest.raises(ValueError, match="auto, eager or sdpa"):
            set_attention("flash")
    finally:
        set_attention("auto")
    assert [scores[name][0] for name in ("auto", "sdpa", "eager")] == ["eager", "sdpa", "eager"]
    torch.testing.assert_close(scores["sdpa"][1], scores["eager"][1], atol=2e-4, rtol=1e-4)
