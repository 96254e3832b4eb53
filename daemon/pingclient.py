"""A lean HTTP/1.1 client for pings: one keep-alive connection per peer, nothing more.

Pings are the daemon's most frequent request (a thousand peers at a one-second interval are a
thousand requests a second), and they are all alike: a small JSON POST, a small JSON answer.
aiohttp's general client spends most of a ping's CPU on machinery a ping does not need, so
pings use this instead; everything else still goes through aiohttp (:mod:`daemon.peers`).

The rules are the same as for every outbound call: the remote-cluster headers and nothing else
that authenticates (no cookies, no ``Authorization``), no redirects followed (a 3xx is a failed
ping), TLS verified by the system's default context, a timeout on the whole exchange and a cap
on the answer's size. A connection that a peer closed while idle is detected when it is reused,
and the ping is sent once more on a fresh connection.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from daemon import __version__
from daemon.errors import PeerError
from daemon.peers import HEADER_REMOTE_ID, HEADER_REMOTE_TOKEN, PING_PATH, join_url

MAX_ANSWER = 64 * 1024
MAX_HEAD = 16 * 1024


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    tls: bool
    path: str
    host_header: str


def _target(site_url: str) -> _Target:
    parts = urlsplit(join_url(site_url, PING_PATH))
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    default_port = port == (443 if tls else 80)
    bracketed = f"[{host}]" if ":" in host else host
    return _Target(
        host, port, tls, parts.path, bracketed if default_port else f"{bracketed}:{port}"
    )


class _Connection:
    def __init__(
        self, target: _Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.target, self.reader, self.writer = target, reader, writer

    def close(self) -> None:
        self.writer.close()


class PingClient:
    """Sends pings over one kept-alive connection per remote."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._connections: dict[str, _Connection] = {}
        self._targets: dict[str, _Target] = {}

    def forget(self, remote_id: str) -> None:
        """Close the connection kept for a remote (deleted, or stopping)."""
        connection = self._connections.pop(remote_id, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Close every connection."""
        for remote_id in list(self._connections):
            self.forget(remote_id)

    async def ping(
        self, site_url: str, *, remote_id: str, token: str, body: bytes, timeout: float
    ) -> tuple[int, bytes]:
        """POST ``body`` to the peer's ``/ping``; return the status and the answer's body."""
        target = self._targets.get(site_url)
        if target is None:
            target = self._targets[site_url] = _target(site_url)
        request = (
            f"POST {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            f"User-Agent: remoteclusterd/{__version__}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{HEADER_REMOTE_ID}: {remote_id}\r\n"
            f"{HEADER_REMOTE_TOKEN}: {token}\r\n\r\n"
        ).encode("latin-1") + body
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(remote_id, target, request)
        except TimeoutError:
            self.forget(remote_id)
            raise PeerError("timeout", f"no answer within {timeout:g}s") from None

    async def _exchange(self, remote_id: str, target: _Target, request: bytes) -> tuple[int, bytes]:
        connection = self._connections.get(remote_id)
        if connection is not None and connection.target != target:
            self.forget(remote_id)
            connection = None
        if connection is not None:
            try:
                return await self._round_trip(remote_id, connection, request)
            except _Stale:
                pass  # the peer closed the idle connection: one more try on a new one
        connection = await self._connect(remote_id, target)
        try:
            return await self._round_trip(remote_id, connection, request)
        except _Stale:
            raise PeerError("transport_error", "the connection closed before an answer") from None

    async def _connect(self, remote_id: str, target: _Target) -> _Connection:
        context = (self._ssl or ssl.create_default_context()) if target.tls else None
        try:
            reader, writer = await asyncio.open_connection(
                target.host, target.port, ssl=context, limit=MAX_HEAD
            )
        except ssl.SSLError as exc:
            raise PeerError("tls_error", str(exc)) from None
        except OSError as exc:
            raise PeerError(
                "unreachable",
                f"cannot connect to {target.host}:{target.port}: {exc.strerror or exc}",
            ) from None
        connection = self._connections[remote_id] = _Connection(target, reader, writer)
        return connection

    async def _round_trip(
        self, remote_id: str, connection: _Connection, request: bytes
    ) -> tuple[int, bytes]:
        try:
            connection.writer.write(request)
            status, keep_alive, answer = await _read_answer(connection.reader)
        except (_Stale, PeerError):
            self.forget(remote_id)
            raise
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, OSError) as exc:  # fmt: skip
            self.forget(remote_id)
            raise PeerError("transport_error", f"{type(exc).__name__}: {exc}") from None
        if not keep_alive:
            self.forget(remote_id)
        return status, answer


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """Read one answer: its status, whether the connection stays open, and its body."""
    status_line = await reader.readline()
    if not status_line:
        raise _Stale
    status, keep_alive, length, chunked = await _read_head(reader, status_line)
    if chunked:
        return status, keep_alive, await _read_chunked(reader)
    if length is not None:
        _check_size(length)
        return status, keep_alive, await reader.readexactly(length)
    answer = await reader.read(MAX_ANSWER + 1)  # delimited by the connection's end
    _check_size(len(answer))
    return status, False, answer


def _check_size(size: int) -> None:
    if size > MAX_ANSWER:
        raise PeerError("bad_response", f"answer larger than {MAX_ANSWER} bytes")


async def _read_head(
    reader: asyncio.StreamReader, status_line: bytes
) -> tuple[int, bool, int | None, bool]:
    """Parse the status line and headers: status, keep-alive, Content-Length, chunked."""
    try:
        version, code, *_ = status_line.decode("latin-1").split(" ", 2)
        status = int(code)
    except ValueError:
        raise PeerError("bad_response", "not an HTTP answer") from None
    keep_alive = version == "HTTP/1.1"
    length: int | None = None
    chunked = False
    size = len(status_line)
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        size += len(line)
        if size > MAX_HEAD:
            raise PeerError("bad_response", "answer headers too large")
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            keep_alive = value == "keep-alive" or (keep_alive and value != "close")
    return status, keep_alive, length, chunked


class _Stale(Exception):
    """The connection was closed by the peer before the answer started."""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        _check_size(len(body) + size)
        body += await reader.readexactly(size)
        await reader.readexactly(2)
