"""The web chat process: the chat page (`/chat/`, static files shipped with ferry, no CDN) and the chat
WebSocket (`/chat/ws`, chat_socket.py), both behind Envoy. The page talks to ferry's REST API for
conversations and models and to the WebSocket for turns.

Every response carries a Content-Security-Policy that allows scripts, styles and connections from
ferry only and no inline script, so text that slipped past the page's sanitizer still cannot run.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from services.common.config import Settings
from services.common.logging import configure_logging
from services.conversations.chat_socket import ChatSocket

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
PREFIX = "/chat/"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("name") or "index.html"
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file() or path.suffix not in CONTENT_TYPES:
        raise web.HTTPNotFound(text="not found\n", headers=SECURITY_HEADERS)
    return web.Response(
        body=path.read_bytes(), headers={**SECURITY_HEADERS, "Content-Type": CONTENT_TYPES[path.suffix]}
    )


async def _to_page(request: web.Request) -> web.Response:
    raise web.HTTPFound(PREFIX)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_app(settings: Settings) -> web.Application:
    app = web.Application()
    socket = ChatSocket(settings)
    app.router.add_get(f"{PREFIX}ws", socket.handle)
    app.router.add_get(f"{PREFIX}healthz", _healthz)
    app.router.add_get(PREFIX, _static)
    app.router.add_get(PREFIX + "{name}", _static)
    app.router.add_get("/chat", _to_page)

    async def _close(_: web.Application) -> None:
        await socket.close()

    app.on_cleanup.append(_close)
    return app


async def serve(settings: Settings) -> None:
    runner = web.AppRunner(build_app(settings), shutdown_timeout=5.0)
    await runner.setup()
    conversations = settings.conversations
    site = web.TCPSite(runner, conversations.web_host, conversations.web_port, reuse_address=True)
    await site.start()
    log.info("web chat serving on %s:%d (/chat/, /chat/ws)", conversations.web_host, conversations.web_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    settings = Settings()
    configure_logging("conversations-web", settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
