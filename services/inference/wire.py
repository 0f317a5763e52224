"""A request as one API received it, before parsing: what the parse stage needs of every API's parser
(`openai.chat.ChatWire`, `openai.completions.CompletionWire`, `native.generate.GenerateWire`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from services.common.errors import invalid_argument
from services.inference.domain import Api, FieldSpelling, GenerationRequest
from services.inference.sampling import sampling_parameters


class _Named(Protocol):
    @property
    def model(self) -> str: ...


Received = TypeVar("Received", bound=_Named)


class WireRequest(ABC, Generic[Received]):
    api: ClassVar[Api]

    def __init__(self, message: Received, *, stream: bool) -> None:
        self.message = message
        self.stream = stream

    @property
    def model(self) -> str:
        """The model as the caller named it (a metrics label only if the model is known)."""
        return self.message.model

    @abstractmethod
    def parse(self) -> GenerationRequest:
        """The domain request, or RpcError (INVALID_ARGUMENT naming the field as the caller spelled it)."""

    def _request(
        self, model: str, sampling: Mapping[str, Any], spelling: FieldSpelling, **fields: Any
    ) -> GenerationRequest:
        """The domain request, its `sampling` values checked by the contract (refusals in `spelling`)."""
        checked = sampling_parameters(sampling, spelling)
        constraint = checked.constraint
        if checked.stop and constraint is not None and constraint.is_json:
            # A stop sequence would cut the JSON the constraint promises (and a cut answer ending in
            # "stop" would fail the answer check as a server error): refused up front instead.
            raise invalid_argument(
                spelling.field("stop"),
                f"cannot be combined with JSON output ({spelling.field('constraint')}): "
                "a stop sequence would cut the JSON; leave stop out",
            )
        return GenerationRequest(
            api=self.api,
            model=model,
            sampling=checked,
            spelling=spelling,
            stream=self.stream,
            **fields,
        )
