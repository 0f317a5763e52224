"""Resource names and page tokens of the Models service (pure logic)."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import RpcError
from services.models.servicer import decode_page_token, encode_page_token, parse_model_name


def test_model_name_parses_to_model_id() -> None:
    assert parse_model_name("models/gemma-3-270m") == "gemma-3-270m"


@pytest.mark.parametrize("name", ["", "gemma-3-270m", "models/", "models/a/b", "transactions/x"])
def test_malformed_model_names_are_invalid_argument_naming_the_field(name: str) -> None:
    with pytest.raises(RpcError) as err:
        parse_model_name(name)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field_violations[0][0] == "name"


def test_page_token_round_trips() -> None:
    assert decode_page_token(encode_page_token(50)) == 50
    assert decode_page_token("") == 0


@pytest.mark.parametrize("token", ["garbage!", "bW9kZWxzOng=", encode_page_token(3).upper()])
def test_malformed_page_token_is_invalid_argument(token: str) -> None:
    with pytest.raises(RpcError) as err:
        decode_page_token(token)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in err.value.message
