"""An embeddings request as the service sees it, whichever API it came through, and what it produced."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


class EncodingFormat(StrEnum):
    """How vectors are written in an OpenAI response."""

    FLOAT = "float"  # a list of numbers
    BASE64 = "base64"  # little-endian float32, base64 (the OpenAI SDK's default)


@dataclass(frozen=True)
class EmbeddingRequest:
    """A parsed, valid request: at least one non-empty text."""

    model: str
    inputs: tuple[str, ...]
    # How the caller spells the list of texts (`input`, `inputs`): errors name `input[3]`.
    input_field: str
    # OpenAI's `"input": "text"`: errors name `input`, not `input[0]`.
    single: bool = False
    # Cut inputs longer than the model's maximum tokens (native `truncate`); else refuse them.
    truncate: bool = False
    encoding_format: EncodingFormat = EncodingFormat.FLOAT
    # OpenAI's `dimensions`: only the model's own is accepted (checked once the model is known).
    dimensions: int | None = None
    user: str = ""
    # The alias the caller named (`model_aliases`) when `model` is the model it resolved to.
    model_alias: str = ""

    def field(self, index: int) -> str:
        """The caller's name of one input (`input[3]`; `input` alone when a single string was sent)."""
        return self.input_field if self.single else f"{self.input_field}[{index}]"

    def recorded_parameters(self) -> dict[str, Any]:
        """What the transaction record keeps of the request besides its inputs."""
        parameters: dict[str, Any] = {
            "api": "embedding",
            "inputs": len(self.inputs),
            "encoding_format": self.encoding_format.value,
        }
        if self.truncate:
            parameters["truncate"] = True
        if self.dimensions is not None:
            parameters["dimensions"] = self.dimensions
        if self.user:
            parameters["user"] = self.user
        if self.model_alias:
            parameters["model_alias"] = self.model_alias
        return parameters


@dataclass
class EmbeddingOutcome:
    """What one request produced: a vector and a token count per input, or the error it ended with."""

    started_at: float = field(default_factory=time.monotonic)
    vectors: np.ndarray | None = None
    token_counts: tuple[int, ...] = ()
    latency: float | None = None
    error_code: str = ""
    error_message: str = ""

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)

    def failed(self, code: str, message: str) -> None:
        self.error_code, self.error_message = code, message
