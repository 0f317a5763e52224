"""What llama.cpp is asked: a validated SamplingParameters translated into a completion request."""

from __future__ import annotations

from typing import Any

from backends.llamacpp.constraints import constraint_problem
from backends.llamacpp.contract import SamplingParameters
from backends.llamacpp.faults import FaultError, invalid_parameter

# llama.cpp seeds are uint32, with this value meaning "pick a random one".
RANDOM_SEED = 0xFFFFFFFF
INT32_MAX = (1 << 31) - 1
BOS_TEXT = "<bos>"


def with_defaults(request: SamplingParameters, defaults: SamplingParameters) -> SamplingParameters:
    """The request's parameters, the model's defaults filling the fields it leaves out.

    A field the request sets wins even when it sets the type's default (`ignore_eos: false`, `stop: []`
    switch a model default off): fields are merged by whether they were set, not by their values.
    """
    if not defaults.model_fields_set:
        return request
    given = request.model_dump(include=request.model_fields_set)
    filled = defaults.model_dump(include=defaults.model_fields_set)
    if "logprobs" in given:
        # top_logprobs goes with logprobs: a request that switches logprobs off takes no default for it.
        filled.pop("top_logprobs", None)
    return SamplingParameters.model_validate({**filled, **given})


def completion_request(
    prompt: str, params: SamplingParameters, max_tokens_limit: int, vocabulary_size: int
) -> dict[str, Any]:
    """The llama.cpp completion request (streamed) for one generation.

    Fields left None keep llama.cpp's own defaults. Raises FaultError when max_tokens exceeds the
    model's, when a constraint does not compile, or when logit_bias names a token the model lacks
    (llama.cpp would silently ignore both).
    """
    if params.max_tokens is not None and params.max_tokens > max_tokens_limit:
        raise FaultError(
            invalid_parameter(
                "max_tokens", f"max_tokens must be at most {max_tokens_limit}, got {params.max_tokens}"
            )
        )
    request: dict[str, Any] = {
        # llama.cpp adds the model's BOS itself; a leading literal one would make it appear twice.
        "prompt": prompt.removeprefix(BOS_TEXT),
        "stream": True,
        # __verbose carries the per-chunk token counts (tokens_predicted, tokens_evaluated).
        "verbose": True,
        "cache_prompt": True,
        "n_predict": params.max_tokens or max_tokens_limit,
    }
    optional: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        # vLLM spells "disabled" -1, llama.cpp 0; llama.cpp holds it in an int32.
        "top_k": None if params.top_k is None else min(max(params.top_k, 0), INT32_MAX),
        "min_p": params.min_p,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "repeat_penalty": params.repetition_penalty,
        # Any int64/uint64 folded onto llama.cpp's uint32 seeds other than "random".
        "seed": None if params.seed is None else params.seed % RANDOM_SEED,
    }
    request.update({key: value for key, value in optional.items() if value is not None})
    if params.stop:
        request["stop"] = list(params.stop)
    if params.ignore_eos:
        request["ignore_eos"] = True
    if params.logprobs:
        # llama.cpp reports the chosen token's logprob only when n_probs > 0; extra entries are trimmed.
        request["n_probs"] = max(params.top_logprobs, 1)
    if params.logit_bias:
        unknown = sorted(token for token in params.logit_bias if token >= vocabulary_size)
        if unknown:
            raise FaultError(
                invalid_parameter(
                    "logit_bias",
                    f"token id {unknown[0]} is not in the model's vocabulary (ids 0 to {vocabulary_size - 1})",
                )
            )
        request["logit_bias"] = [[token, bias] for token, bias in params.logit_bias.items()]
    if params.constraint is not None:
        problem = constraint_problem(params.constraint)
        if problem is not None:
            raise FaultError(invalid_parameter("constraint", problem))
        request["grammar"] = params.constraint.engine_grammar()
    return request
