"""ferry's native GenerateRequest on the wire -> a `GenerationRequest` (sampling fields under
`sampling.`, the conversation under `messages.messages`)."""

from __future__ import annotations

from typing import Any

from ferry.inference.v1 import inference_pb2

from services.common.errors import invalid_argument
from services.common.names import model_id_from_name
from services.inference import structured
from services.inference.domain import Api, FieldSpelling, GenerationRequest, Message
from services.inference.messages import parse_messages
from services.inference.sampling import SAME_NAMED, same_named
from services.inference.wire import WireRequest

# The native API's CachePolicy -> GenerationRequest.cache_policy (HTTP Cache-Control's spelling).
_CACHE_POLICIES = {
    inference_pb2.CACHE_POLICY_NO_CACHE: "no-cache",
    inference_pb2.CACHE_POLICY_NO_STORE: "no-store",
}


class GenerateWire(WireRequest[inference_pb2.GenerateRequest]):
    """A GenerateRequest as received; `parse()` checks it."""

    api = Api.GENERATE

    @property
    def model(self) -> str:
        return self.message.model.removeprefix("models/")

    def parse(self) -> GenerationRequest:
        request = self.message
        # `models/{model}` (AIP-122); a bare id is accepted too for convenience.
        model = model_id_from_name(request.model, "model", bare_id=True)
        which = request.WhichOneof("input")
        prompt: str | None = None
        messages: tuple[Message, ...] | None = None
        if which == "prompt":
            prompt = request.prompt
        elif which == "messages":
            messages = parse_messages(
                [(m.role, m.content) for m in request.messages.messages],
                "messages.messages",
                lambda content, field, role: content,
            )
        else:
            raise invalid_argument("prompt", "one of prompt or messages is required")
        constraint = structured.native_constraint(request.constraint)
        spelling = FieldSpelling(
            input="messages.messages" if messages is not None else "prompt",
            prefix="sampling.",
            renamed=constraint.renamed,
        )
        s = request.sampling
        sampling: dict[str, Any] = {
            # Unset optional fields are None: the model's default applies; an explicit false overrides it.
            **same_named(s, (*SAME_NAMED, "max_tokens", "logprobs", "top_logprobs", "ignore_eos")),
            # A repeated field cannot tell "absent" from "empty": no sequences means the model's default.
            "stop": tuple(s.stop) or None,
            "logit_bias": structured.native_logit_bias(s.logit_bias),
            "constraint": constraint.output,
        }
        return self._request(
            model,
            sampling,
            spelling,
            prompt=prompt,
            messages=messages,
            grammar_name=constraint.grammar_name,
            cache_policy=_CACHE_POLICIES.get(request.cache_policy, ""),
        )
