"""Helpers shared by the handlers: capped body reads, JSON answers and query parameters."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from multidict import MultiMapping

from daemon.errors import BadRequest, NotFound, PayloadTooLarge, RequestTimeout
from daemon.keys import REMOTES, SETTINGS
from daemon.models import Remote, check_id, decode_json, parse_decimal

T = TypeVar("T")

BODY_TIMEOUT = 30.0  # seconds for a whole small body (frames, management JSON: ≤ a few 100 kB)

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def json_response(value: Any, status: int = 200) -> web.Response:
    """Answer ``value`` encoded as JSON."""
    return web.Response(
        status=status, body=msgspec.json.encode(value), content_type="application/json"
    )


async def read_body(request: web.Request) -> bytes:
    """Read the whole body: 413 over ``server.max_frame_size``, 408 after :data:`BODY_TIMEOUT`.

    aiohttp itself puts no time limit on reading a body, so a client that stalls mid-body
    would otherwise hold its handler for ever.
    """
    limit = request.app[SETTINGS].config.server.max_frame_size
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(detail=f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(detail=f"the body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(detail=f"{size} bytes in {BODY_TIMEOUT:g}s") from None
    return b"".join(chunks)


async def read_json(request: web.Request, model: type[T], *, param: str = "body") -> T:
    """Read a capped JSON body into ``model`` (400 when it does not fit)."""
    return decode_json(await read_body(request), model, param=param)


def path_id(request: web.Request, name: str) -> str:
    """A 26-character id from the URL path (400 otherwise)."""
    return check_id(request.match_info[name], name)


def linked_remote(request: web.Request) -> Remote:
    """The (not deleted) remote named by ``{remote_id}`` in the path; 404 otherwise."""
    remote = request.app[REMOTES].get(path_id(request, "remote_id"))
    if remote is None or remote.is_deleted:
        raise NotFound("Secure connection not found.", error_id="api.remote_cluster.get.not_found")
    return remote


def bool_param(query: MultiMapping[str], name: str) -> bool:
    """A boolean query parameter, parsed as Go's ``strconv.ParseBool`` (absent is false)."""
    value = query.get(name, "")
    if value == "" or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise BadRequest(f"Invalid {name} parameter.", detail=f"{name} must be true or false")


def int_param(query: MultiMapping[str], name: str, default: int) -> int:
    """A non-negative integer query parameter."""
    value = query.get(name, "")
    if value == "":
        return default
    number = parse_decimal(value)
    if number is None:
        raise BadRequest(
            f"Invalid {name} parameter.", detail=f"{name} must be a non-negative integer"
        )
    return number
