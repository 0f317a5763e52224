"""Models served by OpenAI-compatible upstream servers: their metadata and their API keys.

A configured upstream model (`Settings.upstream_models`) is described to the rest of ferry by the same
`ModelInfo` a Triton model has, so the registry lists it and the policy enforces its limits alike.
Its API key is read from where the config points (an environment variable or a secret file) each time
it is needed; nothing here logs it or puts it in an error.
"""

from __future__ import annotations

import os

from services.common.config import UpstreamModel
from services.common.triton_client import ModelInfo, Provider

BACKEND = "openai-upstream"


def model_info(name: str, cfg: UpstreamModel) -> ModelInfo:
    """What ferry knows about an upstream model: its limits and capabilities come from the config; the
    upstream applies its own chat template, so ferry has none."""
    return ModelInfo(
        name=name,
        backend=BACKEND,
        context_length=cfg.context_length,
        max_tokens=cfg.max_tokens,
        owned_by=cfg.owned_by,
        chat_template="",
        engine_slots=cfg.max_in_flight,
        capabilities=frozenset(c.strip().lower() for c in cfg.capabilities if c.strip()),
        provider=Provider.UPSTREAM,
    )


def upstream_name(name: str, cfg: UpstreamModel) -> str:
    """The model's name at the upstream (ferry's name when the config gives none)."""
    return cfg.upstream_model or name


def api_key(cfg: UpstreamModel) -> str | None:
    """The upstream's API key: the environment variable `api_key_env` names, else the contents of
    `api_key_file` (surrounding whitespace stripped); None when neither is configured or set."""
    if cfg.api_key_env:
        value = os.environ.get(cfg.api_key_env, "").strip()
        if value:
            return value
    if cfg.api_key_file is not None:
        try:
            value = cfg.api_key_file.read_text(encoding="utf-8").strip()
        except OSError:
            # The path is no secret, but the reason stays vague: the caller reports a config error.
            return None
        if value:
            return value
    return None
