"""A model directory's settings: the `parameters` of its config.pbtxt, typed and checked.

Everything model-specific lives there (where the GGUF comes from, slots, context, threads, caches,
default sampling), so adding a model is a directory, not code. Triton hands the backend its config as
JSON; `launcher.setup` reads the same config.pbtxt; both go through `ModelParameters.from_strings`.
Keys the backend does not use (metadata for the services, such as `owned_by`, `chat_template`,
`capabilities`) are left to their readers.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.llamacpp.contract import SamplingParameters

BACKEND_NAME = "llamacpp"
# Host memory for llama.cpp's prompt cache: ~20 short conversation states of a small model, and a bound
# (llama.cpp's own default, 8192 MiB, grew the model process by ~1.2 MB per distinct prompt).
DEFAULT_PROMPT_CACHE_MIB = 32


class GgufSource(StrEnum):
    """How the GGUF file named by `gguf_file` is obtained."""

    # A package that ships the file in chunks and an `assemble(path)` function (launcher.setup runs it);
    # the file is written to $FERRY_HOME/models/<gguf_file>.
    ASSEMBLE = "assemble"
    # A file shipped inside an installed package: <package directory>/<gguf_file>. The package is never
    # imported (some import heavy dependencies), only located.
    PACKAGE_FILE = "package_file"
    # A file already on disk: `gguf_file` is absolute or relative to $FERRY_HOME.
    PATH = "path"


Parameters = TypeVar("Parameters", bound=BaseModel)


class ConfigError(ValueError):
    """A model directory's parameters are missing or inconsistent."""


class ModelParameters(BaseModel):
    """The parameters of one model directory that the backend and `launcher.setup` act on."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    gguf_source: GgufSource
    gguf_file: str = Field(min_length=1)
    # The PyPI package (distribution or module spelling: `-` and `_` are the same) for assemble and
    # package_file.
    gguf_package: str = ""
    n_parallel: int = Field(default=4, ge=1)
    ctx_size: int = Field(default=16384, ge=1)
    n_threads: int = Field(default=2, ge=1)
    n_gpu_layers: int = Field(default=0, ge=-1)
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] = "PASSIVE"
    log_verbosity: int = Field(default=2, ge=0, le=4)
    # Host-memory cache of slot states (llama.cpp's cache_ram_mib); 0 turns it off.
    prompt_cache_mib: int = Field(default=DEFAULT_PROMPT_CACHE_MIB, ge=0)
    # Context checkpoints kept per slot (llama.cpp's n_ctx_checkpoints; used by sliding-window and
    # recurrent models to reuse a prompt).
    ctx_checkpoints: int = Field(default=8, ge=0)
    # Tokens one request may use (prompt + output); must equal ctx_size / n_parallel when given.
    context_length: int | None = Field(default=None, ge=1)
    # The largest max_tokens a request may ask for; default context_length.
    max_tokens: int | None = Field(default=None, ge=1)
    # SamplingParameters JSON applied to the fields a request leaves out (default: llama.cpp's own).
    default_sampling_parameters: str = ""

    @property
    def slot_context(self) -> int:
        """Tokens per slot: llama.cpp splits the context evenly over the slots (kv_unified off)."""
        return self.ctx_size // self.n_parallel

    @property
    def max_output_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else self.slot_context

    @property
    def package_module(self) -> str:
        return self.gguf_package.replace("-", "_")

    @property
    def default_sampling(self) -> SamplingParameters:
        return SamplingParameters.from_json(self.default_sampling_parameters)

    @model_validator(mode="after")
    def _consistent(self) -> ModelParameters:
        if self.gguf_source is not GgufSource.PATH and not self.gguf_package:
            raise ValueError(f"gguf_source={self.gguf_source.value} needs gguf_package")
        if self.context_length is not None and self.context_length != self.slot_context:
            # The services read context_length: it must say what the engine enforces.
            raise ValueError(
                f"context_length={self.context_length} disagrees with ctx_size / n_parallel = "
                f"{self.slot_context}"
            )
        if self.max_tokens is not None and self.max_tokens > self.slot_context:
            raise ValueError(f"max_tokens={self.max_tokens} exceeds the context per slot {self.slot_context}")
        try:
            self.default_sampling  # noqa: B018 - validated now, not at the first request
        except ValidationError as exc:
            raise ValueError(f"default_sampling_parameters: {exc}") from None
        return self

    @classmethod
    def from_strings(cls, name: str, values: dict[str, str]) -> ModelParameters:
        """Parse a model's `parameters` (each a string_value); raises ConfigError naming the model."""
        return parse_parameters(cls, name, values)

    @classmethod
    def from_triton_config(cls, model_config: dict[str, Any]) -> ModelParameters:
        """From the model config Triton gives `initialize` (args["model_config"], parsed)."""
        return cls.from_strings(model_config.get("name", "?"), triton_parameters(model_config))


def parse_parameters(cls: type[Parameters], name: str, values: dict[str, str]) -> Parameters:
    """A model's `parameters` (each a string_value) as `cls` (every backend's parameters type); raises
    ConfigError naming the model and each problem."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'parameters'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"model {name}: bad config.pbtxt parameters: {problems}") from None


def triton_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def ferry_home(model_repository: str | None = None) -> Path:
    """$FERRY_HOME, or ferry's default <repo>/.ferry beside triton_models/ when it is not set."""
    home = os.environ.get("FERRY_HOME")
    if home:
        return Path(home)
    if model_repository is None:
        raise ConfigError("FERRY_HOME is not set")
    # Triton passes the model's own directory: <repo>/triton_models/<model>.
    return Path(model_repository).resolve().parents[1] / ".ferry"
