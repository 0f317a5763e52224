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


async def test_each_repository_model_says_what_it_is() -> None:
    """family, parameter_count, quantization, context and template of both shipped models."""
    repository = GEMMA.parents[1]
    infos = {}
    for name in ("gemma-3-270m", "smollm2-135m-instruct"):
        config = text_format.Parse(
            (repository / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        infos[name] = await model_info(ConfigApi(config), name)  # type: ignore[arg-type]

    gemma, smollm2 = infos["gemma-3-270m"], infos["smollm2-135m-instruct"]
    assert gemma is not None and smollm2 is not None
    assert (gemma.family, gemma.parameter_count, gemma.quantization) == ("gemma3", "270M", "Q4_K_M")
    assert (smollm2.family, smollm2.parameter_count, smollm2.quantization) == ("smollm2", "135M", "Q4_1")
    assert (smollm2.context_length, smollm2.max_tokens, smollm2.engine_slots) == (2048, 2048, 4)
    assert "<|im_start|>" in smollm2.chat_template and smollm2.capabilities == ALL_CAPABILITIES
    assert smollm2.owned_by == "huggingface"


async def test_a_config_without_the_descriptive_parameters_reads_as_unknown() -> None:
    config = gemma_config()
    for key in ("family", "parameter_count", "quantization"):
        del config.parameters[key]
    info = await model_info(ConfigApi(config), "gemma-3-270m")  # type: ignore[arg-type]
    assert info is not None and (info.family, info.parameter_count, info.quantization) == ("", "", "")
