"""Sending one frame to a peer's ``/msg``, judging the answer, and the retry schedule.

Shared by the outbox (messages) and the file sender (the ``sharedchannel_upload`` message that
opens an upload session on the peer):

* a 200 with ``{"status":"OK"}`` is ``delivered``; any other status in the answer (``FAIL``) is
  ``rejected``, final, with the peer's ``err``;
* a transport error, a timeout, a 5xx, or a 401, 403, 408, 425 or 429 is :class:`Retry`
  (credentials or limits may change; the peer may come back), with the ``Retry-After`` the
  peer asked for, if any;
* any other 4xx is ``rejected``: the frame itself is refused, and sending it again cannot help.

:func:`backoff_delay` is the retry schedule: full-jitter exponential backoff, capped.
"""

from __future__ import annotations

import random

import msgspec

from daemon.errors import PeerError
from daemon.httplite import Reply
from daemon.models import Frame, Msg, PeerResponse, Remote, parse_decimal
from daemon.peers import MSG_PATH, PeerClient

RETRYABLE_4XX = frozenset({401, 403, 408, 425, 429})


class Retry(Exception):
    """A transient failure: try again after the backoff (at least ``retry_after`` seconds)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base·2^(attempt-1)))."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 60))
    return rng.uniform(0.0, ceiling)


def is_retryable(status: int) -> bool:
    """Whether an HTTP status from a peer is worth another attempt later."""
    return status >= 500 or status in RETRYABLE_4XX


def frame_bytes(remote_id: str, msg_id: str, topic: str, create_at: int, payload: bytes) -> bytes:
    """A Mattermost ``RemoteClusterFrame`` with ``payload`` (JSON bytes) embedded as is."""
    msg = Msg(id=msg_id, topic=topic, create_at=create_at, payload=msgspec.Raw(payload))
    return msgspec.json.encode(Frame(remote_id=remote_id, msg=msg))


def judge(reply: Reply) -> tuple[str, PeerResponse]:
    """Map a peer's answer to ``delivered`` or ``rejected``, or raise :class:`Retry`."""
    if reply.status == 200:
        try:
            answer = msgspec.json.decode(reply.body, type=PeerResponse)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise Retry("bad_response: the answer is not a Response") from None
        if answer.status == "OK":
            return "delivered", answer
        err = answer.err or f"status {answer.status!r}"
        return "rejected", PeerResponse(status=answer.status, err=err, payload=answer.payload)
    if is_retryable(reply.status):
        retry_after = parse_decimal(reply.headers.get("Retry-After", ""))
        raise Retry(f"http_{reply.status}", None if retry_after is None else float(retry_after))
    return "rejected", PeerResponse(
        status="FAIL", err=f"the peer refused the frame: HTTP {reply.status}"
    )


async def send_frame(
    peers: PeerClient, remote: Remote, frame: bytes, *, timeout: float
) -> tuple[str, PeerResponse]:
    """POST a frame to the peer's ``/msg`` and judge the answer (:class:`Retry` if transient)."""
    try:
        reply = await peers.post(
            remote.site_url,
            MSG_PATH,
            remote_id=remote.remote_id,
            token=remote.remote_token,
            body=frame,
            timeout=timeout,
        )
    except PeerError as exc:
        raise Retry(str(exc)) from None
    return judge(reply)
