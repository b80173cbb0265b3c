"""The curriculum: signals order examples as their metadata says, pacing opens the pool, the sampler resumes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sentimerge.curriculum.pacing import PACINGS, competence
from sentimerge.curriculum.sampler import CurriculumSampler
from sentimerge.curriculum.signals import (
    SIGNALS,
    TASK_SIGNALS,
    SignalInputs,
    TaskFacts,
    example_difficulty,
    label_polarities,
    task_difficulty,
)
from sentimerge.pipeline.core.config import load_config
from sentimerge.pipeline.core.errors import ConfigError
from sentimerge.pipeline.core.tasks import TaskSpec
from tests.conftest import write_tiny_config

THREE_WAY = TaskSpec.model_validate({"name": "t3", "kind": "classification", "instruction": "Sentiment?",
                                     "labels": ["negative", "neutral", "positive"], "source": {"path": "x.jsonl"}})
REGRESSION = TaskSpec.model_validate({"name": "reg", "kind": "regression", "instruction": "How positive?",
                                      "range": [-1.0, 1.0], "levels": 5, "source": {"path": "x.jsonl"}})


def example(i: int, text: str, label, **meta) -> dict:
    return {"id": f"e{i}", "text": text, "aspect": None, "label": label, "meta": meta}


def test_registries_list_every_signal_and_pacing():
    assert SIGNALS.names() == ["agreement", "length", "rarity", "lexicon", "base_loss"]
    assert TASK_SIGNALS.names() == ["labels", "regression", "length", "zero_shot"]
    assert PACINGS.names() == ["linear", "sqrt", "none"]


@pytest.mark.parametrize("section, message", [
    ({"signals": {"agrement": 1.0}}, "unknown difficulty signal 'agrement' (did you mean 'agreement'?)"),
    ({"task_signals": {"zeroshot": 1.0}}, "did you mean 'zero_shot'?"),
    ({"pacing": "sqr"}, "unknown pacing function 'sqr' (did you mean 'sqrt'?)"),
    ({"signals": {"length": -1.0}}, "weight of 'length' must be >= 0"),
    ({"sigals": {}}, "unknown key (did you mean 'signals'?)"),
])
def test_unknown_names_fail_with_a_suggestion(tmp_path, cache_dir, section, message):
    path = write_tiny_config(tmp_path, cache_dir=cache_dir, experts={"curriculum": section})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "experts.curriculum" in str(error.value) and message in str(error.value)


def order_by(weights: dict, examples: list[dict], task: TaskSpec = THREE_WAY, lengths=None, base_loss=None,
             polarity=None) -> list[str]:
    inputs = SignalInputs(task, examples, lengths or [10] * len(examples), base_loss=base_loss,
                          label_polarity=polarity or {})
    difficulty = example_difficulty(weights, inputs)
    return [examples[i]["id"] for i in difficulty.order()]


def test_low_agreement_is_hard_and_missing_agreement_sits_in_the_middle():
    examples = [example(0, "a", "neutral", agreement=50), example(1, "b", "neutral", agreement=100),
                example(2, "c", "neutral"), example(3, "d", "neutral", agreement=66),
                example(4, "e", "neutral", agreement=75)]
    assert order_by({"agreement": 1.0}, examples) == ["e1", "e4", "e2", "e3", "e0"]


def test_long_inputs_are_hard():
    examples = [example(i, "x", "neutral") for i in range(4)]
    assert order_by({"length": 1.0}, examples, lengths=[30, 5, 90, 12]) == ["e1", "e3", "e0", "e2"]


def test_rare_labels_are_hard():
    examples = [example(0, "a", "negative"), example(1, "b", "positive"), example(2, "c", "positive"),
                example(3, "d", "positive"), example(4, "e", "neutral"), example(5, "f", "neutral")]
    assert order_by({"rarity": 1.0}, examples)[-1] == "e0"
    assert set(order_by({"rarity": 1.0}, examples)[:3]) == {"e1", "e2", "e3"}


def test_text_whose_lexicon_polarity_contradicts_the_gold_label_is_hard():
    examples = [example(0, "What a wonderful, great, lovely film!", "negative"),
                example(1, "What a wonderful, great, lovely film!", "positive"),
                example(2, "The meeting is on Monday.", "neutral"),
                example(3, "A horrible, awful, boring mess.", "positive")]
    order = order_by({"lexicon": 1.0}, examples)
    assert set(order[:2]) == {"e1", "e2"} and set(order[2:]) == {"e0", "e3"}


def test_regression_gold_polarity_comes_from_the_range():
    examples = [example(0, "A horrible, awful mess.", 0.9), example(1, "A horrible, awful mess.", -0.9)]
    assert order_by({"lexicon": 1.0}, examples, task=REGRESSION) == ["e1", "e0"]


def test_base_loss_orders_by_the_models_loss_and_is_only_computed_when_weighted():
    examples = [example(i, "x", "neutral") for i in range(3)]
    calls = []

    def losses():
        calls.append(1)
        return np.array([2.0, 0.1, 0.7])

    assert order_by({"base_loss": 1.0}, examples, base_loss=losses) == ["e1", "e2", "e0"]
    order_by({"length": 1.0, "base_loss": 0.0}, examples, base_loss=losses)
    assert len(calls) == 1


def test_weights_decide_which_signal_wins():
    examples = [example(0, "x", "neutral", agreement=50), example(1, "y", "neutral", agreement=100)]
    lengths = [5, 50]  # e0 is short but disputed; e1 is long but unanimous
    assert order_by({"agreement": 3.0, "length": 1.0}, examples, lengths=lengths) == ["e1", "e0"]
    assert order_by({"agreement": 1.0, "length": 3.0}, examples, lengths=lengths) == ["e0", "e1"]


def test_signals_that_do_not_apply_are_skipped_and_reported():
    irony = TaskSpec.model_validate({"name": "irony", "kind": "classification", "instruction": "Ironic?",
                                     "labels": ["irony", "non_irony"], "source": {"path": "x.jsonl"}})
    examples = [example(0, "sure, great", "irony"), example(1, "nice day", "non_irony")]
    inputs = SignalInputs(irony, examples, [4, 8])
    difficulty = example_difficulty({"agreement": 1.0, "lexicon": 1.0, "base_loss": 1.0, "length": 1.0}, inputs)
    assert difficulty.skipped == ["agreement", "lexicon", "base_loss"]
    assert difficulty.weights == {"length": 1.0}
    assert list(difficulty.scores) == [0.0, 1.0]


def test_label_polarity_from_vader_with_overrides():
    assert label_polarities(THREE_WAY, {}) == {"negative": -1.0, "neutral": 0.0, "positive": 1.0}
    fin = TaskSpec.model_validate({"name": "fin", "kind": "classification", "instruction": "?",
                                   "labels": ["bearish", "bullish", "neutral"], "source": {"path": "x.jsonl"}})
    assert all(math.isnan(value) for value in label_polarities(fin, {}).values())
    assert label_polarities(fin, {"bearish": -1.0, "bullish": 1.0, "neutral": 0.0}) == {
        "bearish": -1.0, "bullish": 1.0, "neutral": 0.0}


@pytest.mark.parametrize("pacing, step, expected", [
    ("linear", 0, 0.25), ("linear", 35, 0.625), ("linear", 70, 1.0), ("linear", 99, 1.0),
    ("sqrt", 0, 0.25), ("sqrt", 35, math.sqrt(0.0625 + 0.9375 * 0.5)), ("sqrt", 70, 1.0),
    ("none", 0, 1.0), ("none", 50, 1.0),
])
def test_pacing_functions(pacing, step, expected):
    assert competence(pacing, step, 100, start=0.25, full_at=0.7) == pytest.approx(expected)


def make_sampler(pacing: str = "linear", seed: int = 0, size: int = 40) -> CurriculumSampler:
    order = np.arange(size)[::-1]  # the last pool index is the easiest
    lengths = [(7 * i) % 23 + 5 for i in range(size)]
    return CurriculumSampler(order, lengths, batch_size=4, total_steps=20, pacing=pacing, start=0.25, full_at=0.5,
                             bucket=2, seed=seed)


def test_sampler_draws_from_the_easiest_share_first():
    sampler = make_sampler()
    first = sampler.next_batch(0)
    assert first["available"] == 10 and set(first["indices"]) <= set(range(30, 40))
    late = [sampler.next_batch(step) for step in range(1, 20)][-1]
    assert late["available"] == 40 and late["competence"] == 1.0


def test_stratified_sampler_opens_the_easiest_share_of_every_answer():
    size = 40
    order = np.arange(size)[::-1]  # the last pool index is the easiest
    strata = [0 if i >= 8 else 1 for i in range(size)]  # the 32 easiest are answer 0, the 8 hardest answer 1
    lengths = [10] * size
    plain = CurriculumSampler(order, lengths, batch_size=4, total_steps=20, pacing="sqrt", start=0.25, full_at=0.5,
                              bucket=2, seed=0)
    assert {strata[i] for i in plain.next_batch(0)["indices"] + plain.next_batch(0)["indices"]} == {0}
    sampler = CurriculumSampler(order, lengths, batch_size=4, total_steps=20, pacing="sqrt", start=0.25, full_at=0.5,
                                bucket=2, seed=0, strata=strata)
    first = sampler.next_batch(0)
    # 25% of each answer: the 8 easiest of answer 0 (indices 39..32) and the 2 easiest of answer 1 (7, 6)
    assert first["available"] == 10
    drawn = first["indices"] + sampler.next_batch(0)["indices"]
    assert set(drawn) <= set(range(32, 40)) | {6, 7} and {strata[i] for i in drawn} == {0, 1}


def test_random_order_draws_every_example_once_before_repeating():
    sampler = make_sampler("none")
    drawn = [i for step in range(10) for i in sampler.next_batch(step)["indices"]]
    assert sorted(drawn) == list(range(40))


def test_bucketed_batches_hold_similar_lengths():
    sampler = make_sampler("none")
    batches = [sampler.next_batch(step)["indices"] for step in range(2)]
    lengths = sampler.lengths
    low, high = sorted(batches, key=lambda batch: lengths[batch].max())
    assert lengths[low].max() <= lengths[high].min()


def test_sampler_state_round_trips_through_json():
    import json

    original, restored = make_sampler("sqrt", seed=3), make_sampler("sqrt", seed=99)
    for step in range(3):
        original.next_batch(step)
    restored.load_state(json.loads(json.dumps(original.state())))
    assert [original.next_batch(s) for s in range(3, 12)] == [restored.next_batch(s) for s in range(3, 12)]


def test_task_difficulty_uses_the_task_metadata():
    binary = TaskSpec.model_validate({"name": "b", "kind": "classification", "instruction": "?",
                                      "labels": ["negative", "positive"], "source": {"path": "x.jsonl"}})
    weights = {"labels": 1.0, "regression": 1.0, "length": 1.0, "zero_shot": 1.0}
    easy = task_difficulty(weights, TaskFacts(binary, average_length=19.2, zero_shot=0.9))
    assert easy["signals"] == {"labels": 0.5, "regression": 0.0, "length": 0.1, "zero_shot": 0.2}
    assert easy["difficulty"] == pytest.approx(0.2)
    hard = task_difficulty(weights, TaskFacts(REGRESSION, average_length=19.2, zero_shot=-0.1))
    assert hard["signals"]["zero_shot"] == 1.0 and hard["difficulty"] > easy["difficulty"]
    at_chance = task_difficulty({"zero_shot": 1.0}, TaskFacts(THREE_WAY, 10.0, zero_shot=1 / 3))
    assert at_chance["difficulty"] == pytest.approx(1.0)


def test_base_losses_are_kept_per_example_not_per_id(tmp_path):
    """SemEval's aspect layout: one sentence id, two aspects, two labels; each row has its own base-model loss."""
    from sentimerge.pipeline.experts import cached_base_losses

    rows = [{"id": "s1", "text": "the food was good but the service slow", "aspect": aspect, "label": label}
            for aspect, label in (("food", "positive"), ("service", "negative"))]
    computed = []

    def compute(missing):
        computed.append(len(missing))
        return np.array([1.0 if row["aspect"] == "food" else 2.0 for row in missing])

    path = tmp_path / "base_loss.json"
    assert cached_base_losses(path, "model", rows, compute).tolist() == [1.0, 2.0]
    assert cached_base_losses(path, "model", rows[::-1], compute).tolist() == [2.0, 1.0]  # from the cache
    assert computed == [2]
    assert len(json.loads(path.read_text())["losses"]) == 2
