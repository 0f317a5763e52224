"""Which turns a prompt keeps (pure logic; the stack tests count with the model's own tokenizer)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from services.conversations.context_fit import fit, turns
from services.conversations.domain import StoredMessage, branch, versions
from services.inference.domain import Message


async def _length(messages: Sequence[Message]) -> int:
    """One 'token' per character, so the arithmetic is plain."""
    return sum(len(m.content) for m in messages)


def _history(*contents: str) -> list[Message]:
    return [Message(role="user" if i % 2 == 0 else "assistant", content=c) for i, c in enumerate(contents)]


async def test_everything_fits_nothing_left_out() -> None:
    fitted = await fit("sys", _history("aa", "bb", "cc"), 100, _length)
    assert fitted.left_out_turns == 0 and fitted.prompt_tokens == 9
    assert [m.role for m in fitted.messages] == ["system", "user", "assistant", "user"]


async def test_oldest_turns_go_first_and_the_system_prompt_stays() -> None:
    history = _history("1111", "2222", "3333", "4444", "5555", "6666", "77")
    # system 3 + last turn 2 = 5; each earlier turn adds 8.
    fitted = await fit("sys", history, 12, _length)
    assert fitted.left_out_turns == 3 and [m.content for m in fitted.messages] == ["sys", "77"]
    fitted = await fit("sys", history, 14, _length)
    assert fitted.left_out_turns == 2 and [m.content for m in fitted.messages] == [
        "sys",
        "5555",
        "6666",
        "77",
    ]
    fitted = await fit("sys", history, 21, _length)
    assert fitted.left_out_turns == 1 and fitted.prompt_tokens == 21


async def test_the_new_message_is_never_left_out_even_when_too_long() -> None:
    fitted = await fit("", _history("a", "b", "x" * 50), 10, _length)
    assert fitted.left_out_turns == 1 and [m.content for m in fitted.messages] == ["x" * 50]
    assert fitted.prompt_tokens == 50  # the Inference service then refuses it: PROMPT_TOO_LONG


def test_a_turn_is_a_user_message_and_what_follows() -> None:
    grouped = turns(_history("q1", "a1", "q2"))
    assert [[m.content for m in t] for t in grouped] == [["q1", "a1"], ["q2"]]


def _stored(message_id: int, parent: int | None, role: str) -> StoredMessage:
    now = datetime.now(UTC)
    return StoredMessage(message_id, "c-1", parent, role, f"m{message_id}", 0, 0, 0, 0, "", now)


def test_branches_and_versions_of_a_message_tree() -> None:
    # 1 user, 2 answer; 3 a regenerated answer to 1; 4 an edit of 1 (no parent), 5 its answer.
    stored = [_stored(1, None, "user"), _stored(2, 1, "assistant"), _stored(3, 1, "assistant")]
    stored += [_stored(4, None, "user"), _stored(5, 4, "assistant")]
    assert [m.id for m in branch(stored, 3)] == [1, 3]
    assert [m.id for m in branch(stored, 5)] == [4, 5]
    assert branch(stored, None) == []
    numbers = versions(stored)
    assert numbers[2] == (1, 2) and numbers[3] == (2, 2) and numbers[4] == (2, 2) and numbers[5] == (1, 1)
