"""Pagination stops, with an error, when a server hands back the token it was sent (a loop otherwise)."""

from __future__ import annotations

import pytest
from ferry.models.v1 import models_pb2
from ferry_client import paginate


def test_a_repeated_page_token_stops_the_iteration() -> None:
    def list_models(request: models_pb2.ListModelsRequest) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(
            models=[models_pb2.Model(name="models/a")], next_page_token="same"
        )

    seen = []
    with pytest.raises(RuntimeError, match="page token"):
        for model in paginate(list_models, models_pb2.ListModelsRequest(), lambda page: page.models):
            seen.append(model.name)
    assert seen == ["models/a", "models/a"]
