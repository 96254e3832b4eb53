"""Wire models: Mattermost's JSON shapes, the daemon's record of a remote, and their checks.

Field names, order and types follow Mattermost's Go models (``model.RemoteCluster``,
``RemoteClusterFrame``, ``RemoteClusterMsg``, ``RemoteClusterPing``, ``remotecluster.Response``,
``RemoteClusterInvite``). Like Go's ``encoding/json``, decoding ignores unknown fields and fills
missing ones with zero values; the explicit checks (:func:`check_frame`, :func:`check_name`, ...)
then answer 400 with Mattermost's error ids.

A frame's ``payload`` is a :class:`msgspec.Raw`: the exact JSON bytes received, never re-encoded
(Go's ``json.RawMessage``).
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from daemon.errors import BadRequest
from daemon.ids import is_valid_id

# Topics with a meaning in the protocol itself.
PING_TOPIC = "ping"
INVITATION_TOPIC = "invitation"
UPLOAD_TOPIC = "sharedchannel_upload"

SITE_URL_PENDING = "pending_"
SITE_URL_PLUGIN = "plugin_"
NAME_MAX_LENGTH = 64
DISPLAY_NAME_MAX_LENGTH = 64
_NAME_RE = re.compile(r"[a-zA-Z0-9.\-_]{1,64}")

T = TypeVar("T")


def parse_decimal(text: str) -> int | None:
    """``text`` as a non-negative decimal integer, or ``None``.

    ASCII digits only: ``str.isdigit`` also accepts digits such as ``"²"`` that ``int``
    refuses, which would turn a bad header or query parameter into a 500.
    """
    return int(text) if text.isascii() and text.isdigit() else None


def now_ms() -> int:
    """Return the wall clock in epoch milliseconds (Mattermost's ``GetMillis``)."""
    return time.time_ns() // 1_000_000


class RemoteCluster(msgspec.Struct, kw_only=True):
    """The API shape of a remote cluster; no field is ever omitted."""

    remote_id: str
    remote_team_id: str = ""
    name: str
    display_name: str
    site_url: str
    default_team_id: str = ""
    create_at: int
    delete_at: int = 0
    last_ping_at: int = 0
    last_global_user_sync_at: int = 0
    token: str = ""
    remote_token: str = ""
    topics: str = ""
    creator_id: str
    plugin_id: str = ""
    options: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Remote:
    """The daemon's record of a remote cluster (one row of ``remote_clusters``).

    ``token_sha256`` is the digest of the token this daemon issued to the peer (what the peer
    presents); ``remote_token`` is the token the peer issued to us (what we present).
    ``accepting`` is true while this daemon's confirmation of an accepted invite is in flight;
    ``online_announced`` is the liveness last announced (logged and sent as an event).
    """

    remote_id: str
    name: str
    display_name: str
    site_url: str
    default_team_id: str
    create_at: int
    creator_id: str
    token_sha256: str = field(repr=False)
    remote_token: str = field(default="", repr=False)
    delete_at: int = 0
    last_ping_at: int = 0
    last_global_user_sync_at: int = 0
    topics: str = ""
    plugin_id: str = ""
    options: int = 0
    remote_team_id: str = ""
    accepting: bool = False
    online_announced: bool = False

    @property
    def is_deleted(self) -> bool:
        """Soft-deleted remotes keep their row but no longer authenticate."""
        return self.delete_at != 0

    @property
    def is_pending(self) -> bool:
        """An invite was created for this remote and has not been confirmed yet."""
        return self.site_url.startswith(SITE_URL_PENDING)

    @property
    def is_plugin(self) -> bool:
        """Plugin remotes (never created by this daemon) are delivered without HTTP."""
        return bool(self.plugin_id) or self.site_url.startswith(SITE_URL_PLUGIN)

    @property
    def is_confirmed(self) -> bool:
        """Mattermost's ``IsConfirmed``: a real site URL, or a plugin remote."""
        return self.is_plugin or (self.site_url != "" and not self.is_pending)

    def is_online(self, now: int, offline_after_ms: int) -> bool:
        """Online while the last successful outbound ping is younger than the threshold."""
        return self.last_ping_at > now - offline_after_ms

    def to_api(self) -> RemoteCluster:
        """The sanitized API shape: ``token`` and ``remote_token`` are always empty."""
        return RemoteCluster(
            remote_id=self.remote_id,
            remote_team_id=self.remote_team_id,
            name=self.name,
            display_name=self.display_name,
            site_url=self.site_url,
            default_team_id=self.default_team_id,
            create_at=self.create_at,
            delete_at=self.delete_at,
            last_ping_at=self.last_ping_at,
            last_global_user_sync_at=self.last_global_user_sync_at,
            topics=self.topics,
            creator_id=self.creator_id,
            plugin_id=self.plugin_id,
            options=self.options,
        )


class Msg(msgspec.Struct):
    """``RemoteClusterMsg``: one message; ``payload`` is embedded raw JSON."""

    id: str = ""
    topic: str = ""
    create_at: int = 0
    payload: msgspec.Raw = msgspec.Raw()


class Frame(msgspec.Struct):
    """``RemoteClusterFrame``: what travels to ``/ping``, ``/msg`` and ``/confirm_invite``."""

    remote_id: str = ""
    msg: Msg = msgspec.field(default_factory=Msg)


class Ping(msgspec.Struct):
    """``RemoteClusterPing``: the ping payload, and the bare answer to a ping."""

    sent_at: int = 0
    recv_at: int = 0


class PeerResponse(msgspec.Struct):
    """``remotecluster.Response``: the answer to ``/msg`` and ``/confirm_invite``."""

    status: str = ""
    err: str = ""
    payload: msgspec.Raw = msgspec.Raw(b"null")


class InvitePayload(msgspec.Struct):
    """``RemoteClusterInvite``: the plaintext of an invite and the confirm frame's payload."""

    remote_id: str = ""
    remote_team_id: str = ""
    site_url: str = ""
    token: str = ""
    refreshed_token: str = ""
    version: int = 0

    def to_json(self) -> bytes:
        """Encode as Go does: ``refreshed_token`` and ``version`` omitted when empty."""
        doc: dict[str, Any] = {
            "remote_id": self.remote_id,
            "remote_team_id": self.remote_team_id,
            "site_url": self.site_url,
            "token": self.token,
        }
        if self.refreshed_token:
            doc["refreshed_token"] = self.refreshed_token
        if self.version:
            doc["version"] = self.version
        return msgspec.json.encode(doc)


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode_json(body: bytes, model: type[T], *, param: str = "body") -> T:
    """Decode a JSON body into ``model`` or raise 400 naming what is wrong.

    msgspec's messages name the field and the expected type, never the value, so they are safe
    to return to the caller.
    """
    decoder = _decoders.get(model)
    if decoder is None:
        decoder = _decoders[model] = msgspec.json.Decoder(model)
    try:
        return decoder.decode(body)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(
            f"Invalid or missing {param} in request body.",
            error_id="api.context.invalid_body_param.app_error",
            detail=str(exc),
        ) from None


def check_frame(frame: Frame, header_remote_id: str) -> None:
    """Mattermost's ``RemoteClusterFrame.IsValid`` and the header check of its handlers."""
    if not is_valid_id(frame.remote_id) or not is_valid_id(frame.msg.id):
        raise BadRequest("Invalid id.", error_id="api.remote_cluster.invalid_id.app_error")
    if not frame.msg.topic:
        raise BadRequest("Invalid topic.", error_id="api.remote_cluster.invalid_topic.app_error")
    if len(frame.msg.payload) == 0:
        raise BadRequest(
            "Invalid or missing PayLoad in request body.",
            error_id="api.context.invalid_body_param.app_error",
        )
    if frame.remote_id != header_remote_id:
        raise BadRequest(
            "Unable to find secure connection ID.",
            error_id="api.context.remote_id_invalid.app_error",
        )


def sanitize_unicode(text: str) -> str:
    """Drop control and format characters (bidi overrides, zero-width marks), as Mattermost does."""
    return "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf", "Co", "Cs"))


