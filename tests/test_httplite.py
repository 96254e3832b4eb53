"""The lean HTTP client against scripted servers: framing, keep-alive, failures, TLS."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trustme
from aiohttp import web

from daemon.errors import PeerError
from daemon.httplite import LiteClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
BODY = b'{"remote_id":"x","msg":{}}'
PONG = b'{"sent_at":1,"recv_at":2}'


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw TCP server; yields its URL and a list that counts connections."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/prefix/", connections
    finally:
        srv.close()
        await srv.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[list[str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    length = next(int(h.split(":")[1]) for h in head if h.lower().startswith("content-length"))
    return head, await reader.readexactly(length)


def answering(answer: bytes, *, keep: bool = True) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
            if not keep:
                return

    return handler


def ok(body: bytes = PONG, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


HEADERS = {"X-RemoteCluster-Id": "r" * 26, "X-RemoteCluster-Token": "t" * 26}


async def ping(client: LiteClient, url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    ping_url = url.rstrip("/") + "/api/v4/remotecluster/ping"
    reply = await client.post(
        ping_url, headers=HEADERS, body=BODY, timeout=timeout, max_answer=65536
    )
    return reply.status, reply.body


async def test_request_shape_and_keep_alive() -> None:
    seen: list[list[str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            assert body == BODY
            seen.append(head)
            writer.write(ok())

    client = LiteClient()
    async with server(handler) as (url, connections):
        for _ in range(3):
            assert await ping(client, url) == (200, PONG)
    client.close()
    assert len(connections) == 1  # kept alive
    head = seen[0]
    assert head[0] == "POST /prefix/api/v4/remotecluster/ping HTTP/1.1"
    names = {h.split(":")[0].lower() for h in head[1:] if h}
    assert {"x-remotecluster-id", "x-remotecluster-token", "content-type", "host"} <= names
    assert not names & {"cookie", "authorization"}
    assert f"X-RemoteCluster-Token: {'t' * 26}" in head


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n"
        + PONG[:5]
        + b"\r\n"
        + f"{len(PONG) - 5:x}".encode()
        + b"\r\n"
        + PONG[5:]
        + b"\r\n0\r\n\r\n",
        ok(extra="Connection: close\r\n"),
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n" + PONG,
    ],
    ids=["chunked", "connection-close", "no-content", "http10-until-eof"],
)
async def test_answer_framings(answer: bytes) -> None:
    keep = b"chunked" in answer or b" 204 " in answer
    expected = (204, b"") if b" 204 " in answer else (200, PONG)
    client = LiteClient()
    async with server(answering(answer, keep=keep)) as (url, connections):
        assert await ping(client, url) == expected
        assert await ping(client, url) == expected
    client.close()
    assert len(connections) == (1 if keep else 2)


async def test_a_connection_closed_while_idle_is_replaced() -> None:
    """The peer drops the kept-alive connection between pings: one retry on a fresh one."""
    client = LiteClient()
    async with server(answering(ok(), keep=False)) as (url, connections):
        assert await ping(client, url) == (200, PONG)  # the server then closes its end
        assert await ping(client, url) == (200, PONG)
    client.close()
    assert len(connections) == 2


async def test_failures() -> None:
    client = LiteClient()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with server(hang) as (url, _):
        with pytest.raises(PeerError) as info:
            await ping(client, url, timeout=0.2)
        assert info.value.reason == "timeout"
    async with server(answering(b"garbage\r\n\r\n")) as (url, _):
        with pytest.raises(PeerError) as info:
            await ping(client, url)
        assert info.value.reason == "bad_response"
    async with server(answering(ok(body=b"x" * 70_000))) as (url, _):
        with pytest.raises(PeerError, match="larger than"):
            await ping(client, url)
    async with server(
        answering(b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n")
    ) as (url, _):
        assert await ping(client, url) == (302, b"")  # never followed
    with pytest.raises(PeerError) as info:
        await ping(client, "http://127.0.0.1:9")
    assert info.value.reason == "unreachable"
    client.close()


async def test_tls_peer(aiohttp_server: object) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)

    async def pong(request: web.Request) -> web.Response:
        assert request.headers["X-RemoteCluster-Id"] == "r" * 26
        return web.Response(body=PONG, content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v4/remotecluster/ping", pong)
    srv = await aiohttp_server(app, ssl=server_ctx)  # type: ignore[operator]
    url = f"https://127.0.0.1:{srv.port}"
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client = LiteClient(ssl_context=client_ctx)
    assert await ping(client, url) == (200, PONG)
    client.close()
    untrusting = LiteClient()  # the system's CAs do not know this certificate
    with pytest.raises(PeerError) as info:
        await ping(untrusting, url)
    assert info.value.reason in ("tls_error", "unreachable")
    untrusting.close()


async def test_an_answer_ended_by_the_connection_is_read_to_its_end() -> None:
    """An HTTP/1.0 answer without a length that arrives in pieces is not cut at the first."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + PONG[:7])
        await writer.drain()
        await asyncio.sleep(0.1)  # a slow sender: the rest comes later
        writer.write(PONG[7:])
        await writer.drain()

    client = LiteClient()
    async with server(slow) as (url, _):
        assert await ping(client, url) == (200, PONG)
    async with server(answering(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 70_000, keep=False)) as (
        url,
        _,
    ):
        with pytest.raises(PeerError, match="larger than"):
            await ping(client, url)
    with pytest.raises(PeerError) as info:
        await ping(client, "http://127.0.0.1:99999")
    assert info.value.reason == "bad_url"
    client.close()


async def test_interim_answers_are_skipped_and_odd_statuses_refused() -> None:
    """A 103 before the answer never makes two requests share one answer."""
    count = 0

    async def hinting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            await read_request(reader)
            count += 1
            body = f'{{"for":{count}}}'.encode()
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(body=body))
            await writer.drain()

    client = LiteClient()
    async with server(hinting) as (url, connections):
        assert await ping(client, url) == (200, b'{"for":1}')
        assert await ping(client, url) == (200, b'{"for":2}')
    assert len(connections) == 1
    for status_line in (b"HTTP/1.1 2000 OK", b"HTTP/1.1 999 Odd", b"HTTP/1.1 20 Short"):
        async with server(answering(status_line + b"\r\nContent-Length: 0\r\n\r\n")) as (url, _):
            with pytest.raises(PeerError) as info:
                await ping(client, url)
            assert info.value.reason == "bad_response", status_line
    client.close()
