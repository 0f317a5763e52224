"""The engine on an OpenAI-compatible upstream server (LM Studio, vLLM, llama.cpp's server, OpenAI).

A chat request goes to `{base_url}/chat/completions` with the caller's messages (the upstream applies
its own chat template), a prompt to `{base_url}/completions`; always streamed, with usage in the last
chunk. Each configured model has its own pooled HTTP client (its connection limit and timeouts).

Opening a request is retried with exponential backoff on connection errors, 429 and 5xx, all of it
within the caller's deadline; once the upstream answers 200 nothing is retried (it is generating). Closing the generator closes the HTTP
response, so the upstream sees the disconnect and stops generating. The upstream's answers become the
engine's typed failures (`services.inference.engine_errors` maps them to the caller's errors). The API
key travels only in the Authorization header: no log line, error or record holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry import propagate
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from backends.llamacpp.contract import (
    ConstraintKind,
    EngineErrorCode,
    EngineFault,
    OutputConstraint,
    SamplingParameters,
)
from services.common import upstream_models
from services.common.config import UpstreamModel
from services.common.triton_client import ModelInfo
from services.inference.domain import Message, Piece, TokenLogprob, TopLogprob
from services.inference.engine_interface import (
    EngineBroken,
    EngineError,
    EngineFaulted,
    EngineTimedOut,
    UpstreamAuthFailed,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnreachable,
)
from services.inference.structured import answer_schema

log = logging.getLogger(__name__)

# Backoff between attempts to open a request: 0.25 s, 0.5 s, 1 s, ... (plus jitter), at most this.
RETRY_INITIAL_SECONDS = 0.25
RETRY_MAX_SECONDS = 4.0
# How much of an upstream's error body is read and quoted (they are short; a proxy's HTML page is not).
ERROR_BODY_BYTES = 4096
ERROR_MESSAGE_CHARS = 300
# How long the end of a stream (`[DONE]`) is waited for after its usage chunk.
DRAIN_SECONDS = 0.5

# Contract fields llama.cpp's server (and others) accept beyond OpenAI's own, by their names there.
# Sent only when the caller set them: OpenAI itself refuses fields it does not know.
EXTRA_FIELDS = {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repeat_penalty"}
OPENAI_FIELDS = ("temperature", "top_p", "max_tokens", "seed", "frequency_penalty", "presence_penalty")
# An upstream's `param` in a 400 answer -> the contract's field ("input": the messages or prompt).
PARAM_FIELDS = {
    "messages": "input",
    "prompt": "input",
    "max_completion_tokens": "max_tokens",
    "repeat_penalty": "repetition_penalty",
    "response_format": "constraint",
}


class _RetryableAnswer(Exception):
    """An attempt to open a request that is worth another try (429, 5xx, a connection error)."""

    def __init__(self, failure: EngineError) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class _Upstream:
    name: str
    cfg: UpstreamModel
    client: httpx.AsyncClient


class UpstreamEngine:
    def __init__(
        self,
        models: Mapping[str, UpstreamModel],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`models`: ferry's model name -> its upstream (`Settings.upstream_models`). `transport` is
        for tests (an in-process upstream)."""
        self.models = dict(models)
        self.transport = transport
        self._upstreams: dict[str, _Upstream] = {}

    def _upstream(self, name: str) -> _Upstream:
        upstream = self._upstreams.get(name)
        if upstream is None:
            cfg = self.models.get(name)
            if cfg is None:
                raise EngineError(f"model '{name}' has no upstream configured")
            limits = httpx.Limits(
                max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections
            )
            client = httpx.AsyncClient(
                base_url=cfg.base_url.rstrip("/") + "/",
                limits=limits,
                timeout=_timeouts(cfg, None),
                transport=self.transport,
            )
            upstream = self._upstreams[name] = _Upstream(name, cfg, client)
        return upstream

    async def aclose(self) -> None:
        clients = [upstream.client for upstream in self._upstreams.values()]
        self._upstreams.clear()
        for client in clients:
            await client.aclose()

    async def generate(
        self,
        model: ModelInfo,
        prompt: str,
        sampling: SamplingParameters,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncGenerator[Piece, None]:
        """Yields the upstream's answer as pieces, the last with the finish reason and the usage."""
        upstream = self._upstream(model.name)
        key = _key(upstream)
        chat = messages is not None
        body = request_body(
            model, upstream_models.upstream_name(model.name, upstream.cfg), sampling, prompt, messages
        )
        headers = {"Accept": "text/event-stream"}
        if request_id:
            headers["X-Request-Id"] = request_id
        propagate.inject(headers)  # W3C trace context, for an upstream that traces
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        deadline = None if timeout is None else time.monotonic() + timeout
        path = "chat/completions" if chat else "completions"
        response = await self._open(upstream, path, body, headers, deadline, key)
        try:
            async for piece in _pieces(_events(response, deadline, key), chat, sampling.top_logprobs):
                yield piece
        finally:
            # Before the last piece: closing the connection is how the upstream learns the caller left.
            await response.aclose()

    async def _open(
        self,
        upstream: _Upstream,
        path: str,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
        deadline: float | None,
        key: str | None,
    ) -> httpx.Response:
        """Sends the request until the upstream answers 200 (retrying what is worth it), all of it
        within the deadline; the response's body is not read yet."""
        stop: stop_base = stop_after_attempt(upstream.cfg.max_retries + 1)
        if deadline is not None:
            stop = stop | stop_before_delay(max(0.0, deadline - time.monotonic()))
        retrying = AsyncRetrying(
            stop=stop,
            wait=_wait,
            retry=retry_if_exception_type(_RetryableAnswer),
            before_sleep=lambda state: _log_retry(upstream.name, state),
            reraise=True,
        )
        try:
            # httpx's timeouts bound each phase of an attempt (connect, write, each read), not their
            # sum nor the attempts together: the deadline bounds them all.
            async with asyncio.timeout_at(None if deadline is None else _loop_time(deadline)):
                async for attempt in retrying:
                    with attempt:
                        left = None if deadline is None else deadline - time.monotonic()
                        request = upstream.client.build_request(
                            "POST", path, json=body, headers=headers, timeout=_timeouts(upstream.cfg, left)
                        )
                        return await _send(upstream, request, key)
        except TimeoutError as err:
            raise EngineTimedOut("the upstream did not answer before the request's deadline") from err
        except _RetryableAnswer as err:
            raise err.failure from None
        except UpstreamAuthFailed as err:
            raise _auth_failed(upstream, err.message) from None
        raise AssertionError("tenacity ended without an answer")  # pragma: no cover


def request_body(
    model: ModelInfo,
    upstream_name: str,
    sampling: SamplingParameters,
    prompt: str,
    messages: Sequence[Message] | None,
) -> dict[str, Any]:
    """The OpenAI request for a generation: the fields the caller set, by their OpenAI names, and
    always `max_tokens` (the model's when the caller set none: an upstream's own default may be its
    whole context, or 16)."""
    chat = messages is not None
    body: dict[str, Any] = {
        "model": upstream_name,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        body["messages"] = [{"role": m.role, "content": m.content} for m in messages or ()]
    else:
        body["prompt"] = prompt
    given = sampling.model_dump(exclude_unset=True)
    for name in OPENAI_FIELDS:
        if given.get(name) is not None:
            body[name] = given[name]
    max_tokens = sampling.max_tokens or model.max_tokens
    if max_tokens:
        body["max_tokens"] = max_tokens
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.logprobs:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = sampling.top_logprobs
        else:
            # The legacy completions API takes the number of alternatives; 0 returns none at some
            # servers, so ask for one and drop what the caller did not want.
            body["logprobs"] = max(1, sampling.top_logprobs)
    for name, upstream_name in EXTRA_FIELDS.items():
        if given.get(name) is not None:
            body[upstream_name] = given[name]
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if sampling.logit_bias:
        # Token ids of the upstream's own vocabulary, as OpenAI takes them.
        body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias.items()}
    if sampling.constraint is not None:
        body["response_format"] = _response_format(sampling.constraint, model.name, chat)
    return body


def _response_format(constraint: OutputConstraint, model: str, chat: bool) -> dict[str, Any]:
    """A JSON constraint as OpenAI's chat `response_format`; anything else is refused rather than sent
    where it would be ignored (grammars are not OpenAI's; legacy completions take no response_format)."""
    if chat and constraint.kind is ConstraintKind.JSON_OBJECT:
        return {"type": "json_object"}
    if chat and constraint.kind is ConstraintKind.JSON_SCHEMA:
        # The caller's schema, without what ferry adds for its own engine (llguidance's options).
        plain = answer_schema(constraint.json_schema or {})
        schema = {"name": "response", "schema": plain, "strict": True}
        return {"type": "json_schema", "json_schema": schema}
    what = (
        f"{constraint.kind} grammars"
        if constraint.kind in (ConstraintKind.GBNF, ConstraintKind.LARK)
        else ("response_format on completions")
    )
    raise EngineFaulted(
        EngineFault(
            code=EngineErrorCode.INVALID_PARAMETER,
            message=f"model '{model}' is served by an upstream server, which is not sent {what}"
            " (only response_format on chat completions)",
            field="constraint",
        )
    )


def _timeouts(cfg: UpstreamModel, timeout: float | None) -> httpx.Timeout:
    """The config's connect and read timeouts, none longer than what is left of the request's deadline.
    Getting one of ferry's pooled connections is part of connecting: bounded by the connect timeout."""

    def capped(seconds: float) -> float:
        return seconds if timeout is None else max(0.001, min(seconds, timeout))

    return httpx.Timeout(
        connect=capped(cfg.connect_timeout_seconds),
        read=capped(cfg.read_timeout_seconds),
        write=capped(cfg.read_timeout_seconds),
        pool=capped(cfg.connect_timeout_seconds),
    )


def _key(upstream: _Upstream) -> str | None:
    key = upstream_models.api_key(upstream.cfg)
    cfg = upstream.cfg
    if key is None and (cfg.api_key_env or cfg.api_key_file is not None):
        log.warning(
            "upstream of model %s: its API key is not set (%s is empty or missing); nothing was sent",
            upstream.name,
            _key_source(cfg),
        )
        raise UpstreamAuthFailed(
            f"ferry has no credentials for the upstream of model '{upstream.name}'; "
            "see the inference service log"
        )
    return key


def _auth_failed(upstream: _Upstream, refusal: str) -> UpstreamAuthFailed:
    """The upstream refused the key: where the key comes from (never the key) goes to the log, for the
    operator; the caller learns only that it is a configuration matter."""
    log.warning(
        "upstream of model %s: %s; the key comes from %s",
        upstream.name,
        refusal,
        _key_source(upstream.cfg),
    )
    return UpstreamAuthFailed(
        f"the upstream refused ferry's credentials for model '{upstream.name}'; see the inference service log"
    )


def _key_source(cfg: UpstreamModel) -> str:
    if cfg.api_key_env:
        return f"environment variable {cfg.api_key_env}"
    if cfg.api_key_file is not None:
        return f"file {cfg.api_key_file}"
    return "nowhere (no api_key_env or api_key_file configured)"


def _wait(state: RetryCallState) -> float:
    """Exponential backoff, or longer when the upstream said how long (Retry-After)."""
    backoff = wait_exponential_jitter(
        multiplier=RETRY_INITIAL_SECONDS, max=RETRY_MAX_SECONDS, jitter=RETRY_INITIAL_SECONDS
    )(state)
    outcome = state.outcome
    err = outcome.exception() if outcome is not None else None
    hinted = err.failure.retry_after_seconds if isinstance(err, _RetryableAnswer) else None
    return max(backoff, min(hinted or 0.0, RETRY_MAX_SECONDS))


def _log_retry(name: str, state: RetryCallState) -> None:
    err = state.outcome.exception() if state.outcome is not None else None
    log.info(
        "upstream of model %s: attempt %d failed (%s); retrying",
        name,
        state.attempt_number,
        err.failure.message if isinstance(err, _RetryableAnswer) else err,
    )


async def _send(upstream: _Upstream, request: httpx.Request, key: str | None) -> httpx.Response:
    """One attempt: the response when the upstream answers 200, else the typed failure (raised as
    `_RetryableAnswer` when another attempt may succeed)."""
    try:
        response = await upstream.client.send(request, stream=True)
    except httpx.PoolTimeout as err:
        # Not the upstream: ferry's own connections to it were all busy (more requests admitted than
        # max_connections, e.g. through inference.max_in_flight). Not retried: a config matter.
        cfg = upstream.cfg
        log.warning(
            "upstream of model %s: all %d of ferry's pooled connections stayed busy for %.1f s"
            " (max_connections is below the requests admitted; check inference.max_in_flight)",
            upstream.name,
            cfg.max_connections,
            cfg.connect_timeout_seconds,
        )
        raise EngineError(
            f"all {cfg.max_connections} of ferry's connections to the upstream are in use"
            " (its connection pool, not the upstream, is exhausted)"
        ) from err
    except httpx.TimeoutException as err:
        if isinstance(err, httpx.ConnectTimeout):
            raise _RetryableAnswer(
                UpstreamUnreachable(f"no connection to it in time ({_what(err)})")
            ) from err
        # Connected, but no answer in time: it may be generating, so a retry could double the work.
        raise EngineTimedOut(f"the upstream did not answer in time ({_what(err)})") from err
    except httpx.TransportError as err:
        raise _RetryableAnswer(UpstreamUnreachable(_what(err))) from err
    if response.status_code == httpx.codes.OK:
        return response
    try:
        body = await _read_some(response)
    finally:
        await response.aclose()
    failure = failure_from_answer(response.status_code, body, response.headers.get("retry-after"), key)
    if response.status_code == httpx.codes.TOO_MANY_REQUESTS or response.status_code >= 500:
        raise _RetryableAnswer(failure)
    raise failure


async def _read_some(response: httpx.Response) -> bytes:
    data = b""
    try:
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) >= ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass  # the status says enough
    return data[:ERROR_BODY_BYTES]


