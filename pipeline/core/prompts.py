"""Chat prompts and answer targets: the one place that turns an example into tokens.

Training (stages 1 and 3) and scoring use the same encoding, so a model is scored on exactly the answer
tokens it was taught: `prompt_ids(...)` is the chat-templated user turn with the generation prompt, and the answer
is the verbalised label followed by the template's end-of-turn token.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from sentimerge.pipeline.core.errors import ModelError
from sentimerge.pipeline.core.tasks import TaskSpec

_PROBE = "\u00a7\u00a7answer\u00a7\u00a7"


def user_message(task: TaskSpec, text: str, aspect: str | None) -> str:
    """The user turn: instruction, the allowed answers, then the input fields."""
    lines = [task.instruction.strip(), f"Answer with one of: {', '.join(task.answers)}.", ""]
    lines.append(f"Text: {text}")
    if "aspect" in task.input_fields:
        lines.append(f"Aspect: {aspect}")
    return "\n".join(lines)


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def chat_messages(tokenizer, task: TaskSpec, example: dict, *, demonstrations: bool = True) -> list[dict[str, str]]:
    """The chat that asks `task` about `example`: the system turn (unless null), then each of the task's
    demonstrations as a user turn and the assistant's answer (with `demonstrations`), then the question."""
    def ask(item: dict) -> dict[str, str]:
        text = truncate_text(tokenizer, item["text"], task.max_text_tokens)
        return {"role": "user", "content": user_message(task, text, item.get("aspect"))}

    messages = [] if task.system_prompt is None else [{"role": "system", "content": task.system_prompt}]
    for demo in task.demonstrations if demonstrations else []:
        messages += [ask(demo.model_dump()), {"role": "assistant", "content": task.answers[task.answer_index(demo.label)]}]
    return messages + [ask(example)]


def prompt_ids(tokenizer, task: TaskSpec, example: dict, *, demonstrations: bool = True) -> list[int]:
    """Token ids of the chat prompt that asks `task` about `example`, ending where the answer starts; with the task's
    demonstrations before the question unless `demonstrations` is False (training prompts)."""
    messages = chat_messages(tokenizer, task, example, demonstrations=demonstrations)
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except Exception as error:  # e.g. a template without a system role
        raise ModelError(f"task {task.name}: the chat template rejects the prompt ({error}); "
                         "set the task's `system_prompt: null` if it has no system role") from None
    return list(rendered["input_ids"])


@dataclass(frozen=True)
class AnswerTokens:
    """The token ids of each answer of a task, and the end-of-turn id that closes an answer in training."""

    answers: tuple[tuple[int, ...], ...]
    end_of_turn: int | None


# tokenizer -> {answers: AnswerTokens}; weak keys, so the cache never keeps a stage's tokenizer (tens of MB of
# vocabulary) alive after the stage let it go, as an lru_cache keyed by the tokenizer did
_ANSWER_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def answer_tokens(tokenizer, task: TaskSpec) -> AnswerTokens:
    """The task's answers as token ids under `tokenizer` (computed once per tokenizer and answer list)."""
    answers = tuple(task.answers)
    known = _ANSWER_TOKENS.setdefault(tokenizer, {})
    if answers not in known:
        known[answers] = _answer_tokens(tokenizer, answers)
    return known[answers]


def _answer_tokens(tokenizer, answers: tuple[str, ...]) -> AnswerTokens:
    encoded = tuple(tuple(tokenizer(answer, add_special_tokens=False).input_ids) for answer in answers)
    for i, first in enumerate(encoded):
        if not first:
            raise ModelError(f"answer {answers[i]!r} encodes to no tokens")
        for j, second in enumerate(encoded):
            if i != j and second[: len(first)] == first:
                raise ModelError(f"answer {answers[i]!r} is a token prefix of {answers[j]!r}; "
                                 "change the verbalizers so that no answer starts another")
    return AnswerTokens(encoded, end_of_turn_id(tokenizer))


def end_of_turn_id(tokenizer) -> int | None:
    """The first token the chat template puts after an assistant message (e.g. <|im_end|>)."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as error:  # a tokenizer without a chat template
        raise ModelError(f"the tokenizer has no usable chat template: {error}") from None
    tail = rendered.split(_PROBE, 1)[1]
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    return ids[0] if ids else tokenizer.eos_token_id


def training_example(tokenizer, task: TaskSpec, example: dict, answer: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for teacher forcing: the loss falls on the answer and end-of-turn tokens only."""
    prompt = prompt_ids(tokenizer, task, example, demonstrations=False)  # demonstrations are for asking, not teaching
    tokens = answer_tokens(tokenizer, task)
    index = task.answer_index(example["label"]) if answer is None else answer
    target = list(tokens.answers[index]) + ([tokens.end_of_turn] if tokens.end_of_turn is not None else [])
    return prompt + target, [-100] * len(prompt) + target
