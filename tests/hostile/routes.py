"""Every route Envoy exposes, read from the protos' google.api.http rules, plus the routes that are
not transcoded (health, the web chat, OpenAI's streaming flag, native gRPC paths over HTTP/1.1,
unknown paths), each with a valid request to mutate."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from google.protobuf import message

from tests.auth.rpcs import REQUESTS, Rpc, Subjects, all_rpcs, rest_call

# Generation RPCs: an accepted (200) call must leave a transaction record under its request id.
GENERATION = frozenset(
    {
        "/ferry.inference.v1.InferenceService/Generate",
        "/ferry.inference.v1.InferenceService/GenerateStream",
        "/ferry.openai.v1.OpenAIService/CreateChatCompletion",
        "/ferry.openai.v1.OpenAIService/CreateChatCompletionStream",
        "/ferry.openai.v1.OpenAIService/CreateCompletion",
        "/ferry.openai.v1.OpenAIService/CreateCompletionStream",
    }
)
# A model name that does not exist: load and unload are fuzzed on it, never on the session's model.
ABSENT_MODEL = "hostile-no-such-model"
_VARIABLE = re.compile(r"\{([\w.]+)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class Route:
    verb: str
    template: str  # the google.api.http template, or a literal path
    rpc: Rpc | None = None
    # For OpenAI's one path for both: the streamed variant of the unary route.
    stream: bool = False

    @property
    def id(self) -> str:
        return f"{self.verb} {self.template}{' stream' if self.stream else ''}"

    def valid(self, subjects: Subjects) -> tuple[str, Any]:
        """A valid (path, JSON body) for this route (body None: none)."""
        if self.rpc is None:
            return self.template, None
        if self.rpc.path not in REQUESTS:  # a signed webhook: no valid request without its secret
            return self.fuzzed_path(["hostile"] * self.variables), {"type": "hostile", "data": {}}
        request = safe_request(self.rpc, subjects)
        call = rest_call(self.rpc, request)
        body = call.body
        if self.stream and isinstance(body, dict):
            body["stream"] = True
        return call.path, body

    def fuzzed_path(self, pieces: list[str]) -> str:
        """The template with each variable replaced by the next of `pieces` (a segment, quoted)."""
        values = iter(pieces)

        def one(match: re.Match[str]) -> str:
            pattern = match.group(2) or "*"
            piece = quote(next(values, "").encode("utf-8", "surrogatepass"), safe="")
            return pattern.replace("*", piece, 1)

        return _VARIABLE.sub(one, self.template)

    @property
    def variables(self) -> int:
        return len(_VARIABLE.findall(self.template))


def safe_request(rpc: Rpc, subjects: Subjects) -> message.Message:
    """The matrix's minimal valid request, except that load and unload name a model that does not
    exist (unloading the session's model would break every other test)."""
    request = REQUESTS[rpc.path](subjects)
    if rpc.method.name in ("LoadModel", "UnloadModel"):
        request.name = f"models/{ABSENT_MODEL}"  # type: ignore[attr-defined]
    return request


def rest_routes() -> list[Route]:
    routes = []
    for rpc in all_rpcs():
        rule = rpc.http_rule
        if rule is None:
            continue
        verb = rule.WhichOneof("pattern")
        routes.append(Route(verb.upper(), getattr(rule, verb), rpc))
        if rpc.path in OPENAI_ONE_PATH:
            routes.append(Route(verb.upper(), getattr(rule, verb), rpc, stream=True))
    return [*routes, *(Route(verb, path) for verb, path in EXTRA)]


# OpenAI's unary paths also stream with `"stream": true` (ferry.lua sends them to the :stream RPC).
OPENAI_ONE_PATH = frozenset(
    {"/ferry.openai.v1.OpenAIService/CreateChatCompletion", "/ferry.openai.v1.OpenAIService/CreateCompletion"}
)
# Routes outside the transcoder, and paths nothing serves.
EXTRA = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/chat/"),
    ("GET", "/chat/ws"),
    ("POST", "/v1/nope"),
    ("GET", "/v1/models/a/b"),
    ("POST", "/api/v1/nope"),
    ("POST", "/ferry.inference.v1.InferenceService/Generate"),
    ("POST", "/ferry.auth.v1.AuthService/Authorize"),
    ("POST", "/grpc.health.v1.Health/Check"),
]


def is_generation(route: Route) -> bool:
    return route.rpc is not None and route.rpc.path in GENERATION
