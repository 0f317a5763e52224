"""Which names clients may use for models: `allowed_models`, `model_aliases` and `upstream_models`.

The rules, applied alike by the Models service (the registry) and the Inference service (generation,
OpenAI's model list):
- An alias is another name for one model: a request naming it is served by that model. It cannot
  name another alias, an upstream model's name, or itself.
- `allowed_models` (when not empty) names the models clients may use; an alias listed there stands
  for its model. Every other model is absent: not listed, and NOT_FOUND by name, exactly like a model
  that does not exist. An alias is usable exactly when its model is; one whose model is not allowed is
  a configuration error (it could never serve anything).
- An alias shadows a Triton model of the same name.
Whether a model exists at all is Triton's or the upstream config's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from services.common.names import is_model_id

if TYPE_CHECKING:
    from services.common.config import Settings, UpstreamModel


def config_problems(
    allowed: Collection[str],
    aliases: Mapping[str, str],
    upstream: Collection[str],
    load_models: Collection[str] = (),
) -> list[str]:
    """What is wrong with these settings, one sentence each (empty when nothing is)."""
    problems = [
        f"model_aliases: '{alias}' is not a valid model name (1-128 of A-Z a-z 0-9 . _ -, not first . _ -)"
        for alias in aliases
        if not is_model_id(alias)
    ]
    problems += [
        f"upstream_models: '{name}' is not a valid model name (1-128 of A-Z a-z 0-9 . _ -, not first . _ -)"
        for name in upstream
        if not is_model_id(name)
    ]
    problems += [
        f"triton.load_models: '{name}' is an upstream model (only Triton's models are loaded)"
        for name in load_models
        if name in upstream
    ]
    allowed_models = {aliases.get(name, name) for name in allowed}
    for alias, model in aliases.items():
        if alias == model:
            problems.append(f"model_aliases: '{alias}' names itself")
        elif model in aliases:
            problems.append(f"model_aliases: '{alias}' names '{model}', another alias (name the model)")
        elif alias in upstream:
            problems.append(f"model_aliases: '{alias}' is also the name of an upstream model")
        elif allowed_models and model not in allowed_models:
            problems.append(
                f"model_aliases: '{alias}' names '{model}', which allowed_models hides"
                f" (add '{model}' to allowed_models, or remove the alias)"
            )
    return problems


class ModelNames:
    """The name rules of one configuration (see the module docstring)."""

    def __init__(
        self,
        allowed: Collection[str] = (),
        aliases: Mapping[str, str] | None = None,
        upstream: Mapping[str, UpstreamModel] | None = None,
    ) -> None:
        self.aliases: Mapping[str, str] = dict(aliases or {})
        self.upstream: Mapping[str, UpstreamModel] = dict(upstream or {})
        self.allowed: frozenset[str] = frozenset(self.model(name) for name in allowed)

    @classmethod
    def of(cls, settings: Settings) -> ModelNames:
        return cls(settings.allowed_models, settings.model_aliases, settings.upstream_models)

    def model(self, name: str) -> str:
        """The model a name means: an alias's model, else the name itself."""
        return self.aliases.get(name, name)

    def is_allowed(self, name: str) -> bool:
        """Whether clients may use this name (a model or an alias); says nothing of existence."""
        return not self.allowed or self.model(name) in self.allowed

    def is_alias(self, name: str) -> bool:
        return name in self.aliases

    def aliases_of(self, model: str) -> list[str]:
        """The aliases that name `model`, sorted."""
        return sorted(alias for alias, target in self.aliases.items() if target == model)