def failure_from_answer(status: int, body: bytes, retry_after: str | None, key: str | None) -> EngineError:
    """The engine failure for an upstream's non-200 answer (or an error event in its stream)."""
    error = _error_object(body)
    message = _scrub(str(error.get("message") or ""), key)[:ERROR_MESSAGE_CHARS]
    hint = _retry_after(retry_after)
    if status == httpx.codes.TOO_MANY_REQUESTS:
        return UpstreamRateLimited(
            f"it answered 429 (too many requests){f': {message}' if message else ''}",
            retry_after_seconds=hint,
        )
    if status >= 500:
        return UpstreamUnreachable(f"it answered HTTP {status}", retry_after_seconds=hint)
    if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        # Its message may quote the key it got: not repeated.
        return UpstreamAuthFailed(f"it refused ferry's API key (HTTP {status})")
    if status == httpx.codes.BAD_REQUEST or status == httpx.codes.UNPROCESSABLE_ENTITY:
        return EngineFaulted(_bad_request(error, message))
    return UpstreamRefused(f"HTTP {status}{f': {message}' if message else ''}")


def _bad_request(error: Mapping[str, Any], message: str) -> EngineFault:
    """A 400: the prompt too long for the upstream's context, else a parameter (or the input) refused."""
    kind = f"{error.get('type', '')} {error.get('code', '')}"
    if "context" in kind:
        # llama.cpp: exceed_context_size_error with n_prompt_tokens and n_ctx; OpenAI:
        # context_length_exceeded (without numbers).
        tokens, limit = error.get("n_prompt_tokens"), error.get("n_ctx")
        if isinstance(tokens, int) and isinstance(limit, int):
            return EngineFault(
                code=EngineErrorCode.PROMPT_TOO_LONG,
                message=message,
                prompt_tokens=tokens,
                context_length=limit,
                limit="model",
            )
    param = str(error.get("param") or "")
    field = PARAM_FIELDS.get(param, param)
    if field not in SamplingParameters.model_fields:
        field = "input"
    return EngineFault(
        code=EngineErrorCode.INVALID_PARAMETER,
        message=f"the upstream server refused it: {message or 'bad request'}",
        field=field,
    )


