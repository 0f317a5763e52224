"""Chat template rendering (pure logic): the model's Jinja template, sandboxed, cached per model."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.config import REPO_ROOT
from services.common.errors import RpcError
from services.inference.domain import Message
from services.inference.templates import ChatTemplates

# Gemma's turn format, as in Google's Gemma 3 template (system folded into the first user turn).
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def test_gemma_turns_with_generation_prompt() -> None:
    prompt = ChatTemplates().render(
        "gemma", GEMMA, [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello")]
    )
    assert prompt == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_bos_token_is_left_to_the_engine() -> None:
    # The engine adds BOS when tokenizing; rendering it too would give the model two.
    assert not ChatTemplates().render("gemma", GEMMA, [Message("user", "Hi")]).startswith("<bos>")


def test_template_raise_exception_is_invalid_argument_on_the_messages_field() -> None:
    with pytest.raises(RpcError) as err:
        ChatTemplates().render("gemma", GEMMA, [Message("user", "a"), Message("user", "b")])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field_violations[0][0] == "messages"
    assert "alternate" in err.value.message


def test_field_name_follows_the_api() -> None:
    with pytest.raises(RpcError) as err:
        ChatTemplates().render("gemma", GEMMA, [Message("assistant", "a")], field="messages.messages")
    assert err.value.field_violations[0][0] == "messages.messages"


def test_sandbox_blocks_unsafe_attribute_access() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(RpcError) as err:
        ChatTemplates().render("m", evil, [Message("user", "x")])
    assert err.value.code == grpc.StatusCode.INTERNAL


def test_broken_template_is_an_internal_error_naming_the_model() -> None:
    with pytest.raises(RpcError) as err:
        ChatTemplates().render("broken-model", "{% for %}", [Message("user", "x")])
    assert err.value.code == grpc.StatusCode.INTERNAL and "broken-model" in err.value.message


def test_compiled_once_per_model_and_template_text() -> None:
    templates = ChatTemplates()
    templates.render("a", GEMMA, [Message("user", "x")])
    templates.render("a", GEMMA, [Message("user", "y")])
    assert len(templates._compiled) == 1
    templates.render("a", "{{ messages[0].content }}", [Message("user", "x")])
    # A model reloaded with a new template replaces its old compiled one.
    assert len(templates._compiled) == 1


def _repository_template() -> str | None:
    config = REPO_ROOT / "triton_models" / "gemma-3-270m" / "config.pbtxt"
    if not config.exists():
        return None
    parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    template = parsed.parameters.get("chat_template")
    return template.string_value if template is not None else None


def test_the_repository_model_template_renders_gemma_turns() -> None:
    source = _repository_template()
    if source is None:
        pytest.skip("triton_models/gemma-3-270m/config.pbtxt has no chat_template yet")
    prompt = ChatTemplates().render("gemma-3-270m", source, [Message("system", "S"), Message("user", "Hi")])
    assert prompt == "<start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\n"
