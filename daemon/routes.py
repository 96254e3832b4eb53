"""The route table: every route with its handler, its name and who may call it.

Transport routes come first so that ``/api/v4/remotecluster/ping`` is never read as a
``{remote_id}``. Every route has a policy; :func:`daemon.auth.auth_middleware` enforces it.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import AbstractRoute

from daemon.auth import INVITED_REMOTE, LINKED_REMOTE, MANAGE, METRICS_READER, PUBLIC, READ, Policy
from daemon.handlers import files, health, management, messages, transport
from daemon.keys import POLICIES

API = "/api/v4/remotecluster"

ROUTES: tuple[tuple[str, str, Handler, Policy, str], ...] = (
    ("GET", "/healthz", health.healthz, PUBLIC, "healthz"),
    ("GET", "/metrics", health.metrics, METRICS_READER, "metrics"),
    # Transport (peers).
    ("POST", f"{API}/ping", transport.ping, LINKED_REMOTE, "transport.ping"),
    (
        "POST",
        f"{API}/confirm_invite",
        transport.confirm_invite,
        INVITED_REMOTE,
        "transport.confirm",
    ),
    ("POST", f"{API}/msg", messages.receive, LINKED_REMOTE, "transport.msg"),
    ("POST", f"{API}/upload/{{upload_id}}", files.upload, LINKED_REMOTE, "transport.upload"),
    (
        "HEAD",
        f"{API}/upload/{{upload_id}}",
        files.upload_offset,
        LINKED_REMOTE,
        "transport.upload_offset",
    ),
    ("POST", f"{API}/{{user_id}}/image", files.profile_image, LINKED_REMOTE, "transport.image"),
    # Management (operators).
    ("GET", API, management.list_remotes, READ, "remotes.list"),
    ("POST", API, management.create_remote, MANAGE, "remotes.create"),
    ("POST", f"{API}/accept_invite", management.accept_invite, MANAGE, "remotes.accept_invite"),
    ("GET", f"{API}/{{remote_id}}", management.get_remote, READ, "remotes.get"),
    ("PATCH", f"{API}/{{remote_id}}", management.patch_remote, MANAGE, "remotes.patch"),
    ("DELETE", f"{API}/{{remote_id}}", management.delete_remote, MANAGE, "remotes.delete"),
    (
        "POST",
        f"{API}/{{remote_id}}/generate_invite",
        management.generate_invite,
        MANAGE,
        "remotes.invite",
    ),
    # Extension: messages for peers, through the outbox.
    ("POST", f"{API}/{{remote_id}}/msg", messages.send, MANAGE, "outbox.send"),
    ("GET", f"{API}/{{remote_id}}/msg", messages.list_messages, MANAGE, "outbox.list"),
    ("GET", f"{API}/{{remote_id}}/msg/{{msg_id}}", messages.status, MANAGE, "outbox.status"),
    ("POST", f"{API}/{{remote_id}}/msg/{{msg_id}}/retry", messages.retry, MANAGE, "outbox.retry"),
    # Extension: files for peers.
    ("POST", f"{API}/{{remote_id}}/files", files.send_file, MANAGE, "files.send"),
    ("GET", f"{API}/{{remote_id}}/files/{{file_id}}", files.file_status, MANAGE, "files.status"),
    (
        "POST",
        f"{API}/{{remote_id}}/files/{{file_id}}/retry",
        files.retry_file,
        MANAGE,
        "files.retry",
    ),
    # Extension: which channels are shared with which remote (Mattermost's paths).
    (
        "POST",
        f"{API}/{{remote_id}}/channels/{{channel_id}}/invite",
        management.share_channel,
        MANAGE,
        "channels.share",
    ),
    (
        "POST",
        f"{API}/{{remote_id}}/channels/{{channel_id}}/uninvite",
        management.unshare_channel,
        MANAGE,
        "channels.unshare",
    ),
    (
        "GET",
        f"{API}/{{remote_id}}/sharedchannelremotes",
        management.list_shared_channels,
        READ,
        "channels.list",
    ),
)


def setup_routes(app: web.Application) -> None:
    """Register every route and record its policy under :data:`daemon.keys.POLICIES`."""
    policies: dict[AbstractRoute, Policy] = {}
    for method, path, handler, policy, name in ROUTES:
        policies[app.router.add_route(method, path, handler, name=name)] = policy
    app[POLICIES] = policies
