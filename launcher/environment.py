"""The Settings a launcher was given, written out as the `FERRY_*` environment of its children.

Every field is exported explicitly, so a child process sees exactly the launcher's settings:
environment variables win over a YAML file in the child, and these replace any inherited ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_core import to_jsonable_python

from services.common.config import Settings

PREFIX = "FERRY_"
DELIMITER = "__"


def _encode(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    # Lists and mappings (of models too, e.g. `upstream_models`): pydantic-settings parses JSON.
    return json.dumps(to_jsonable_python(_revealed(value)))


def _revealed(value: Any) -> Any:
    """`value` with the secrets nested in it (e.g. `webhooks.sources.<name>.secret`) as their values:
    JSON would write them masked, and the child would read the mask as the secret."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return {name: _revealed(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {key: _revealed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_revealed(item) for item in value]
    return value


def _flatten(prefix: str, model: BaseModel, out: dict[str, str]) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name.upper()}"
        if isinstance(value, BaseModel):
            _flatten(f"{key}{DELIMITER}", value, out)
        elif value is not None:
            out[key] = _encode(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """`FERRY_*` variables (plus DATABASE_URL) that reproduce `settings` in a child process."""
    env: dict[str, str] = {}
    _flatten(PREFIX, settings, env)
    # The database URL is read from either alias; set both so neither can disagree.
    env.pop(f"{PREFIX}DATABASE_URL", None)
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
        env["FERRY_DATABASE_URL"] = settings.database_url
    return env
