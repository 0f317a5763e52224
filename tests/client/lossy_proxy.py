"""A TCP forwarder in front of Envoy that loses the answer of the first call it carries.

On its first connection it passes the call on to Envoy, holds back everything ferry sends for that
call (response headers, messages, trailers) until ferry has finished it (END_STREAM or RST_STREAM),
then drops the connection: the call was served, yet the client sees only a closed connection
(UNAVAILABLE, no response headers), which is what a retry must survive without doing the work
twice. Connection-level frames (SETTINGS, PING, WINDOW_UPDATE on stream 0) pass. Every later
connection is forwarded as it is. It reads HTTP/2 frame headers only, never HPACK.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
DATA, HEADERS, RST_STREAM = 0x0, 0x1, 0x3
END_STREAM = 0x1


def frames(buffer: bytearray) -> list[tuple[int, int, int, bytes]]:
    """Whole frames at the front of `buffer` (removed from it): (type, flags, stream id, bytes)."""
    out = []
    while len(buffer) >= FRAME_HEADER:
        size = FRAME_HEADER + int.from_bytes(buffer[0:3], "big")
        if len(buffer) < size:
            break
        kind, flags = buffer[3], buffer[4]
        stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
        out.append((kind, flags, stream, bytes(buffer[:size])))
        del buffer[:size]
    return out


@dataclass
class LossyProxy:
    upstream: tuple[str, int]
    connections: int = 0
    calls: int = 0  # request HEADERS frames the client sent (each try of each call)
    lost_answers: int = 0  # answers ferry finished that the client never received
    _listener: socket.socket = field(default_factory=socket.socket)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _open: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                lossy = self.connections == 1
                self._open += [client, server]
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, lossy), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        buffer = bytearray()
        preface = len(PREFACE)
        while chunk := _recv(client):
            try:
                server.sendall(chunk)
            except OSError:
                break
            skip = min(preface, len(chunk))
            preface -= skip
            buffer += chunk[skip:]
            for kind, _flags, stream, _frame in frames(buffer):
                if kind == HEADERS and stream % 2 == 1:
                    with self._lock:
                        self.calls += 1
        _close(server)
        _close(client)

    def _answers(self, server: socket.socket, client: socket.socket, lossy: bool) -> None:
        buffer = bytearray()
        while chunk := _recv(server):
            if not lossy:
                forward = chunk
            else:
                forward = b""
                buffer += chunk
                for kind, flags, stream, frame in frames(buffer):
                    if stream == 0:
                        forward += frame
                    elif kind == RST_STREAM or (kind in (DATA, HEADERS) and flags & END_STREAM):
                        with self._lock:
                            self.lost_answers += 1
                        _close(client)
                        _close(server)
                        return
            try:
                client.sendall(forward)
            except OSError:
                break
        _close(client)
        _close(server)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
