"""Every ferry RPC, read from the descriptors, with a minimal valid request for each public one and a
way to call it on REST (derived from its google.api.http rule) and on gRPC (any target).

The table of requests is checked against the descriptors (test_matrix), so a new RPC without an
entry here fails the suite instead of going untested.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from ferry.audit.v1 import audit_pb2
from ferry.conversations.v1 import conversations_pb2
from ferry.grammars.v1 import grammars_pb2
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from ferry.jobs.v1 import jobs_pb2
from ferry.keys.v1 import keys_pb2
from ferry.models.v1 import models_pb2
from ferry.openai.v1 import openai_pb2
from ferry.transactions.v1 import transactions_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, field_mask_pb2, json_format, message, message_factory, struct_pb2

from services.common.access import PROTO_FILES, is_self_authenticated, required_scopes
from tests.stack import keyed_channel

# The process that serves each service on its own port.
SERVED_BY = {
    "ferry.inference.v1.InferenceService": "inference",
    "ferry.openai.v1.OpenAIService": "inference",
    "ferry.models.v1.ModelsService": "models",
    "ferry.transactions.v1.TransactionsService": "transactions",
    "ferry.audit.v1.AuditService": "audit",
    "ferry.grammars.v1.GrammarsService": "grammars",
    "ferry.conversations.v1.ConversationsService": "conversations",
    "ferry.jobs.v1.JobsService": "jobs",
    "ferry.keys.v1.KeysService": "gateway",
    "ferry.auth.v1.AuthService": "gateway",
}


@dataclass(frozen=True)
class Rpc:
    service: str
    method: descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        """`/package.Service/Method`."""
        return f"/{self.service}/{self.method.name}"

    @property
    def http_rule(self) -> http_pb2.HttpRule | None:
        options = self.method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            return None
        rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
        return rule

    @property
    def scopes(self) -> frozenset[str]:
        found = required_scopes(self.path)
        assert found is not None, f"{self.path} must declare its access scopes"
        return found

    def __str__(self) -> str:
        return self.path


def all_rpcs() -> list[Rpc]:
    """Every method of every ferry service, in the order the protos declare them."""
    out = []
    for module in PROTO_FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            out += [Rpc(service.full_name, method) for method in service.methods]
    return out


def public_rpcs() -> list[Rpc]:
    """Methods reachable from outside with an API key: those with a REST mapping, less the
    self-authenticated ones (a signed webhook: tests/webhooks)."""
    return [rpc for rpc in all_rpcs() if rpc.http_rule is not None and not is_self_authenticated(rpc.path)]


def internal_rpcs() -> list[Rpc]:
    return [rpc for rpc in all_rpcs() if rpc.http_rule is None]


@dataclass(frozen=True)
class Subjects:
    """Existing things the success cases act on."""

    model: str  # `gemma-3-270m`
    transaction: str  # `transactions/{request_id}` of a recorded generation
    victim_key: str  # `keys/{id}` of a key that may be revoked (again)
    grammar: str  # `grammars/{id}` of a stored grammar
    new_grammar: Callable[[], str]  # stores another grammar (for DeleteGrammar) and names it
    # `conversations/{id}` owned by the `inference` key (another key's would be NOT_FOUND)
    conversation: str = ""
    # starts another conversation of the `inference` key (for DeleteConversation) and names it
    new_conversation: Callable[[], str] = str
    # `jobs/{id}` owned by the `inference` key (the matrix calls job RPCs with that key)
    job: str = ""


def _prompt(text: str) -> struct_pb2.Value:
    return struct_pb2.Value(string_value=text)


def _chat(s: Subjects, stream: bool) -> openai_pb2.CreateChatCompletionRequest:
    return openai_pb2.CreateChatCompletionRequest(
        model=s.model,
        messages=[openai_pb2.ChatCompletionMessage(role="user", content=_prompt("Hi"))],
        max_tokens=1,
        stream=stream,
    )


def _completion(s: Subjects, stream: bool) -> openai_pb2.CreateCompletionRequest:
    return openai_pb2.CreateCompletionRequest(
        model=s.model, prompt=_prompt("Hi"), max_tokens=1, stream=stream
    )


YES_NO = 'root ::= "yes" | "no"'


def _grammar(name: str = "") -> grammars_pb2.Grammar:
    return grammars_pb2.Grammar(name=name, syntax=grammars_pb2.Grammar.Syntax.SYNTAX_GBNF, definition=YES_NO)


def _update_grammar(s: Subjects) -> grammars_pb2.UpdateGrammarRequest:
    # REST sends no update_mask (it would be a query parameter): the whole grammar, unchanged.
    return grammars_pb2.UpdateGrammarRequest(
        grammar=_grammar(s.grammar), update_mask=field_mask_pb2.FieldMask(paths=["description"])
    )


def _turn(s: Subjects) -> conversations_pb2.SendMessageRequest:
    return conversations_pb2.SendMessageRequest(
        conversation=s.conversation, content="Hi", sampling=inference_pb2.SamplingParams(max_tokens=1)
    )


def _job(s: Subjects) -> jobs_pb2.CreateJobRequest:
    return jobs_pb2.CreateJobRequest(
        job=jobs_pb2.Job(request=jobs_pb2.JobRequest(completion=_completion(s, stream=False)))
    )


def _generate(s: Subjects) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=f"models/{s.model}", prompt="Hi", sampling=inference_pb2.SamplingParams(max_tokens=1)
    )


# The embedding model of `triton.load_models` (embeddings from the generation model are refused).
EMBEDDER = "all-minilm-l6-v2"


# Minimal requests that succeed (cheap: one generated token; nothing destructive but UnloadModel,
# whose success case the matrix undoes at once).
REQUESTS: dict[str, Callable[[Subjects], message.Message]] = {
    "/ferry.inference.v1.InferenceService/Generate": _generate,
    "/ferry.inference.v1.InferenceService/GenerateStream": _generate,
    "/ferry.openai.v1.OpenAIService/CreateChatCompletion": lambda s: _chat(s, stream=False),
    "/ferry.openai.v1.OpenAIService/CreateChatCompletionStream": lambda s: _chat(s, stream=True),
    "/ferry.openai.v1.OpenAIService/CreateCompletion": lambda s: _completion(s, stream=False),
    "/ferry.openai.v1.OpenAIService/CreateCompletionStream": lambda s: _completion(s, stream=True),
    "/ferry.inference.v1.InferenceService/Embed": lambda s: inference_pb2.EmbedRequest(
        model=f"models/{EMBEDDER}", inputs=["Hi"]
    ),
    "/ferry.openai.v1.OpenAIService/CreateEmbedding": lambda s: openai_pb2.CreateEmbeddingRequest(
        model=EMBEDDER, input=_prompt("Hi")
    ),
    "/ferry.openai.v1.OpenAIService/ListModels": lambda s: openai_pb2.ListModelsRequest(),
    "/ferry.openai.v1.OpenAIService/RetrieveModel": lambda s: openai_pb2.RetrieveModelRequest(model=s.model),
    "/ferry.models.v1.ModelsService/ListModels": lambda s: models_pb2.ListModelsRequest(),
    "/ferry.models.v1.ModelsService/GetModel": lambda s: models_pb2.GetModelRequest(name=f"models/{s.model}"),
    # Loading the loaded model is a reload in Triton (the old instance serves until the new one is up).
    "/ferry.models.v1.ModelsService/LoadModel": lambda s: models_pb2.LoadModelRequest(
        name=f"models/{s.model}"
    ),
    "/ferry.models.v1.ModelsService/UnloadModel": lambda s: models_pb2.UnloadModelRequest(
        name=f"models/{s.model}"
    ),
    "/ferry.transactions.v1.TransactionsService/GetTransaction": lambda s: (
        transactions_pb2.GetTransactionRequest(name=s.transaction)
    ),
    "/ferry.transactions.v1.TransactionsService/ListTransactions": lambda s: (
        transactions_pb2.ListTransactionsRequest(page_size=1)
    ),
    "/ferry.audit.v1.AuditService/ListEvents": lambda s: audit_pb2.ListEventsRequest(page_size=1),
    "/ferry.audit.v1.AuditService/VerifyChain": lambda s: audit_pb2.VerifyChainRequest(),
    "/ferry.keys.v1.KeysService/CreateKey": lambda s: keys_pb2.CreateKeyRequest(
        key=keys_pb2.Key(display_name="matrix", scopes=["read"])
    ),
    "/ferry.keys.v1.KeysService/ListKeys": lambda s: keys_pb2.ListKeysRequest(page_size=1),
    "/ferry.keys.v1.KeysService/GetKey": lambda s: keys_pb2.GetKeyRequest(name=s.victim_key),
    "/ferry.keys.v1.KeysService/RevokeKey": lambda s: keys_pb2.RevokeKeyRequest(name=s.victim_key),
    "/ferry.keys.v1.KeysService/RotateWebhookSecret": lambda s: keys_pb2.RotateWebhookSecretRequest(
        name=s.victim_key
    ),
    "/ferry.grammars.v1.GrammarsService/CreateGrammar": lambda s: grammars_pb2.CreateGrammarRequest(
        grammar=_grammar()
    ),
    "/ferry.grammars.v1.GrammarsService/GetGrammar": lambda s: grammars_pb2.GetGrammarRequest(name=s.grammar),
    "/ferry.grammars.v1.GrammarsService/ListGrammars": lambda s: grammars_pb2.ListGrammarsRequest(
        page_size=1
    ),
    "/ferry.grammars.v1.GrammarsService/UpdateGrammar": _update_grammar,
    "/ferry.conversations.v1.ConversationsService/CreateConversation": lambda s: (
        conversations_pb2.CreateConversationRequest(
            conversation=conversations_pb2.Conversation(model=s.model)
        )
    ),
    "/ferry.conversations.v1.ConversationsService/GetConversation": lambda s: (
        conversations_pb2.GetConversationRequest(name=s.conversation)
    ),
    "/ferry.conversations.v1.ConversationsService/ListConversations": lambda s: (
        conversations_pb2.ListConversationsRequest(page_size=1)
    ),
    "/ferry.conversations.v1.ConversationsService/DeleteConversation": lambda s: (
        conversations_pb2.DeleteConversationRequest(name=s.new_conversation())
    ),
    "/ferry.conversations.v1.ConversationsService/ListMessages": lambda s: (
        conversations_pb2.ListMessagesRequest(parent=s.conversation)
    ),
    "/ferry.conversations.v1.ConversationsService/SendMessage": _turn,
    "/ferry.conversations.v1.ConversationsService/StreamMessage": _turn,
    "/ferry.jobs.v1.JobsService/CreateJob": _job,
    "/ferry.jobs.v1.JobsService/GetJob": lambda s: jobs_pb2.GetJobRequest(name=s.job),
    "/ferry.jobs.v1.JobsService/ListJobs": lambda s: jobs_pb2.ListJobsRequest(page_size=1),
    # Cancelling an ended job returns it unchanged: the same subject serves every call.
    "/ferry.jobs.v1.JobsService/CancelJob": lambda s: jobs_pb2.CancelJobRequest(name=s.job),
    "/ferry.jobs.v1.JobsService/WaitJob": lambda s: jobs_pb2.WaitJobRequest(name=s.job, timeout_seconds=0.1),
    "/ferry.grammars.v1.GrammarsService/DeleteGrammar": lambda s: grammars_pb2.DeleteGrammarRequest(
        name=s.new_grammar()
    ),
}


def empty_request(rpc: Rpc) -> message.Message:
    """The method's request message with nothing set (internal methods: refused before it is read)."""
    cls: type[message.Message] = message_factory.GetMessageClass(rpc.method.input_type)
    return cls()


