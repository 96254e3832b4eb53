"""A lean HTTP/1.1 client for small JSON POSTs: pings, and forwards to local applications.

These are the daemon's most frequent requests (a thousand peers at a one-second interval are
a thousand pings a second; every inbound message is forwarded), and they are all alike: a
small JSON body out, a small JSON answer back. aiohttp's general client spends most of their
CPU on machinery they do not need, so they go through this one; everything else (messages,
files, the confirm handshake) still uses aiohttp (:mod:`daemon.peers`).

Connections are kept alive in a small pool per host. A connection the server closed while
idle is noticed when it is reused, and the request is sent once more on a fresh one (only when
no byte of the answer came, so nothing is ever applied twice by a well-behaved server: it
closed before reading the request). The rules of every outbound call hold: the caller's
headers and nothing else (no cookies, no ``Authorization``), no redirects followed (a 3xx is
returned as is), TLS verified by the system's default context, a timeout on the whole
exchange (connecting included) and a cap on the answer's size.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from daemon import __version__
from daemon.errors import PeerError

MAX_HEAD = 16 * 1024
IDLE_PER_HOST = 32


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer: its status, its headers (case-insensitive) and its body."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    tls: bool
    path: str
    host_header: str


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if port == (443 if tls else 80) else f"{bracketed}:{port}"
    return _Target(host, port, tls, parts.path or "/", host_header)


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


class LiteClient:
    """POSTs small bodies over pooled keep-alive connections."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}

    def close(self) -> None:
        """Close every idle connection."""
        for pool in self._idle.values():
            for connection in pool:
                connection.close()
        self._idle.clear()

    async def post(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,
        max_answer: int,
    ) -> Reply:
        """POST ``body`` as JSON to ``url`` and return the answer, whatever its status."""
        target = self._targets.get(url)
        if target is None:
            try:
                target = _target(url)
            except ValueError as exc:
                raise PeerError("bad_url", str(exc)) from None
            self._targets[url] = target
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            f"User-Agent: remoteclusterd/{__version__}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{lines}\r\n"
        ).encode("latin-1") + body
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(target, request, max_answer)
        except TimeoutError:
            raise PeerError("timeout", f"no answer within {timeout:g}s") from None

    async def _exchange(self, target: _Target, request: bytes, max_answer: int) -> Reply:
        key = (target.host, target.port, target.tls)
        pool = self._idle.setdefault(key, [])
        while pool:
            connection = pool.pop()
            if connection.reader.at_eof():  # closed by the server while idle
                connection.close()
                continue
            try:
                return await self._round_trip(key, connection, request, max_answer)
            except _Stale:
                continue  # the server closed this idle connection: try another, or a new one
        connection = await self._connect(target)
        try:
            return await self._round_trip(key, connection, request, max_answer)
        except _Stale:
            raise PeerError("transport_error", "the connection closed before an answer") from None

    async def _connect(self, target: _Target) -> _Connection:
        context = (self._ssl or ssl.create_default_context()) if target.tls else None
        try:
            reader, writer = await asyncio.open_connection(
                target.host, target.port, ssl=context, limit=MAX_HEAD
            )
        except ssl.SSLError as exc:
            raise PeerError("tls_error", str(exc)) from None
        except OSError as exc:
            where = f"{target.host}:{target.port}"
            raise PeerError(
                "unreachable", f"cannot connect to {where}: {exc.strerror or exc}"
            ) from None
        return _Connection(reader, writer)

    async def _round_trip(
        self, key: tuple[str, int, bool], connection: _Connection, request: bytes, max_answer: int
    ) -> Reply:
        try:
            connection.writer.write(request)
            reply, keep_alive = await _read_answer(connection.reader, max_answer)
        except (_Stale, PeerError):
            connection.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            connection.close()
            raise PeerError("transport_error", f"{type(exc).__name__}: {exc}") from None
        except BaseException:  # cancelled mid-answer: the connection's state is unknown
            connection.close()
            raise
        pool = self._idle.setdefault(key, [])
        if keep_alive and len(pool) < IDLE_PER_HOST:
            pool.append(connection)
        else:
            connection.close()
        return reply


async def _read_answer(reader: asyncio.StreamReader, max_answer: int) -> tuple[Reply, bool]:
    """Read one answer; also whether the connection stays open for the next request."""
    try:
        status_line = await reader.readline()
    except ConnectionError:
        raise _Stale from None
    if not status_line:
        raise _Stale
    status, keep_alive, headers = await _read_head(reader, status_line)
    while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints): skip them
        if status == 101:
            raise PeerError("bad_response", "the server switched protocols", status)
        status, keep_alive, headers = await _read_head(reader, await reader.readline())
    length = headers.get("content-length")
    if status in (204, 304):
        body = b""  # no body, whatever the headers say
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader, max_answer, status)
    elif length is not None:
        _check_size(int(length), max_answer, status)
        body = await reader.readexactly(int(length))
    else:
        body = await _read_to_end(reader, max_answer, status)
        keep_alive = False
    return Reply(status, CIMultiDictProxy(headers), body), keep_alive


async def _read_to_end(reader: asyncio.StreamReader, max_answer: int, status: int) -> bytes:
    """A body delimited by the connection's end (HTTP/1.0 style), however it is split."""
    body = bytearray()
    while chunk := await reader.read(65536):
        body += chunk
        _check_size(len(body), max_answer, status)
    return bytes(body)


def _check_size(size: int, max_answer: int, status: int) -> None:
    if size > max_answer:
        raise PeerError("bad_response", f"answer larger than {max_answer} bytes", status)


async def _read_head(
    reader: asyncio.StreamReader, status_line: bytes
) -> tuple[int, bool, CIMultiDict[str]]:
    """Parse the status line and the headers; also whether the connection may be kept."""
    version, _, rest = status_line.decode("latin-1").partition(" ")
    code = rest[:3]
    if not (
        version.startswith("HTTP/1.")
        and code.isascii()
        and code.isdigit()
        and rest[3:4] in ("", " ", "\r", "\n")
    ):
        raise PeerError("bad_response", "not an HTTP answer")
    status = int(code)
    if not 100 <= status <= 599:
        raise PeerError("bad_response", f"status {status} is not an HTTP status")
    headers: CIMultiDict[str] = CIMultiDict()
    size = len(status_line)
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        size += len(line)
        if size > MAX_HEAD:
            raise PeerError("bad_response", "answer headers too large")
        name, _, value = line.decode("latin-1").partition(":")
        headers.add(name.strip(), value.strip())
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" or (version == "HTTP/1.1" and connection != "close")
    return status, keep_alive, headers


class _Stale(Exception):
    """The connection was closed by the peer before the answer started."""


async def _read_chunked(reader: asyncio.StreamReader, max_answer: int, status: int) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        _check_size(len(body) + size, max_answer, status)
        body += await reader.readexactly(size)
        await reader.readexactly(2)
