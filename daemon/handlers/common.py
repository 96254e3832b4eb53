"""Helpers shared by the handlers: capped body reads, JSON answers and query parameters."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from aiohttp import web
from multidict import MultiMapping

from daemon.errors import BadRequest, PayloadTooLarge
from daemon.keys import SETTINGS
from daemon.models import check_id, decode_json

T = TypeVar("T")

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def json_response(value: Any, status: int = 200) -> web.Response:
    """Answer ``value`` encoded as JSON."""
    return web.Response(
        status=status, body=msgspec.json.encode(value), content_type="application/json"
    )


async def read_body(request: web.Request) -> bytes:
    """Read the whole body, refusing with 413 anything over ``server.max_frame_size``."""
    limit = request.app[SETTINGS].config.server.max_frame_size
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(detail=f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(detail=f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, model: type[T], *, param: str = "body") -> T:
    """Read a capped JSON body into ``model`` (400 when it does not fit)."""
    return decode_json(await read_body(request), model, param=param)


def path_id(request: web.Request, name: str) -> str:
    """A 26-character id from the URL path (400 otherwise)."""
    return check_id(request.match_info[name], name)


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
    if not value.isdigit():
        raise BadRequest(
            f"Invalid {name} parameter.", detail=f"{name} must be a non-negative integer"
        )
    return int(value)