def check_name(name: str) -> str:
    """Validate and normalise a remote's name: 1-64 of ``[a-zA-Z0-9.-_]``, lowercased."""
    name = sanitize_unicode(name)
    if not _NAME_RE.fullmatch(name):
        raise BadRequest(
            "Name must be 1-64 characters of letters, digits, '.', '-' and '_'.",
            error_id="api.remote_cluster.invalid_name.app_error",
        )
    return name.lower()


def check_display_name(display_name: str, default: str) -> str:
    """Validate a display name; an empty one becomes ``default`` (the name)."""
    display_name = sanitize_unicode(display_name).strip()
    if len(display_name) > DISPLAY_NAME_MAX_LENGTH:
        raise BadRequest(
            f"Display name must be at most {DISPLAY_NAME_MAX_LENGTH} characters.",
            error_id="api.remote_cluster.invalid_display_name.app_error",
        )
    return display_name or default


def check_id(value: str, param: str, *, required: bool = True) -> str:
    """Validate a 26-character id parameter (empty allowed when not ``required``)."""
    if (value or required) and not is_valid_id(value):
        raise BadRequest(
            f"Invalid or missing {param} parameter.",
            error_id="api.context.invalid_param.app_error",
            detail=f"{param} must be a 26-character id",
        )
    return value
