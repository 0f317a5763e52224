"""Structured output on a model served by an OpenAI-compatible upstream (llama.cpp's own server, the
stack and upstream of tests/inference/test_upstream_stack.py): response_format and logit_bias are passed
through and honoured there; a grammar, which OpenAI's API has no field for, is refused naming the field
and the model."""

from __future__ import annotations

import httpx
import openai
import pytest

# Module-scoped fixtures: this module's own upstream server and stack (Triton loads nothing).
from tests.inference.test_upstream_stack import UPSTREAM, client, rest, upstream
from tests.structured.shapes import SHAPES, Person, Task

__all__ = ["client", "rest", "upstream"]

pytestmark = pytest.mark.stack


@pytest.mark.parametrize("shape", [Person, Task])
def test_sdk_parse_through_an_upstream(client: openai.OpenAI, shape: type[Person] | type[Task]) -> None:
    reply = client.chat.completions.parse(
        model=UPSTREAM,
        messages=[{"role": "user", "content": SHAPES[shape]}],
        response_format=shape,
        temperature=0,
        max_completion_tokens=300,
    )
    assert isinstance(reply.choices[0].message.parsed, shape)


def test_logit_bias_reaches_the_upstream(rest: httpx.Client) -> None:
    body = {"model": UPSTREAM, "prompt": "The weather today", "max_tokens": 3, "temperature": 0}
    forced = rest.post("/v1/completions", json={**body, "logit_bias": {"5000": 100}}).json()
    # Token 5000 of gemma-3-270m's vocabulary (the upstream serves the same model file).
    assert forced["choices"][0]["text"] == "player" * 3


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"grammar": {"gbnf": 'root ::= "yes"'}}, "grammar.gbnf"),
        ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_what_openai_has_no_field_for_is_refused_naming_the_model(
    rest: httpx.Client, path: str, extra: dict[str, object], param: str
) -> None:
    body: dict[str, object] = {"model": UPSTREAM, "max_tokens": 3, **extra}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    answer = rest.post(path, json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and UPSTREAM in error["message"] and "upstream" in error["message"]
