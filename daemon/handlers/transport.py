"""The endpoints peers call, authenticated by remote-cluster credentials (see :mod:`daemon.auth`).

Frames are checked as Mattermost checks them (``RemoteClusterFrame.IsValid`` and the header's
remote id against the frame's), with 400 for a bad frame.
"""

from __future__ import annotations

from aiohttp import web

from daemon.handlers.common import json_response, read_json
from daemon.keys import LINKS, REMOTE
from daemon.models import Frame, Ping, check_frame, decode_json, now_ms


async def read_frame(request: web.Request) -> Frame:
    """Read and check a peer's frame (400 when it is not a valid frame from this remote)."""
    frame = await read_json(request, Frame, param="remoteClusterFrame")
    check_frame(frame, request[REMOTE].remote_id)
    return frame


async def ping(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/ping``: echo ``sent_at`` with our ``recv_at``.

    Answers the bare ping object (not a Response), as Mattermost does, and writes nothing.
    """
    frame = await read_frame(request)
    payload = decode_json(bytes(frame.msg.payload), Ping, param="msg.payload")
    return json_response(Ping(sent_at=payload.sent_at, recv_at=now_ms()))


async def confirm_invite(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/confirm_invite``: the accepter confirms our invite."""
    frame = await read_frame(request)
    await request.app[LINKS].receive_confirm(request[REMOTE], frame)
    return json_response({"status": "OK"})
