"""Every item of a List method, across pages (AIP-158: page_token in, next_page_token out)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, overload


class PageRequest(Protocol):
    page_token: str

    def CopyFrom(self, other: Any, /) -> None: ...


class PageResponse(Protocol):
    @property
    def next_page_token(self) -> str: ...


Req = TypeVar("Req", bound=PageRequest)
Resp = TypeVar("Resp", bound=PageResponse)
T = TypeVar("T")


def _items(response: Any, field: str | Callable[[Any], Iterable[T]]) -> Iterable[Any]:
    return field(response) if callable(field) else getattr(response, field)


def _copy(request: Req) -> Req:
    copy = type(request)()
    copy.CopyFrom(request)
    return copy


def _check_progress(sent: str, returned: str) -> None:
    # A server answering the token it was sent would loop the iteration forever.
    if sent and returned == sent:
        raise RuntimeError(f"the server returned the page token it was sent ({sent!r}): pagination stopped")


@overload
def paginate(
    method: Callable[[Req], Resp], request: Req, field: Callable[[Resp], Iterable[T]]
) -> Iterator[T]: ...
@overload
def paginate(method: Callable[[Req], Resp], request: Req, field: str) -> Iterator[Any]: ...
def paginate(
    method: Callable[[Req], Resp], request: Req, field: str | Callable[[Resp], Iterable[T]]
) -> Iterator[Any]:
    """Yields every item of `field` (a name, or a function of the response for typed items) of every
    page: `paginate(client.models.ListModels, ListModelsRequest(), lambda page: page.models)`.
    Pages are fetched as the iteration reaches them; the request is copied, never changed."""
    current = _copy(request)
    while True:
        response = method(current)
        yield from _items(response, field)
        if not response.next_page_token:
            return
        _check_progress(current.page_token, response.next_page_token)
        current.page_token = response.next_page_token


@overload
def apaginate(
    method: Callable[[Req], Awaitable[Resp]], request: Req, field: Callable[[Resp], Iterable[T]]
) -> AsyncIterator[T]: ...
@overload
def apaginate(method: Callable[[Req], Awaitable[Resp]], request: Req, field: str) -> AsyncIterator[Any]: ...
async def apaginate(
    method: Callable[[Req], Awaitable[Resp]], request: Req, field: str | Callable[[Resp], Iterable[T]]
) -> AsyncIterator[Any]:
    """`paginate` for the AsyncClient: `async for model in apaginate(client.models.ListModels, ...)`."""
    current = _copy(request)
    while True:
        response = await method(current)
        for item in _items(response, field):
            yield item
        if not response.next_page_token:
            return
        _check_progress(current.page_token, response.next_page_token)
        current.page_token = response.next_page_token
