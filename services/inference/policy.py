"""What a request may ask of a model: the caller's limits (global settings and the API key's) and the
model's own (its `capabilities`, its `max_tokens`, whether it has a chat template). Refusals name the
field as the caller spelled it; the sampling ranges themselves are the engine contract's
(`services.inference.sampling`)."""

from __future__ import annotations

from dataclasses import replace

from ferry.auth.v1.auth_pb2 import Principal

from services.common.config import InferenceSettings
from services.common.errors import Reason, invalid_argument
from services.common.triton_client import Capability, ModelInfo, Provider
from services.inference.domain import GenerationRequest


def apply_caller_limits(
    request: GenerationRequest, settings: InferenceSettings, principal: Principal | None
) -> GenerationRequest:
    """The tighter of the global limits (settings) and the caller's key limits: a larger `max_tokens`
    is refused naming the field; an omitted one becomes the limit; the prompt limit goes to the engine
    (only it can count tokens; a longer prompt is PROMPT_TOO_LONG with limit "caller")."""
    key = principal.limits if principal is not None else None
    max_tokens = _tightest(settings.max_tokens, key.max_tokens if key else 0)
    max_prompt = _tightest(settings.max_prompt_tokens, key.max_prompt_tokens if key else 0)
    sampling = request.sampling
    asked = sampling.max_tokens
    if max_tokens and asked is not None and asked > max_tokens:
        raise invalid_argument(
            request.spelling.field("max_tokens"),
            f"must be at most {max_tokens} for this API key, got {asked}",
        )
    changes: dict[str, int] = {}
    if max_tokens and asked is None:
        changes["max_tokens"] = max_tokens
    if max_prompt:
        changes["max_prompt_tokens"] = max_prompt
    if not changes:
        return request
    return replace(request, sampling=sampling.model_copy(update=changes))


def _tightest(*limits: int) -> int:
    """The smallest positive limit; 0 when none is set."""
    return min((limit for limit in limits if limit > 0), default=0)


def check_against_model(request: GenerationRequest, model: ModelInfo) -> None:
    """Limits that come from the model's metadata."""
    check_capabilities(request, model)
    limit = model.max_tokens
    asked = request.sampling.max_tokens
    if limit and asked is not None and asked > limit:
        raise invalid_argument(
            request.spelling.field("max_tokens"),
            f"must be at most {limit} for model '{model.name}', got {asked}",
        )
    # An upstream server renders conversations with its own template.
    if request.messages is not None and not model.chat_template and model.provider is Provider.TRITON:
        raise invalid_argument(
            request.spelling.input, f"model '{model.name}' has no chat template; send a prompt instead"
        )


def check_capabilities(request: GenerationRequest, model: ModelInfo) -> None:
    """What the request asks for (a conversation or a prompt, logprobs) must be among the model's
    `capabilities`; a refusal names the caller's field that asked for it."""
    spelling = request.spelling
    wanted = [(Capability.CHAT if request.messages is not None else Capability.COMPLETION, spelling.input)]
    if request.sampling.logprobs:
        wanted.append((Capability.LOGPROBS, spelling.field("logprobs")))
    for capability, field in wanted:
        require_capability(model, capability, field)


def require_capability(model: ModelInfo, capability: Capability, field: str) -> None:
    """MODEL_CAPABILITY_MISSING (400) naming `field`, the model and the capability, unless the model's
    `capabilities` include it: a chat request to an embedding model, embeddings from a chat model."""
    if capability in model.capabilities:
        return
    is_embedder = capability is not Capability.EMBEDDING and Capability.EMBEDDING in model.capabilities
    instead = "; it is an embedding model: use /v1/embeddings or :embed" if is_embedder else ""
    err = invalid_argument(
        field,
        f"model '{model.name}' does not support {capability}"
        f" (its capabilities: {', '.join(sorted(model.capabilities)) or 'none'}){instead}",
        Reason.MODEL_CAPABILITY_MISSING,
    )
    err.metadata.update(model=model.name, capability=capability)
    raise err


def admissible(
    request: GenerationRequest, model: ModelInfo, settings: InferenceSettings, principal: Principal | None
) -> GenerationRequest:
    """The request as the engine will get it, or INVALID_ARGUMENT: the model's limits, then the caller's."""
    check_against_model(request, model)
    return apply_caller_limits(request, settings, principal)
