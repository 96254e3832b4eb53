"""Files: the peers' upload and profile-image endpoints.

* ``POST /api/v4/remotecluster/upload/{upload_id}``: a raw body, or the first part of a
  multipart body, appended to the session (204 while incomplete, 200 with the FileInfo when
  complete); ``Upload-Offset`` optional (409 on a mismatch).
* ``HEAD /api/v4/remotecluster/upload/{upload_id}``: ``Upload-Offset`` and ``Upload-Length``.
* ``POST /api/v4/remotecluster/{user_id}/image``: multipart field ``image``.

Extension for local applications (operator token):

* ``POST /api/v4/remotecluster/{remote_id}/files?filename=NAME`` (optional ``channel_id``,
  ``user_id``, ``file_id``): the file's bytes, kept on disk before the 202.
* ``GET /api/v4/remotecluster/{remote_id}/files/{file_id}``: the transfer's state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import structlog
from aiohttp import BodyPartReader, web

from daemon.errors import BadRequest, NotFound, PayloadTooLarge, RequestTimeout
from daemon.filestore import IMAGES
from daemon.handlers.common import json_response, linked_remote, path_id
from daemon.images import ImageError, inspect
from daemon.keys import EVENTS, FILE_SENDER, FILESTORE, REMOTE, SETTINGS, UPLOADS
from daemon.models import parse_decimal

log = structlog.get_logger(__name__)

CHUNK = 256 * 1024


def _upload_offset(request: web.Request) -> int | None:
    value = request.headers.get("Upload-Offset")
    if value is None:
        return None
    offset = parse_decimal(value)
    if offset is None:
        raise BadRequest("Invalid Upload-Offset header.", detail="a non-negative integer")
    return offset


@contextlib.contextmanager
def _multipart_errors() -> Iterator[None]:
    """aiohttp's multipart reader raises ``ValueError`` on a malformed body: that is a 400."""
    try:
        yield
    except ValueError as exc:
        raise BadRequest("Malformed multipart body.", detail=str(exc)) from None


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        with _multipart_errors():
            chunk = await part.read_chunk(CHUNK)
        if not chunk:
            return
        yield chunk


async def upload(request: web.Request) -> web.Response:
    """Append the body to an upload session (Mattermost's ``uploadRemoteData``)."""
    uploads = request.app[UPLOADS]
    session = await uploads.owned(request[REMOTE], request.match_info["upload_id"])
    expected = _upload_offset(request)
    if request.content_type.startswith("multipart/"):
        with _multipart_errors():
            part = await (await request.multipart()).next()
        if not isinstance(part, BodyPartReader):
            raise BadRequest("The multipart body has no file part.")
        result = await uploads.append(
            session, _part_chunks(part), expected_offset=expected, content_length=None
        )
    else:
        result = await uploads.append(
            session,
            request.content.iter_any(),  # what has arrived, so a cut-off body keeps its tail
            expected_offset=expected,
            content_length=request.content_length,
        )
    headers = {"Upload-Offset": str(result.offset), "Upload-Length": str(result.size)}
    if result.file_info is None:
        return web.Response(status=204, headers=headers)
    return web.Response(body=result.file_info, content_type="application/json", headers=headers)


async def upload_offset(request: web.Request) -> web.Response:
    """``HEAD``: the committed offset and the size of an upload session."""
    session = await request.app[UPLOADS].owned(request[REMOTE], request.match_info["upload_id"])
    return web.Response(
        status=200,
        headers={
            "Upload-Offset": str(session.committed),
            "Upload-Length": str(session.file_size),
            "Cache-Control": "no-store",
        },
    )


async def profile_image(request: web.Request) -> web.Response:
    """Store a remote user's profile image under the sending remote (``{"status":"OK"}``)."""
    remote = request[REMOTE]
    user_id = path_id(request, "user_id")
    cfg = request.app[SETTINGS].config.uploads
    limit = cfg.max_image_size
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise PayloadTooLarge(detail=f"profile images are limited to {limit} bytes")
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("Expected a multipart body with an image part.")
    data = None
    with _multipart_errors():
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name == "image":
                data = await _read_capped(part, limit, cfg.progress_timeout)
                break
    if data is None:
        raise BadRequest(
            "Missing the image part.", error_id="api.user.upload_profile_user.no_file.app_error"
        )
    try:
        info = inspect(data, cfg.max_image_pixels)
    except ImageError as exc:
        raise BadRequest(
            f"Invalid profile image: {exc}.", error_id="api.user.upload_profile_user.invalid_image"
        ) from None
    store = request.app[FILESTORE]
    path = store.path(IMAGES, remote.remote_id, user_id)
    await store.write_atomic(path, data)
    log.info("image.received", remote_id=remote.remote_id, user_id=user_id, format=info.format,
             width=info.width, height=info.height, size=len(data))  # fmt: skip
    request.app[EVENTS].emit(
        "image.received", remote, user_id=user_id, path=str(path), format=info.format
    )
    return json_response({"status": "OK"})


async def _read_capped(part: BodyPartReader, limit: int, progress_timeout: float) -> bytes:
    data = bytearray()
    while True:
        try:
            async with asyncio.timeout(progress_timeout):
                chunk = await part.read_chunk(CHUNK)
        except TimeoutError:
            raise RequestTimeout(detail=f"no data for {progress_timeout:g}s") from None
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(detail=f"profile images are limited to {limit} bytes")
    return bytes(data)


async def send_file(request: web.Request) -> web.Response:
    """Keep a local application's file and queue it for the peer (202)."""
    remote = linked_remote(request)
    query = request.query
    answer = await request.app[FILE_SENDER].accept(
        remote,
        request.content.iter_any(),
        filename=query.get("filename", ""),
        content_length=request.content_length,
        channel_id=query.get("channel_id", ""),
        user_id=query.get("user_id", ""),
        file_id=query.get("file_id", ""),
    )
    return json_response(answer, status=202)


async def file_status(request: web.Request) -> web.Response:
    """The state of a file sent to a peer."""
    remote_id = path_id(request, "remote_id")
    status = await request.app[FILE_SENDER].status(remote_id, path_id(request, "file_id"))
    if status is None:
        raise NotFound("File not found.", error_id="api.remote_cluster.file_not_found")
    return json_response(status)


async def retry_file(request: web.Request) -> web.Response:
    """Queue a dead file again (202), from the start, behind what is queued now."""
    remote = linked_remote(request)
    answer = await request.app[FILE_SENDER].retry(remote, path_id(request, "file_id"))
    return json_response(answer, status=202)
