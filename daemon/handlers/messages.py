"""Messages: the peers' ``/msg`` endpoint and the local applications' outbox extension.

* ``POST /api/v4/remotecluster/msg`` (remote credentials): an inbound frame, routed by topic
  (:mod:`daemon.inbound`); 503 with ``Retry-After`` when the local application is down.
* ``POST /api/v4/remotecluster/{remote_id}/msg`` (operator): ``{"topic", "payload"}``, durably
  queued before the 202 ``{"id", "state": "queued"}``.
* ``GET /api/v4/remotecluster/{remote_id}/msg/{msg_id}`` (operator): the message's state.
* ``GET /api/v4/remotecluster/{remote_id}/msg?state=dead&limit=100`` (operator): recent
  messages, newest first.
* ``POST /api/v4/remotecluster/{remote_id}/msg/{msg_id}/retry`` (operator): queue a dead
  message again.
"""

from __future__ import annotations

import msgspec
import structlog
from aiohttp import web

from daemon.errors import BadRequest, ServiceUnavailable
from daemon.handlers.common import int_param, json_response, linked_remote, path_id, read_json
from daemon.handlers.transport import read_frame
from daemon.inbound import RESERVED_TOPICS, LocalUnavailable
from daemon.keys import INBOUND, OUTBOX, REMOTE, SETTINGS

log = structlog.get_logger(__name__)

TOPIC_MAX_LENGTH = 128


class SendRequest(msgspec.Struct):
    """Body of ``POST /api/v4/remotecluster/{remote_id}/msg``."""

    topic: str = ""
    payload: msgspec.Raw = msgspec.Raw()


async def receive(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/msg``: answer a peer's message (Mattermost's Response)."""
    frame = await read_frame(request)
    remote = request[REMOTE]
    try:
        answer = await request.app[INBOUND].receive(remote, frame.msg)
    except LocalUnavailable as exc:
        retry_after = request.app[SETTINGS].config.inbox.retry_after
        log.warning(
            "msg.local_unavailable",
            remote_id=remote.remote_id,
            msg_id=frame.msg.id,
            topic=frame.msg.topic,
            reason=str(exc),
        )
        raise ServiceUnavailable(
            "The local application cannot take the message now; retry later.",
            error_id="api.remote_cluster.local_unavailable.app_error",
            headers={"Retry-After": str(max(1, round(retry_after)))},
        ) from None
    return json_response(answer)


async def send(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/{remote_id}/msg``: queue a message for the peer (202)."""
    remote = linked_remote(request)
    body = await read_json(request, SendRequest)
    topic = body.topic.strip()
    if not topic or len(topic) > TOPIC_MAX_LENGTH or topic in RESERVED_TOPICS:
        raise BadRequest(
            f"Invalid topic: 1-{TOPIC_MAX_LENGTH} characters, not 'ping' or 'invitation'.",
            error_id="api.remote_cluster.invalid_topic.app_error",
        )
    if len(body.payload) == 0:
        raise BadRequest("Invalid or missing payload in request body.")
    msg_id = await request.app[OUTBOX].enqueue(remote, topic, bytes(body.payload))
    return json_response({"id": msg_id, "state": "queued"}, status=202)


async def status(request: web.Request) -> web.Response:
    """``GET /api/v4/remotecluster/{remote_id}/msg/{msg_id}``."""
    remote_id = path_id(request, "remote_id")
    doc = await request.app[OUTBOX].status(remote_id, path_id(request, "msg_id"))
    return json_response(doc)


STATES = frozenset({"", "queued", "delivered", "rejected", "dead"})


async def list_messages(request: web.Request) -> web.Response:
    """``GET /api/v4/remotecluster/{remote_id}/msg``: recent messages, newest first."""
    remote = linked_remote(request)
    state = request.query.get("state", "")
    if state not in STATES:
        raise BadRequest("Invalid state parameter.", detail="queued, delivered, rejected or dead")
    limit = min(int_param(request.query, "limit", 100), 1000)
    return json_response(await request.app[OUTBOX].recent(remote.remote_id, state, limit))


async def retry(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/{remote_id}/msg/{msg_id}/retry``."""
    remote = linked_remote(request)
    answer = await request.app[OUTBOX].retry(remote, path_id(request, "msg_id"))
    return json_response(answer, status=202)
