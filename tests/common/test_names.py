"""Ids and resource names (services/common/names.py), the one set of rules every service applies."""

from __future__ import annotations

import grpc
import pytest

from services.common.context import accept_request_id
from services.common.errors import RpcError
from services.common.names import KEY_ID, KEYS, REQUEST_ID, TRANSACTIONS, is_request_id, resource_id


@pytest.mark.parametrize("value", ["a", "req-1.2_3:4", "x" * 128, "0af7651916cd43dd8448eb211c80319c"])
def test_well_formed_request_ids_are_kept(value: str) -> None:
    assert is_request_id(value)
    assert accept_request_id(value) == value


@pytest.mark.parametrize("value", ["", "x" * 129, "a b", "a/b", "é"])
def test_other_request_ids_are_replaced(value: str) -> None:
    assert not is_request_id(value)
    assert is_request_id(accept_request_id(value)) and accept_request_id(value) != value


def test_resource_names_parse_to_their_id() -> None:
    assert resource_id("transactions/req-1", TRANSACTIONS, REQUEST_ID) == "req-1"
    assert resource_id("keys/k_1", KEYS, KEY_ID) == "k_1"


@pytest.mark.parametrize("name", ["", "transactions/", "keys/req-1", "transactions/a b", "transactions"])
def test_malformed_resource_names_are_invalid_argument_naming_the_field(name: str) -> None:
    with pytest.raises(RpcError) as err:
        resource_id(name, TRANSACTIONS, REQUEST_ID, field="parent")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field_violations[0][0] == "parent"