def _error_object(body: bytes) -> dict[str, Any]:
    """OpenAI's `{"error": {...}}` (also vLLM's flat form); {} for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    error = data.get("error", data)
    if isinstance(error, str):
        return {"message": error}
    return error if isinstance(error, dict) else {}


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "[key]") if key else text


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None  # an HTTP date: the default hint will do
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _what(err: httpx.HTTPError) -> str:
    return str(err) or type(err).__name__


async def _events(
    response: httpx.Response, deadline: float | None, key: str | None
) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of the response's server-sent events, until `[DONE]` or the end of the body."""
    lines = response.aiter_lines()
    while True:
        try:
            if deadline is None:
                line = await anext(lines)
            else:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    line = await anext(lines)
        except StopAsyncIteration:
            return
        except (TimeoutError, httpx.TimeoutException) as err:
            raise EngineTimedOut("the upstream sent nothing more in time") from err
        except httpx.TransportError as err:
            raise UpstreamUnreachable(f"the connection broke mid-answer ({_what(err)})") from err
        field, _, data = line.partition(":")
        if field not in ("data", "error"):
            continue  # blank separators, comments, `event:` lines
        data = data.strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as err:
            raise EngineBroken("the upstream sent an event that is not JSON") from err
        if field == "error":
            event = {"error": event}
        if isinstance(event, dict) and "error" in event:
            error = event["error"]
            status = error.get("code") if isinstance(error, dict) else None
            raise failure_from_answer(status if isinstance(status, int) else 500, data.encode(), None, key)
        if isinstance(event, dict):
            yield event


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


