"""ferry's JSON Schema gate: schemas it cannot enforce are refused naming the field and keyword; answers
are checked against their schema."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from services.common.errors import RpcError
from services.inference.json_schema import check_schema, validate_instance

FIELD = "response_format.json_schema.schema"


class Address(BaseModel):
    city: str
    zip_code: str | None = None


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=130)
    score: float = Field(ge=0, le=1)
    kind: Literal["a", "b"]
    tags: list[str]
    address: Address


def test_pydantic_schemas_are_accepted() -> None:
    check_schema(Person.model_json_schema(), FIELD)


@pytest.mark.parametrize(
    ("schema", "where", "says"),
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, f"{FIELD}.properties.a.type", "valid"),
        (
            {"type": "object", "properties": {"a": {"minLength": "x"}}},
            f"{FIELD}.properties.a.minLength",
            "integer",
        ),
        ({"type": "object", "not": {"type": "string"}}, FIELD, '"not"'),
        ({"type": "array", "uniqueItems": True}, FIELD, "uniqueItems"),
        ({"$ref": "#/$defs/Missing"}, FIELD, "Missing"),
        ([{"type": "object"}], FIELD, "must be a JSON Schema object"),
    ],
)
def test_schemas_it_cannot_enforce_are_refused_by_name(schema: Any, where: str, says: str) -> None:
    with pytest.raises(RpcError) as err:
        check_schema(schema, FIELD)
    assert err.value.field_violations[0][0] == where
    assert says in err.value.message


def test_answers_are_checked_against_their_schema() -> None:
    schema = Person.model_json_schema()
    good = Person(name="x", age=3, score=0.5, kind="a", tags=[], address=Address(city="c"))
    assert validate_instance(good.model_dump_json(), schema) is None
    assert "schema" in (validate_instance('{"name": "x"}', schema) or "")
    assert "not JSON" in (validate_instance('{"name": ', schema) or "")
    assert validate_instance("[]", None) == "the answer is not a JSON object"
    assert validate_instance("{}", None) is None


def test_multiple_of_is_exact_on_decimals() -> None:
    # Float division would call 0.8 "not a multiple of 1e-06" and fail a good answer.
    assert validate_instance("0.8", {"type": "number", "multipleOf": 1e-6}) is None
    assert validate_instance("0.3", {"type": "number", "multipleOf": 0.1}) is None
    assert "multiple" in (validate_instance("0.85", {"type": "number", "multipleOf": 0.1}) or "")
