"""The engine contract (backends.llamacpp.contract) on its own: no Triton needed."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from backends.llamacpp.contract import (
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    EngineErrorCode,
    EngineFault,
    SamplingParameters,
)


def _error_locs(text: str) -> list[tuple[int | str, ...]]:
    with pytest.raises(ValidationError) as info:
        SamplingParameters.from_json(text)
    return [tuple(error["loc"]) for error in info.value.errors()]


def test_empty_text_means_defaults() -> None:
    assert SamplingParameters.from_json("") == SamplingParameters()
    assert SamplingParameters.from_json("  \n") == SamplingParameters()
    assert SamplingParameters.from_json("{}") == SamplingParameters()


def test_to_json_is_compact_and_round_trips() -> None:
    params = SamplingParameters(temperature=0.5, stop=("\n", "END"), seed=(1 << 64) - 1, logprobs=True)
    text = params.to_json()
    assert json.loads(text) == {
        "temperature": 0.5,
        "stop": ["\n", "END"],
        "seed": (1 << 64) - 1,
        "logprobs": True,
    }
    assert " " not in text
    assert SamplingParameters.from_json(text) == params
    assert SamplingParameters().to_json() == "{}"


def test_every_field_round_trips() -> None:
    params = SamplingParameters(
        temperature=2,
        top_p=1,
        top_k=-1,
        min_p=0,
        max_tokens=1,
        stop=("a",) * MAX_STOP_SEQUENCES,
        seed=-(1 << 63),
        frequency_penalty=-2,
        presence_penalty=2,
        repetition_penalty=2,
        logprobs=True,
        top_logprobs=MAX_TOP_LOGPROBS,
        ignore_eos=True,
        max_prompt_tokens=1,
    )
    assert SamplingParameters.from_json(params.to_json()) == params


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        ('{"temperature": 2.01}', ("temperature",)),
        ('{"temperature": -0.1}', ("temperature",)),
        ('{"temperature": true}', ("temperature",)),
        ('{"temperature": "0.5"}', ("temperature",)),
        ('{"temperature": NaN}', ("temperature",)),
        ('{"temperature": 1e999}', ("temperature",)),
        ('{"top_p": 0}', ("top_p",)),
        ('{"top_p": 1.5}', ("top_p",)),
        ('{"top_k": -2}', ("top_k",)),
        ('{"top_k": 1.5}', ("top_k",)),
        ('{"top_k": true}', ("top_k",)),
        ('{"top_k": "3"}', ("top_k",)),
        ('{"min_p": 1.1}', ("min_p",)),
        ('{"max_tokens": 0}', ("max_tokens",)),
        ('{"seed": 18446744073709551616}', ("seed",)),
        ('{"seed": -9223372036854775809}', ("seed",)),
        ('{"frequency_penalty": 2.5}', ("frequency_penalty",)),
        ('{"presence_penalty": -2.5}', ("presence_penalty",)),
        ('{"repetition_penalty": 0}', ("repetition_penalty",)),
        ('{"repetition_penalty": 2.5}', ("repetition_penalty",)),
        ('{"logprobs": 1}', ("logprobs",)),
        ('{"ignore_eos": "yes"}', ("ignore_eos",)),
        ('{"top_logprobs": 21, "logprobs": true}', ("top_logprobs",)),
        ('{"top_logprobs": 2}', ("top_logprobs",)),
        ('{"max_prompt_tokens": 0}', ("max_prompt_tokens",)),
        ('{"best_of": 2}', ("best_of",)),
        ('{"stop": ["a", ""]}', ("stop", 1)),
        ('{"stop": ["a", 3]}', ("stop", 1)),
        ('{"stop": ["a", "b", "c", "d", "e"]}', ("stop",)),
        ('{"stop": "a"}', ("stop",)),
        ("[1]", ()),
        ("{not json", ()),
    ],
)
def test_refusals_name_the_field(text: str, loc: tuple[int | str, ...]) -> None:
    assert loc in _error_locs(text)


def test_integral_floats_are_integers() -> None:
    assert SamplingParameters.from_json('{"max_tokens": 3.0, "top_k": 40.0}').max_tokens == 3


def test_integers_are_numbers() -> None:
    assert SamplingParameters.from_json('{"temperature": 1}').temperature == 1.0


def test_parameters_are_frozen() -> None:
    params = SamplingParameters()
    with pytest.raises(ValidationError):
        params.temperature = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("code", "triton_code"),
    [
        (EngineErrorCode.INVALID_PARAMETER, "INVALID_ARG"),
        (EngineErrorCode.PROMPT_TOO_LONG, "INVALID_ARG"),
        (EngineErrorCode.MODEL_UNLOADING, "UNAVAILABLE"),
        (EngineErrorCode.ENGINE_FAILED, "INTERNAL"),
    ],
)
def test_every_code_has_a_triton_code(code: EngineErrorCode, triton_code: str) -> None:
    assert code.triton_code == triton_code


def test_fault_round_trips_through_its_message() -> None:
    fault = EngineFault(
        code=EngineErrorCode.PROMPT_TOO_LONG,
        message="the prompt does not fit",
        prompt_tokens=5000,
        context_length=4096,
        limit="model",
    )
    message = fault.to_message()
    assert json.loads(message)["code"] == "PROMPT_TOO_LONG"
    assert "field" not in json.loads(message)
    assert EngineFault.from_message(message) == fault
    unloading = EngineFault(code=EngineErrorCode.MODEL_UNLOADING, message="bye", retry_after_seconds=1.0)
    assert EngineFault.from_message(unloading.to_message()) == unloading


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Request for unknown model: 'x' is not found",
        "[INVALID_ARGUMENT field=stop] old prose",
        "{not json",
        '{"message": "no code"}',
        '{"code": "SOMETHING_ELSE", "message": "x"}',
        "[1, 2]",
    ],
)
def test_other_messages_are_not_faults(text: str) -> None:
    assert EngineFault.from_message(text) is None