async def _pieces(
    events: AsyncIterator[dict[str, Any]], chat: bool, top_logprobs: int
) -> AsyncGenerator[Piece, None]:
    """Streamed chunks -> pieces. The chunk with the finish reason is held back until the usage chunk
    that follows it, so the last piece carries both (the pipeline records when it sees it)."""
    counted = 0  # completion tokens given out so far: one per chunk with text, until usage corrects it
    final: Piece | None = None
    usage: Mapping[str, Any] | None = None
    async for event in events:
        if isinstance(event.get("usage"), dict):
            usage = event["usage"]
        for choice in (event.get("choices") or [])[:1]:
            text = _text(choice, chat)
            logprobs = _logprobs(choice.get("logprobs"), top_logprobs)
            reason = choice.get("finish_reason") or ""
            tokens = max(1, len(logprobs)) if text or logprobs else 0
            if reason:
                # Its tokens stand unless a usage chunk follows (which then sets the total).
                final = Piece(text, tokens, 0, _finish_reason(reason), logprobs)
            elif tokens:
                counted += tokens
                yield Piece(text, tokens, 0, "", logprobs)
        if usage is not None and final is not None:
            await _drain(events)
            yield _with_usage(final, usage, counted)
            return
    if final is None:
        raise UpstreamUnreachable("its answer ended before the finish reason")
    yield final  # an upstream that sends no usage: the tokens counted are all there is