# -- gRPC ----------------------------------------------------------------------------------------------


def call_grpc(channel: grpc.Channel, rpc: Rpc, request: message.Message, timeout: float = 60.0) -> None:
    """Calls `rpc` on `channel` and reads the whole answer; raises grpc.RpcError on failure."""
    response_class = message_factory.GetMessageClass(rpc.method.output_type)
    serialize, parse = type(request).SerializeToString, response_class.FromString
    if rpc.method.server_streaming:
        for _ in channel.unary_stream(rpc.path, serialize, parse)(request, timeout=timeout):
            pass
    else:
        channel.unary_unary(rpc.path, serialize, parse)(request, timeout=timeout)


def grpc_code(channel: grpc.Channel, rpc: Rpc, request: message.Message) -> grpc.StatusCode:
    try:
        call_grpc(channel, rpc, request)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


# -- REST ----------------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\{([\w.]+)(?:=[^}]*)?\}")


def _field(request: message.Message, dotted: str) -> Any:
    value: Any = request
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class RestCall:
    verb: str
    path: str
    body: dict[str, Any] | None


def rest_call(rpc: Rpc, request: message.Message) -> RestCall:
    """The HTTP request the method's google.api.http rule maps `request` to."""
    rule = rpc.http_rule
    assert rule is not None, f"{rpc} has no REST mapping"
    verb = rule.WhichOneof("pattern")
    assert verb in ("get", "post", "put", "patch", "delete"), f"{rpc}: pattern {verb}"
    template: str = getattr(rule, verb)
    in_path = [m.group(1) for m in _VARIABLE.finditer(template)]
    path = _VARIABLE.sub(lambda m: str(_field(request, m.group(1))), template)
    body: dict[str, Any] | None = None
    if rule.body == "*":
        body = json_format.MessageToDict(request, preserving_proto_field_name=True)
        for name in in_path:
            body.pop(name, None)
    elif rule.body:
        body = json_format.MessageToDict(_field(request, rule.body), preserving_proto_field_name=True)
    return RestCall(verb.upper(), path, body)


def rest_status(http: httpx.Client, rpc: Rpc, request: message.Message, headers: dict[str, str]) -> int:
    """HTTP status of `rpc` called over REST, after reading the whole (maybe streamed) body."""
    call = rest_call(rpc, request)
    with http.stream(call.verb, call.path, json=call.body, headers=headers) as response:
        response.read()
        return response.status_code


def refused_generate(target: str, key: str, model: str, prompt: str, max_tokens: int) -> grpc.RpcError:
    """The error a native Generate with this key gets on a service port (fails when it succeeds)."""
    request = inference_pb2.GenerateRequest(
        model=f"models/{model}", prompt=prompt, sampling=inference_pb2.SamplingParams(max_tokens=max_tokens)
    )
    with keyed_channel(target, key) as channel:
        try:
            inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=30)
        except grpc.RpcError as err:
            return err
    raise AssertionError("Generate was not refused")
