"""A stored grammar as the registry sees it: its writable fields (validated from the wire), the row it
is kept as, its proto, and the engine constraint it stands for."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from ferry.grammars.v1 import grammars_pb2

from backends.llamacpp.contract import MAX_CONSTRAINT_BYTES, ConstraintKind, OutputConstraint
from services.common.database import nul_free
from services.common.errors import invalid_argument
from services.common.names import GRAMMARS
from services.common.timestamps import to_timestamp

GrammarProto = grammars_pb2.Grammar
MAX_DISPLAY_NAME = 200
MAX_DESCRIPTION = 4000
# What `update_mask` may name; an empty mask means all of them.
WRITABLE = ("display_name", "description", "syntax", "definition")


class Syntax(StrEnum):
    """A grammar's language, as the `grammars.syntax` column holds it."""

    GBNF = "GBNF"
    LARK = "LARK"

    @classmethod
    def from_proto(cls, value: int, field: str) -> Syntax:
        if value == GrammarProto.Syntax.SYNTAX_UNSPECIFIED:
            raise invalid_argument(field, "is required: SYNTAX_GBNF or SYNTAX_LARK")
        try:
            return cls(GrammarProto.Syntax.Name(value).removeprefix("SYNTAX_"))  # type: ignore[arg-type]
        except ValueError:
            raise invalid_argument(field, f"{value} is not a Syntax (SYNTAX_GBNF or SYNTAX_LARK)") from None

    def to_proto(self) -> grammars_pb2.Grammar.Syntax.ValueType:
        return GrammarProto.Syntax.Value(f"SYNTAX_{self.value}")

    @property
    def constraint_kind(self) -> ConstraintKind:
        return ConstraintKind.GBNF if self is Syntax.GBNF else ConstraintKind.LARK


@dataclass(frozen=True)
class GrammarFields:
    """What a caller may write: everything but the name and the output-only fields."""

    display_name: str
    description: str
    syntax: Syntax
    definition: str

    @classmethod
    def from_proto(cls, grammar: GrammarProto, prefix: str = "grammar") -> GrammarFields:
        """All writable fields of a Create's grammar, checked; errors name `prefix.<field>`."""
        return cls(
            display_name=_display_name(grammar.display_name, f"{prefix}.display_name"),
            description=_description(grammar.description, f"{prefix}.description"),
            syntax=Syntax.from_proto(grammar.syntax, f"{prefix}.syntax"),
            definition=_definition(grammar.definition, f"{prefix}.definition"),
        )

    def updated(self, grammar: GrammarProto, paths: list[str], prefix: str = "grammar") -> GrammarFields:
        """These fields with those named in `paths` taken from `grammar` (checked)."""
        changes: dict[str, Any] = {}
        for path in paths:
            field = f"{prefix}.{path}"
            if path == "display_name":
                changes[path] = _display_name(grammar.display_name, field)
            elif path == "description":
                changes[path] = _description(grammar.description, field)
            elif path == "syntax":
                changes[path] = Syntax.from_proto(grammar.syntax, field)
            elif path == "definition":
                changes[path] = _definition(grammar.definition, field)
        return replace(self, **changes)

    def constraint(self) -> OutputConstraint:
        """What a generation naming this grammar asks of the engine."""
        return OutputConstraint(kind=self.syntax.constraint_kind, grammar=self.definition)


@dataclass(frozen=True)
class StoredGrammar:
    """One row of `grammars`."""

    id: str
    fields: GrammarFields
    creator: str
    etag: str
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        return f"{GRAMMARS}/{self.id}"

    def to_proto(self) -> GrammarProto:
        return GrammarProto(
            name=self.name,
            display_name=self.fields.display_name,
            description=self.fields.description,
            syntax=self.fields.syntax.to_proto(),
            definition=self.fields.definition,
            create_time=to_timestamp(self.create_time),
            update_time=to_timestamp(self.update_time),
            creator=self.creator,
            etag=self.etag,
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StoredGrammar:
        return cls(
            id=row["id"],
            fields=GrammarFields(
                display_name=row["display_name"],
                description=row["description"],
                syntax=Syntax(row["syntax"]),
                definition=row["definition"],
            ),
            creator=row["creator"],
            etag=row["etag"],
            create_time=row["create_time"],
            update_time=row["update_time"],
        )


def update_paths(mask: list[str]) -> list[str]:
    """The writable fields an update mask names (all of them for an empty mask or `*`)."""
    if not mask or mask == ["*"]:
        return list(WRITABLE)
    for path in mask:
        if path not in WRITABLE:
            raise invalid_argument(
                "update_mask", f"{path!r} cannot be updated (writable: {', '.join(WRITABLE)})"
            )
    return list(dict.fromkeys(mask))


def _display_name(value: str, field: str) -> str:
    value = nul_free(value.strip())
    if len(value) > MAX_DISPLAY_NAME:
        raise invalid_argument(field, f"is longer than {MAX_DISPLAY_NAME} characters")
    return str(value)


def _description(value: str, field: str) -> str:
    if len(value) > MAX_DESCRIPTION:
        raise invalid_argument(field, f"is longer than {MAX_DESCRIPTION} characters")
    return str(nul_free(value))


def _definition(value: str, field: str) -> str:
    if not value.strip():
        raise invalid_argument(field, "is required: the grammar's text")
    if len(value.encode()) > MAX_CONSTRAINT_BYTES:
        raise invalid_argument(field, f"is longer than {MAX_CONSTRAINT_BYTES} bytes")
    if "\x00" in value:
        # Stored as it is written or not at all: a changed grammar would mean something else.
        raise invalid_argument(field, "must not contain NUL characters")
    return value
