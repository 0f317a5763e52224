"""Context limits: the history that fits a turn's prompt. When the whole stored branch does not fit,
the oldest turns after the system prompt are left out (a turn = a user message and its answer), never
the new message; lengths are counted on the prompt the model will really read (the model's chat template
applied, then its own tokenizer). Nothing stored changes: this only chooses what the prompt holds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from services.inference.domain import Message

Count = Callable[[Sequence[Message]], Awaitable[int]]


@dataclass(frozen=True)
class Fitted:
    messages: list[Message]
    left_out_turns: int
    # The fitted prompt's length in tokens (None when nothing was counted).
    prompt_tokens: int | None


def turns(history: Sequence[Message]) -> list[list[Message]]:
    """The history as turns: each user message with what follows it up to the next user message."""
    grouped: list[list[Message]] = []
    for message in history:
        if message.role == "user" or not grouped:
            grouped.append([message])
        else:
            grouped[-1].append(message)
    return grouped


def _prompt(system: Sequence[Message], grouped: Sequence[Sequence[Message]], left_out: int) -> list[Message]:
    return [*system, *(m for turn in grouped[left_out:] for m in turn)]


async def fit(system_prompt: str, history: Sequence[Message], limit: int, count: Count) -> Fitted:
    """The messages to send: the system prompt, then as many of the latest turns as fit in `limit`
    tokens (the last turn, the one being answered, always). The fewest turns are left out: a binary
    search over how many, each step one count of the rendered prompt."""
    system = [Message(role="system", content=system_prompt)] if system_prompt else []
    grouped = turns(history)
    full = _prompt(system, grouped, 0)
    tokens = await count(full)
    if tokens <= limit or len(grouped) <= 1:
        return Fitted(full, 0, tokens)
    # Invariant: leaving out `low` turns does not fit; leaving out `high` fits (or is the most allowed).
    low, high = 0, len(grouped) - 1
    high_tokens = await count(_prompt(system, grouped, high))
    if high_tokens > limit:
        return Fitted(_prompt(system, grouped, high), high, high_tokens)  # the engine will refuse it
    while high - low > 1:
        middle = (low + high) // 2
        middle_tokens = await count(_prompt(system, grouped, middle))
        if middle_tokens <= limit:
            high, high_tokens = middle, middle_tokens
        else:
            low = middle
    return Fitted(_prompt(system, grouped, high), high, high_tokens)
