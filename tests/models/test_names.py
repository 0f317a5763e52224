"""Resource names and pages of the Models service (pure logic; Triton's index is a stub)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from ferry.models.v1 import models_pb2

from services.common.errors import RpcError
from services.common.model_names import ModelNames
from services.common.names import model_id_from_name
from services.models.servicer import ModelsServicer


def test_model_name_parses_to_model_id() -> None:
    assert model_id_from_name("models/gemma-3-270m") == "gemma-3-270m"


@pytest.mark.parametrize("name", ["", "gemma-3-270m", "models/", "models/a/b", "transactions/x"])
def test_malformed_model_names_are_invalid_argument_naming_the_field(name: str) -> None:
    with pytest.raises(RpcError) as err:
        model_id_from_name(name)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field_violations[0][0] == "name"


def test_a_bare_model_id_is_accepted_only_when_asked() -> None:
    assert model_id_from_name("gemma-3-270m", "model", bare_id=True) == "gemma-3-270m"
    assert model_id_from_name("models/gemma-3-270m", "model", bare_id=True) == "gemma-3-270m"
    with pytest.raises(RpcError) as err:
        model_id_from_name("-bad", "model", bare_id=True)
    assert err.value.field_violations[0][0] == "model"


class RepositoryStub:
    """Triton's repository index with models that are not loaded (no config to read)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    async def get_model_repository_index(self, as_json: bool) -> dict[str, Any]:
        return {"models": [{"name": n, "state": "UNAVAILABLE"} for n in self.names]}


async def list_all(servicer: ModelsServicer, size: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        response = await servicer.ListModels(
            models_pb2.ListModelsRequest(page_size=size, page_token=token),
            None,  # type: ignore[arg-type]
        )
        pages.append([m.model_id for m in response.models])
        token = response.next_page_token
        if not token:
            return pages


async def test_models_are_listed_in_pages_by_name() -> None:
    repository = RepositoryStub(["e", "c", "a", "d", "b"])
    servicer = ModelsServicer(repository, ModelNames())  # type: ignore[arg-type]
    assert await list_all(servicer, 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert await list_all(servicer, 0) == [["a", "b", "c", "d", "e"]]


async def test_a_model_added_between_pages_shifts_nothing() -> None:
    repository = RepositoryStub(["b", "d", "f"])
    servicer = ModelsServicer(repository, ModelNames())  # type: ignore[arg-type]
    first = await servicer.ListModels(models_pb2.ListModelsRequest(page_size=2), None)  # type: ignore[arg-type]
    repository.names.append("a")  # sorts before the page already seen
    rest = await servicer.ListModels(
        models_pb2.ListModelsRequest(page_size=2, page_token=first.next_page_token),
        None,  # type: ignore[arg-type]
    )
    assert [m.model_id for m in rest.models] == ["f"]


@pytest.mark.parametrize("token", ["garbage!", "bW9kZWxzOng="])
async def test_malformed_page_token_is_invalid_argument(token: str) -> None:
    servicer = ModelsServicer(RepositoryStub(["a"]), ModelNames())  # type: ignore[arg-type]
    with pytest.raises(RpcError) as err:
        await servicer.ListModels(models_pb2.ListModelsRequest(page_token=token), None)  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.reason == "INVALID_PAGE_TOKEN"
