"""Outbound calls to peers: one shared aiohttp session, explicit timeouts, capped answers.

Every call carries ``X-RemoteCluster-Id`` and ``X-RemoteCluster-Token`` and nothing else that
authenticates: no cookie (the session's jar is a :class:`aiohttp.DummyCookieJar`) and no
``Authorization`` header, because Mattermost takes the first credential it finds and a cookie
or bearer token would shadow the remote-cluster token. Redirects are not followed, so the token
never travels to a host the operator did not link.

Site URLs are joined with API paths slash-safely: ``https://a.example/`` and
``https://a.example`` reach the same URL, and a path prefix (``https://a.example/mm``) is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import aiohttp

from daemon.errors import PeerError
from daemon.httplite import LiteClient, Reply
from daemon.settings import Settings

HEADER_REMOTE_ID = "X-RemoteCluster-Id"
HEADER_REMOTE_TOKEN = "X-RemoteCluster-Token"  # noqa: S105 - a header name, not a secret

PING_PATH = "api/v4/remotecluster/ping"
MSG_PATH = "api/v4/remotecluster/msg"
CONFIRM_INVITE_PATH = "api/v4/remotecluster/confirm_invite"


def join_url(site_url: str, path: str) -> str:
    """Join a site URL and an API path with exactly one slash between them."""
    return f"{site_url.rstrip('/')}/{path.lstrip('/')}"


@contextlib.asynccontextmanager
async def client_session(
    user_agent: str, *, limit_per_host: int
) -> AsyncIterator[aiohttp.ClientSession]:
    """An outbound session (no cookies, no total connection cap); closed when the block ends.

    ``limit_per_host`` bounds the connections to one peer or local application, so that a
    burst (an outbox catching up, many uploads) cannot flood it; there is no total cap, so
    thousands of peers never wait for each other's connections.
    """
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=limit_per_host, enable_cleanup_closed=True
    )
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": user_agent},
        timeout=aiohttp.ClientTimeout(total=60, sock_connect=30),
    ) as session:
        yield session


class PeerClient:
    """Sends authenticated requests to peers.

    Small JSON POSTs (frames to ``/msg`` and ``/confirm_invite``) go through the lean
    keep-alive client of :mod:`daemon.httplite`; streamed uploads and ``HEAD`` through the
    shared aiohttp session.
    """

    def __init__(
        self, session: aiohttp.ClientSession, lite: LiteClient, settings: Settings
    ) -> None:
        self._session = session
        self._lite = lite
        self._settings = settings

    @property
    def _max_body(self) -> int:
        """Answers are capped like bodies, at the live ``server.max_frame_size``."""
        return self._settings.config.server.max_frame_size

    async def post(
        self,
        site_url: str,
        path: str,
        *,
        remote_id: str,
        token: str,
        body: bytes,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """POST ``body`` as JSON to a peer; raise :class:`PeerError` when no answer came.

        Any HTTP status is returned: what counts as success is the caller's decision.
        """
        return await self._lite.post(
            join_url(site_url, path),
            headers={HEADER_REMOTE_ID: remote_id, HEADER_REMOTE_TOKEN: token, **(headers or {})},
            body=body,
            timeout=timeout,
            max_answer=self._max_body,
        )

    async def request(
        self,
        method: str,
        site_url: str,
        path: str,
        *,
        remote_id: str,
        token: str,
        timeout: aiohttp.ClientTimeout,
        body: bytes | AsyncIterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Any authenticated request to a peer (a streamed upload body included)."""
        request_headers = {
            HEADER_REMOTE_ID: remote_id,
            HEADER_REMOTE_TOKEN: token,
            **(headers or {}),
        }
        try:
            async with self._session.request(
                method,
                join_url(site_url, path),
                data=body,
                headers=request_headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                data = await read_capped(resp, self._max_body)
                return Reply(resp.status, resp.headers, data)
        except TimeoutError:
            limit = timeout.total or timeout.sock_read or 0
            raise PeerError("timeout", f"no answer within {limit:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise PeerError("unreachable", _describe(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PeerError("transport_error", _describe(exc)) from None


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a whole answer, or raise :class:`PeerError` once it passes ``limit`` bytes."""
    if resp.content_length is not None:
        if resp.content_length > limit:
            raise PeerError("bad_response", f"answer larger than {limit} bytes")
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise PeerError("bad_response", f"answer larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    """A one-line cause without the request's headers (they carry the token)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"
