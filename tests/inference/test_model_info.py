"""Model metadata as the services read it from a model's config.pbtxt (`triton_client.model_info`).

The configs are the repository's own, turned into what Triton's model-config API answers (the same
protobuf, as JSON); only the client is a stand-in, since what is checked is how the answer is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from services.common.triton_client import ALL_CAPABILITIES, model_info

GEMMA = Path(__file__).resolve().parents[2] / "triton_models" / "gemma-3-270m" / "config.pbtxt"


class ConfigApi:
    """Answers `get_model_config(name, as_json=True)` as tritonclient does, for one config."""

    def __init__(self, config: model_config_pb2.ModelConfig) -> None:
        self.config = config

    async def get_model_config(self, name: str, as_json: bool = False) -> dict[str, Any]:
        return {"config": json_format.MessageToDict(self.config, preserving_proto_field_name=True)}


def gemma_config() -> model_config_pb2.ModelConfig:
    return text_format.Parse(GEMMA.read_text(), model_config_pb2.ModelConfig())


async def test_the_declared_capabilities_are_read() -> None:
    config = gemma_config()
    info = await model_info(ConfigApi(config), "gemma-3-270m")  # type: ignore[arg-type]
    assert info is not None
    assert info.capabilities == {"completion", "chat", "logprobs"}
    assert (info.backend, info.context_length, info.engine_slots) == ("llamacpp", 4096, 4)

    config.parameters["capabilities"].string_value = " completion , logprobs"
    info = await model_info(ConfigApi(config), "gemma-3-270m")  # type: ignore[arg-type]
    assert info is not None and info.capabilities == {"completion", "logprobs"}


async def test_a_config_without_capabilities_can_do_everything() -> None:
    config = gemma_config()
    del config.parameters["capabilities"]
    info = await model_info(ConfigApi(config), "gemma-3-270m")  # type: ignore[arg-type]
    assert info is not None and info.capabilities == ALL_CAPABILITIES