async def _drain(events: AsyncIterator[dict[str, Any]]) -> None:
    """Reads what follows the usage (`[DONE]`), so the connection goes back to the pool instead of
    being closed; an upstream that sends nothing more within moments is not waited for."""
    with contextlib.suppress(TimeoutError, EngineError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _event in events:
                pass


def _with_usage(final: Piece, usage: Mapping[str, Any], counted: int) -> Piece:
    completion = int(usage.get("completion_tokens") or 0)
    prompt = int(usage.get("prompt_tokens") or 0)
    return Piece(final.text, max(0, completion - counted), prompt, final.finish_reason, final.logprobs)


def _text(choice: Mapping[str, Any], chat: bool) -> str:
    if chat:
        delta = choice.get("delta") or {}
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")


def _finish_reason(reason: str) -> str:
    # Ferry's pieces end with "stop" or "length"; the rest of OpenAI's (content_filter, tool_calls)
    # also ended the answer on the model's side.
    return reason if reason in ("stop", "length") else "stop"


def _logprobs(raw: Any, top: int) -> tuple[TokenLogprob, ...]:
    """Both OpenAI forms: chat's `content` list, and the legacy completions' parallel lists."""
    if not isinstance(raw, dict):
        return ()
    content = raw.get("content")
    if isinstance(content, list):
        return tuple(TokenLogprob.from_dict(item, top) for item in content if isinstance(item, dict))
    tokens = raw.get("tokens") or []
    values = raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or []
    out: list[TokenLogprob] = []
    for index, token in enumerate(tokens):
        alternatives = tops[index] if index < len(tops) and isinstance(tops[index], dict) else {}
        ranked = sorted(alternatives.items(), key=lambda kv: -float(kv[1]))[:top]
        value = values[index] if index < len(values) and values[index] is not None else 0.0
        out.append(
            TokenLogprob(str(token), float(value), tuple(TopLogprob(str(t), float(v)) for t, v in ranked))
        )
    return tuple(out)
