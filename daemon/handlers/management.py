"""The operator's management API: the seed's operations on remote clusters, and channel sharing.

Where the seed is silent these follow Mattermost; where they differ from Mattermost (DELETE
answers 204; ``only_confirmed`` leaves out pending invites; bad input is 400, never 500) the
seed and the README say so.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from daemon.errors import BadRequest, NotFound
from daemon.handlers.common import bool_param, int_param, json_response, path_id, read_json
from daemon.keys import LINKS, OPERATOR, REMOTES, SETTINGS
from daemon.models import check_id
from daemon.remotes import ListFilter

PER_PAGE_DEFAULT = 60
PER_PAGE_MAXIMUM = 200


class CreateRequest(msgspec.Struct):
    """Body of ``POST /api/v4/remotecluster``."""

    name: str = ""
    display_name: str = ""
    default_team_id: str = ""
    password: str = ""


class AcceptRequest(msgspec.Struct):
    """Body of ``POST /api/v4/remotecluster/accept_invite``."""

    name: str = ""
    display_name: str = ""
    default_team_id: str = ""
    invite: str = ""
    password: str = ""


class PatchRequest(msgspec.Struct):
    """Body of ``PATCH /api/v4/remotecluster/{remote_id}``; absent or null means unchanged."""

    display_name: str | None = None
    default_team_id: str | None = None


class PasswordRequest(msgspec.Struct):
    """Body of ``POST /api/v4/remotecluster/{remote_id}/generate_invite``."""

    password: str = ""


async def list_remotes(request: web.Request) -> web.Response:
    """``GET /api/v4/remotecluster``: filtered, ordered by display name then name, paged."""
    query = request.query
    remotes = request.app[REMOTES]
    page = int_param(query, "page", 0)
    per_page = min(int_param(query, "per_page", PER_PAGE_DEFAULT), PER_PAGE_MAXIMUM)
    in_channel = query.get("in_channel", "")
    not_in_channel = query.get("not_in_channel", "")
    topic = query.get("topic", "")
    if topic and topic.strip() in ("", "*"):
        raise BadRequest("Invalid topic parameter.", detail="topic must name one topic")
    flt = ListFilter(
        exclude_offline=bool_param(query, "exclude_offline"),
        in_channel_ids=await remotes.remotes_in_channel(check_id(in_channel, "in_channel"))
        if in_channel
        else None,
        not_in_channel_ids=await remotes.remotes_in_channel(
            check_id(not_in_channel, "not_in_channel")
        )
        if not_in_channel
        else None,
        topic=topic.strip(),
        creator_id=check_id(query.get("creator_id", ""), "creator_id", required=False),
        only_confirmed=bool_param(query, "only_confirmed"),
        plugin_id=query.get("plugin_id", ""),
        only_plugins=bool_param(query, "only_plugins"),
        exclude_plugins=bool_param(query, "exclude_plugins"),
        include_deleted=bool_param(query, "include_deleted"),
    )
    found = remotes.query(flt, offline_after_ms=request.app[SETTINGS].offline_after_ms)
    start = page * per_page
    return json_response([rc.to_api() for rc in found[start : start + per_page]])


async def create_remote(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster``: a pending remote and its invite (201)."""
    body = await read_json(request, CreateRequest)
    remote, invite, generated = await request.app[LINKS].create(
        name=body.name,
        display_name=body.display_name,
        default_team_id=body.default_team_id,
        password=body.password,
        creator_id=request[OPERATOR].creator_id,
    )
    answer: dict[str, object] = {"remote_cluster": remote.to_api(), "invite": invite}
    if generated is not None:
        answer["password"] = generated
    return json_response(answer, status=201)


async def get_remote(request: web.Request) -> web.Response:
    """``GET /api/v4/remotecluster/{remote_id}``: deleted remotes too."""
    remote = request.app[LINKS].get(path_id(request, "remote_id"))
    return json_response(remote.to_api())


async def patch_remote(request: web.Request) -> web.Response:
    """``PATCH /api/v4/remotecluster/{remote_id}``: display name and default team."""
    remote_id = path_id(request, "remote_id")
    body = await read_json(request, PatchRequest)
    remote = await request.app[LINKS].patch(
        remote_id, display_name=body.display_name, default_team_id=body.default_team_id
    )
    return json_response(remote.to_api())


async def delete_remote(request: web.Request) -> web.Response:
    """``DELETE /api/v4/remotecluster/{remote_id}``: soft delete, 204 as the seed says."""
    await request.app[LINKS].delete(path_id(request, "remote_id"))
    return web.Response(status=204)


async def generate_invite(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/{remote_id}/generate_invite``: 201 with a JSON string."""
    remote_id = path_id(request, "remote_id")
    body = await read_json(request, PasswordRequest)
    invite = await request.app[LINKS].generate_invite(remote_id, body.password)
    return json_response(invite, status=201)


async def accept_invite(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/accept_invite``: link with the inviter (201)."""
    body = await read_json(request, AcceptRequest)
    remote = await request.app[LINKS].accept(
        name=body.name,
        display_name=body.display_name,
        default_team_id=body.default_team_id,
        invite_code=body.invite,
        password=body.password,
        creator_id=request[OPERATOR].creator_id,
    )
    return json_response(remote.to_api(), status=201)


def _linked_remote_id(request: web.Request) -> str:
    remote_id = path_id(request, "remote_id")
    remote = request.app[REMOTES].get(remote_id)
    if remote is None or remote.is_deleted:
        raise NotFound("Secure connection not found.", error_id="api.remote_cluster.get.not_found")
    return remote_id


async def share_channel(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/{remote_id}/channels/{channel_id}/invite``."""
    remote_id = _linked_remote_id(request)
    await request.app[REMOTES].share_channel(remote_id, path_id(request, "channel_id"))
    return json_response({"status": "OK"})


async def unshare_channel(request: web.Request) -> web.Response:
    """``POST /api/v4/remotecluster/{remote_id}/channels/{channel_id}/uninvite``."""
    remote_id = _linked_remote_id(request)
    if not await request.app[REMOTES].unshare_channel(remote_id, path_id(request, "channel_id")):
        raise NotFound("The channel is not shared with this secure connection.")
    return json_response({"status": "OK"})


async def list_shared_channels(request: web.Request) -> web.Response:
    """``GET /api/v4/remotecluster/{remote_id}/sharedchannelremotes``."""
    remote_id = _linked_remote_id(request)
    return json_response(await request.app[REMOTES].shared_channels(remote_id))
