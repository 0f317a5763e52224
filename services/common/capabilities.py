"""What a model can be asked for. Its own module so that the config (which validates an upstream
model's `capabilities`) and the Triton client (which reads a model's config.pbtxt) share one list
without importing each other."""

from __future__ import annotations

from enum import StrEnum


class Capability(StrEnum):
    """What a model can be asked for: its config's `capabilities` parameter, comma-separated."""

    COMPLETION = "completion"  # a plain prompt
    CHAT = "chat"  # messages, rendered through the model's chat template
    LOGPROBS = "logprobs"  # token log probabilities
    EMBEDDING = "embedding"  # one vector per input text (/v1/embeddings, :embed), and nothing else


# A model whose config declares no `capabilities` (written before the parameter existed) is a generation
# model: it can do all of the above but embeddings. Upstream models are generation models too.
ALL_CAPABILITIES: frozenset[str] = frozenset(Capability) - {Capability.EMBEDDING}
