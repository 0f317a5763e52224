"""ConversationsService: conversations (AIP-131..135, idempotent create per AIP-155) and their turns.
A turn stores the user message, fits the stored branch into the model's context (context_fit.py), has
the Inference service generate the answer on the caller's behalf, and stores it. A key sees only its
own conversations; another key's are NOT_FOUND, so ids cannot be probed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from ferry.auth.v1.auth_pb2 import Principal
from ferry.conversations.v1 import conversations_pb2, conversations_pb2_grpc
from ferry.inference.v1 import inference_pb2
from google.protobuf import empty_pb2

from services.common import listing
from services.common.access import ADMIN, INTERNAL
from services.common.auth import principal_var
from services.common.config import Settings
from services.common.errors import Reason, invalid_argument, rpc_error
from services.common.interceptor import current_call
from services.common.model_names import ModelNames
from services.common.names import REQUEST_ID_RULE, is_request_id
from services.conversations.context_fit import Fitted, fit
from services.conversations.domain import (
    CONVERSATION_ID,
    CONVERSATIONS,
    TITLE_FROM_MESSAGE,
    ConversationFields,
    StoredConversation,
    StoredMessage,
    branch,
    content_text,
    conversation_name,
    parse_message_name,
    versions,
)
from services.conversations.generation import Generation
from services.conversations.store import ConversationStore
from services.conversations.token_count import TokenCounter
from services.inference.domain import Message
from services.inference.templates import ChatTemplates
from services.recording import Recorder

Conversation = conversations_pb2.Conversation
# Room left for the answer when a turn does not set max_tokens: the prompt may use the rest of the
# model's context.
DEFAULT_ANSWER_TOKENS = 512


@dataclass(frozen=True)
class Turn:
    """What a turn answers: the stored user message and the messages of its prompt."""

    conversation: StoredConversation
    user: StoredMessage
    fitted: Fitted


class ConversationsServicer(conversations_pb2_grpc.ConversationsServiceServicer):
    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        generation: Generation,
        counter: TokenCounter,
        recorder: Recorder,
    ) -> None:
        self.settings = settings
        self.store = store
        self.generation = generation
        self.counter = counter
        self.recorder = recorder
        self.templates = ChatTemplates()
        self.names = ModelNames.of(settings)

    async def CreateConversation(
        self, request: conversations_pb2.CreateConversationRequest, context: grpc.aio.ServicerContext
    ) -> Conversation:
        if not request.HasField("conversation"):
            raise invalid_argument("conversation", "is required")
        if request.request_id and not is_request_id(request.request_id):
            raise invalid_argument("request_id", f"must be {REQUEST_ID_RULE}")
        fields = ConversationFields.from_proto(request.conversation)
        owner, _ = _caller()
        request_id = request.request_id or None
        if request_id and (first := await self.store.by_request_id(owner, request_id)) is not None:
            return first.to_proto()  # a retry: the first answer (AIP-155)
        created = await self.store.insert(fields, owner=owner, request_id=request_id)
        if created is None:  # lost a race with this request's own retry
            first = await self.store.by_request_id(owner, request_id) if request_id else None
            if first is None:
                raise rpc_error(Reason.INTERNAL, "the conversation could not be stored")
            return first.to_proto()
        self._audit("conversation.create", created.name, model=fields.model)
        return created.to_proto()

    async def GetConversation(
        self, request: conversations_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> Conversation:
        return (await self._owned(request.name, "name")).to_proto()

    async def ListConversations(
        self, request: conversations_pb2.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> conversations_pb2.ListConversationsResponse:
        owner, admin = _caller()
        page = listing.page(
            request.page_size,
            request.page_token,
            query=(CONVERSATIONS, "" if admin else owner),
            key=("time", "text"),
        )
        rows = await self.store.page(None if admin else owner, page.after, page.limit)
        shown, token = page.split(rows, lambda c: (c.update_time, c.id))
        return conversations_pb2.ListConversationsResponse(
            conversations=[c.to_proto() for c in shown], next_page_token=token
        )

    async def DeleteConversation(
        self, request: conversations_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        conversation = await self._owned(request.name, "name")
        await self.store.delete(conversation.id)
        self._audit("conversation.delete", conversation.name)
        return empty_pb2.Empty()

    async def ListMessages(
        self, request: conversations_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> conversations_pb2.ListMessagesResponse:
        conversation = await self._owned(request.parent, "parent")
        stored = await self.store.messages(conversation.id)
        if request.all_versions:
            shown = stored
        elif request.leaf:
            shown = branch(stored, self._message_id(conversation, request.leaf, "leaf", stored))
        else:
            shown = branch(stored, conversation.current_message)
        numbers = versions(stored)
        return conversations_pb2.ListMessagesResponse(messages=[m.to_proto(*numbers[m.id]) for m in shown])

    async def SendMessage(
        self, request: conversations_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> conversations_pb2.SendMessageResponse:
        response = conversations_pb2.SendMessageResponse()
        async for event in self._turn(request):
            if event.HasField("user_message"):
                response.user_message.CopyFrom(event.user_message)
                response.left_out_turns = event.left_out_turns
            elif event.HasField("assistant_message"):
                response.assistant_message.CopyFrom(event.assistant_message)
        return response

    async def StreamMessage(
        self, request: conversations_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[conversations_pb2.StreamMessageResponse]:
        async for event in self._turn(request):
            yield event

    async def _turn(
        self, request: conversations_pb2.SendMessageRequest
    ) -> AsyncIterator[conversations_pb2.StreamMessageResponse]:
        if request.request_id and not is_request_id(request.request_id):
            raise invalid_argument("request_id", f"must be {REQUEST_ID_RULE}")
        conversation = await self._owned(request.conversation, "conversation")
        sampling = request.sampling if request.HasField("sampling") else conversation.sampling()
        constraint = request.constraint if request.HasField("constraint") else conversation.constraint()
        turn = await self._prepare(conversation, request, sampling)
        request_id = request.request_id or str(uuid.uuid4())
        numbers = versions(await self.store.messages(conversation.id))
        yield conversations_pb2.StreamMessageResponse(
            user_message=turn.user.to_proto(*numbers.get(turn.user.id, (1, 1))),
            left_out_turns=turn.fitted.left_out_turns,
        )
        principal = principal_var.get()
        pieces: list[str] = []
        final: inference_pb2.GenerateStreamResponse | None = None
        stream = self.generation.stream(
            conversation.fields.model,
            turn.fitted.messages,
            request_id=request_id,
            principal=principal,
            sampling=sampling,
            constraint=constraint,
        )
        answer: StoredMessage | None = None
        failed = False
        try:
            async for piece in stream:
                if piece.text:
                    pieces.append(piece.text)
                    yield conversations_pb2.StreamMessageResponse(text=piece.text)
                if piece.finish_reason:
                    final = piece
            answer = await self._store_answer(turn, "".join(pieces), final, request_id)
        except Exception:
            failed = True
            raise
        finally:
            # Closing the stream cancels the call to Inference, which frees the engine slot.
            await stream.aclose()
            if answer is None and not failed:
                # The caller stopped the turn (the task cancelled, or the stream closed at a yield):
                # what was generated is kept, as a CANCELLED answer.
                await asyncio.shield(self._store_answer(turn, "".join(pieces), None, request_id))
        assert answer is not None  # stored above when the stream ended
        numbers = versions(await self.store.messages(conversation.id))
        yield conversations_pb2.StreamMessageResponse(assistant_message=answer.to_proto(*numbers[answer.id]))

    async def _prepare(
        self,
        conversation: StoredConversation,
        request: conversations_pb2.SendMessageRequest,
        sampling: inference_pb2.SamplingParams | None,
    ) -> Turn:
        """Stores the turn's user message (a new one, or an edit's new version) and fits the prompt."""
        stored = await self.store.messages(conversation.id)
        kind = request.WhichOneof("turn")
        if kind == "content":
            content = content_text(request.content, "content")
            user = await self.store.add_message(
                conversation.id, conversation.current_message, "user", content
            )
        elif kind == "edit":
            target = self._message(conversation, request.edit.message, "edit.message", stored)
            if target.role != "user":
                raise invalid_argument("edit.message", "must name a user message (answers are regenerated)")
            content = content_text(request.edit.content, "edit.content")
            user = await self.store.add_message(conversation.id, target.parent_id, "user", content)
        elif kind == "regenerate":
            target = self._message(conversation, request.regenerate.message, "regenerate.message", stored)
            if target.role != "assistant" or target.parent_id is None:
                raise invalid_argument("regenerate.message", "must name an assistant message")
            user = next(m for m in stored if m.id == target.parent_id)
        else:
            raise invalid_argument("content", "one of content, edit or regenerate is required")
        path = branch([*stored, user], user.id)
        history = [Message(role=m.role, content=m.content) for m in path]
        fitted = await self._fit(conversation, history, sampling)
        return Turn(conversation, user, fitted)

    async def _fit(
        self,
        conversation: StoredConversation,
        history: Sequence[Message],
        sampling: inference_pb2.SamplingParams | None,
    ) -> Fitted:
        system = conversation.fields.system_prompt
        model_id = self.names.model(conversation.fields.model.removeprefix("models/"))
        model = await self.counter.model(model_id)
        if model is None or not model.context_length or not model.chat_template:
            # Not a model of ferry's Triton (an upstream one, or none: the Inference service says which):
            # the whole branch is sent.
            messages = [Message(role="system", content=system)] if system else []
            return Fitted([*messages, *history], 0, None)
        answer_room = sampling.max_tokens if sampling is not None and sampling.HasField("max_tokens") else 0
        limit = model.context_length - min(answer_room or DEFAULT_ANSWER_TOKENS, model.context_length // 2)
        if conversation.fields.context_limit_tokens:
            limit = min(limit, conversation.fields.context_limit_tokens)

        async def count(messages: Sequence[Message]) -> int:
            prompt = self.templates.render(model.name, model.chat_template, messages)
            return await self.counter.count(model.name, prompt)

        return await fit(system, history, limit, count)

    async def _store_answer(
        self,
        turn: Turn,
        text: str,
        final: inference_pb2.GenerateStreamResponse | None,
        request_id: str,
    ) -> StoredMessage:
        reason = final.finish_reason if final is not None else inference_pb2.FINISH_REASON_CANCELLED
        usage = final.usage if final is not None else inference_pb2.Usage()
        title = (
            turn.user.content.strip().splitlines()[0][:TITLE_FROM_MESSAGE]
            if turn.user.content.strip()
            else ""
        )
        answer = await self.store.add_message(
            turn.conversation.id,
            turn.user.id,
            "assistant",
            text,
            finish_reason=reason,
            prompt_tokens=usage.prompt_tokens or (turn.fitted.prompt_tokens or 0),
            completion_tokens=usage.completion_tokens,
            left_out_turns=turn.fitted.left_out_turns,
            request_id=request_id,
            make_current=True,
            title=title,
        )
        return answer

    async def _owned(self, name: str, field: str) -> StoredConversation:
        """The caller's conversation (any one for admin); NOT_FOUND for another key's, as for none."""
        if not name:
            raise invalid_argument(field, "is required, in the form conversations/{conversation}")
        prefix, slash, conversation_id = name.partition("/")
        if prefix != CONVERSATIONS or not slash or not CONVERSATION_ID.match(conversation_id):
            raise invalid_argument(
                field, f"'{name}' is not a name of the form conversations/{{conversation}}"
            )
        conversation = await self.store.by_id(conversation_id)
        owner, admin = _caller()
        if conversation is None or not (admin or conversation.owner == owner):
            raise rpc_error(
                Reason.CONVERSATION_NOT_FOUND, f"conversation '{name}' not found", metadata={"name": name}
            )
        return conversation

    def _message(
        self, conversation: StoredConversation, name: str, field: str, stored: Sequence[StoredMessage]
    ) -> StoredMessage:
        message_id = self._message_id(conversation, name, field, stored)
        return next(m for m in stored if m.id == message_id)

    def _message_id(
        self, conversation: StoredConversation, name: str, field: str, stored: Sequence[StoredMessage]
    ) -> int:
        conversation_id, message_id = parse_message_name(name, field)
        if conversation_id != conversation.id or all(m.id != message_id for m in stored):
            raise rpc_error(
                Reason.CONVERSATION_MESSAGE_NOT_FOUND,
                f"{field}: message '{name}' not found in {conversation_name(conversation.id)}",
                metadata={"field": field, "name": name},
            )
        return message_id

    def _audit(self, action: str, resource: str, **attributes: str) -> None:
        call = current_call.get()
        self.recorder.operational(
            action,
            principal=call.principal if call else "system",
            resource=resource,
            request_id=call.request_id if call else "",
            attributes=attributes,
        )


def _caller() -> tuple[str, bool]:
    """(principal name, whether it may see every conversation). With authentication off every caller
    is `anonymous` and sees them all."""
    principal: Principal | None = principal_var.get()
    if principal is None:
        call = current_call.get()
        return (call.principal if call else "anonymous"), True
    return principal.name, bool({ADMIN, INTERNAL} & set(principal.scopes))
