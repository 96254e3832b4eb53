"""The life of a link: create, invite, accept, confirm, patch and delete a remote cluster.

The handshake follows Mattermost (protocol §3), with A the inviter and B the accepter:

1. A creates a pending remote (``site_url = "pending_<id>"``) holding invite token T1 and
   hands the operator an encrypted invite ``{remote_id X, site_url A, token T1, version 3}``.
2. B decrypts it, stores remote X with a fresh token T2 (what A will present to B) and a fresh
   refreshed token T3 (what B will present to A), then POSTs the confirm frame to A's
   ``/confirm_invite`` authenticated with T1.
3. A checks the frame and rotates: it now expects T3 and presents T2. T1 is dead.

Where this differs from Mattermost, on purpose:

* Issued tokens are stored as SHA-256 digests only, so ``generate_invite`` cannot re-encrypt
  the old T1: it issues a new invite token, and earlier invites of that remote stop working.
* A confirmation must carry a ``refreshed_token`` (protocol v2+). Mattermost would replace the
  token with a random one the accepter never learns; refusing is clearer. Every server that can
  decrypt a version-3 invite sends one.
* The confirmation's payload ``remote_id`` must equal the frame's and the header's (MM-69883),
  and its ``site_url`` must be an http(s) URL.
* When B's confirm call fails, B deletes the new row outright (Mattermost soft-deletes it and
  so blocks a retry of the same invite); a row left by a crash mid-confirm is removed at start.
"""

from __future__ import annotations

import contextlib

import msgspec
import structlog

from daemon import invites
from daemon.config import check_http_url
from daemon.errors import (
    BadGateway,
    BadRequest,
    Conflict,
    InviteError,
    NotFound,
    PeerError,
)
from daemon.ids import hash_token, is_valid_id, new_id, new_password, token_matches
from daemon.models import (
    INVITATION_TOPIC,
    SITE_URL_PENDING,
    Frame,
    InvitePayload,
    Msg,
    PeerResponse,
    Remote,
    check_display_name,
    check_id,
    check_name,
    decode_json,
    now_ms,
)
from daemon.peers import CONFIRM_INVITE_PATH, PeerClient
from daemon.remotes import AlreadyExists, Remotes
from daemon.settings import Settings
from daemon.tasks import Unstoppable

log = structlog.get_logger(__name__)


class LinkService:
    """Creates, links and removes remote clusters."""

    def __init__(self, settings: Settings, remotes: Remotes, peers: PeerClient) -> None:
        self._settings = settings
        self._remotes = remotes
        self._peers = peers
        self._finishing = Unstoppable()

    async def stop(self) -> None:
        """Wait for accepts whose confirmation is still under way."""
        await self._finishing.wait()

    def _existing(self, remote_id: str) -> Remote:
        remote = self._remotes.get(remote_id)
        if remote is None or remote.is_deleted:
            raise _not_found()
        return remote

    def _check_password(self, password: str) -> None:
        minimum = self._settings.config.invites.min_password_length
        if len(password) < minimum:
            raise BadRequest(
                f"The invite password must be at least {minimum} characters.",
                error_id="api.remote_cluster.invalid_password.app_error",
            )

    async def _encrypt_invite(self, remote_id: str, token: str, password: str) -> str:
        payload = InvitePayload(
            remote_id=remote_id,
            site_url=self._settings.config.server.site_url,
            token=token,
            version=invites.INVITE_VERSION,
        )
        return await invites.encrypt_async(payload, password)

    async def create(
        self, *, name: str, display_name: str, default_team_id: str, password: str, creator_id: str
    ) -> tuple[Remote, str, str | None]:
        """Create a pending remote; return it, its invite and the password if one was made."""
        name = check_name(name)
        display_name = check_display_name(display_name, name)
        check_id(default_team_id, "default_team_id")
        generated = None
        if password:
            self._check_password(password)
        else:
            password = generated = new_password()
        token = new_id()
        remote = Remote(
            remote_id=new_id(),
            name=name,
            display_name=display_name,
            site_url=SITE_URL_PENDING + new_id(),
            default_team_id=default_team_id,
            create_at=now_ms(),
            creator_id=creator_id,
            token_sha256=hash_token(token),
        )
        invite = await self._encrypt_invite(remote.remote_id, token, password)
        await self._remotes.add(remote)
        log.info("remote.created", remote_id=remote.remote_id, remote_name=remote.name)
        return remote, invite, generated

    async def generate_invite(self, remote_id: str, password: str) -> str:
        """Issue a new invite for a pending remote (earlier invites stop working)."""
        remote = self._existing(remote_id)
        if not password:
            raise BadRequest("Invalid or missing password in request body.")
        if remote.is_confirmed:
            raise _already_confirmed("api.remote_cluster.generate_invite_cluster_is_confirmed")
        self._check_password(password)
        token = new_id()
        invite = await self._encrypt_invite(remote_id, token, password)
        if not await self._remotes.reissue_invite_token(remote_id, hash_token(token)):
            raise _already_confirmed("api.remote_cluster.generate_invite_cluster_is_confirmed")
        log.info("remote.invite_generated", remote_id=remote_id, remote_name=remote.name)
        return invite

    async def accept(
        self,
        *,
        name: str,
        display_name: str,
        default_team_id: str,
        invite_code: str,
        password: str,
        creator_id: str,
    ) -> Remote:
        """Accept an invite: store the remote, confirm it with the inviter, and return it."""
        name = check_name(name)
        display_name = check_display_name(display_name, name)
        check_id(default_team_id, "default_team_id")
        if not invite_code or not password:
            raise BadRequest("Invalid or missing invite or password in request body.")
        invite = await self._decrypt(invite_code, password)
        site_url = invite.site_url.rstrip("/")
        if existing := self._remotes.get(invite.remote_id):
            raise Conflict(
                "This invite was already accepted"
                + (" (the secure connection was deleted since)." if existing.is_deleted else "."),
                error_id="api.remote_cluster.invite_already_accepted.app_error",
            )
        our_token, refreshed = new_id(), new_id()
        legacy = invite.version < 2
        remote = Remote(
            remote_id=invite.remote_id,
            name=name,
            display_name=display_name,
            site_url=site_url,
            default_team_id=default_team_id,
            create_at=now_ms(),
            creator_id=creator_id,
            token_sha256=hash_token(our_token),
            # A legacy (v1) inviter keeps its invite token; v2+ rotates to our refreshed one.
            remote_token=invite.token if legacy else refreshed,
            accepting=True,
        )
        try:
            await self._remotes.add(remote)
        except AlreadyExists:
            raise Conflict(
                "This invite was already accepted.",
                error_id="api.remote_cluster.invite_already_accepted.app_error",
            ) from None
        confirm = InvitePayload(
            remote_id=invite.remote_id,
            site_url=self._settings.config.server.site_url,
            token=our_token,
            refreshed_token="" if legacy else refreshed,
            version=invites.INVITE_VERSION,
        )
        # Once the confirm frame is out, the inviter may rotate its tokens at any moment: the
        # rest must run to its end even if the operator's request is cancelled meanwhile, or
        # this side would drop a link the other side keeps.
        return await self._finishing.run(
            self._confirm(invite.remote_id, name, site_url, invite.token, confirm)
        )

    async def _decrypt(self, invite_code: str, password: str) -> InvitePayload:
        try:
            invite = await invites.decrypt_async(invite_code, password)
        except InviteError as exc:
            base64_error = "base64" in str(exc) or "too short" in str(exc)
            raise BadRequest(
                "Could not decode the invite."
                if base64_error
                else "Could not decrypt the invite using the provided password.",
                error_id="api.remote_cluster.base64_decode_error"
                if base64_error
                else "api.remote_cluster.invite_decrypt_error",
                detail=str(exc),
            ) from None
        if (
            not is_valid_id(invite.remote_id)
            or not invite.token
            or len(invite.token) > 64
            or check_http_url(invite.site_url)
        ):
            raise BadRequest(
                "The invite does not name a valid secure connection.",
                error_id="api.remote_cluster.invalid_invite.app_error",
            )
        return invite

    async def _confirm(
        self, remote_id: str, name: str, site_url: str, invite_token: str, confirm: InvitePayload
    ) -> Remote:
        """Send the confirm frame; finish the accepted remote, or remove it when that fails."""
        try:
            await self._send_confirm(site_url, remote_id, invite_token, confirm)
        except BaseException as exc:
            # Leave nothing half-made: the operator may retry the same invite at once.
            with contextlib.suppress(Exception):
                await self._remotes.remove(remote_id)
            if isinstance(exc, PeerError):
                log.warning(
                    "remote.accept_failed",
                    remote_id=remote_id,
                    remote_name=name,
                    site_url=site_url,
                    reason=exc.reason,
                    detail=exc.detail,
                )
                raise BadGateway(
                    "The inviting server did not confirm the invite.",
                    error_id="api.remote_cluster.accept_invitation_error",
                    detail=str(exc),
                ) from None
            raise
        linked = await self._remotes.finish_accept(remote_id)
        if linked is None:  # deleted by an operator while the confirmation was under way
            raise _not_found()
        _log_confirmed(linked, "accepter")
        return linked

    async def _send_confirm(
        self, site_url: str, remote_id: str, invite_token: str, confirm: InvitePayload
    ) -> None:
        frame = Frame(
            remote_id=remote_id,
            msg=Msg(
                id=new_id(),
                topic=INVITATION_TOPIC,
                create_at=now_ms(),
                payload=msgspec.Raw(confirm.to_json()),
            ),
        )
        reply = await self._peers.post(
            site_url,
            CONFIRM_INVITE_PATH,
            remote_id=remote_id,
            token=invite_token,
            body=msgspec.json.encode(frame),
            timeout=self._settings.config.invites.confirm_timeout,
        )
        if reply.status != 200:
            raise PeerError(
                f"http_{reply.status}", _peer_error_summary(reply.status, reply.body), reply.status
            )
        try:
            answer = msgspec.json.decode(reply.body, type=PeerResponse)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise PeerError("bad_response", "the answer is not a JSON status") from None
        if answer.status != "OK":
            raise PeerError("refused", f"status {answer.status!r}")

    async def receive_confirm(self, remote: Remote, frame: Frame) -> Remote:
        """Handle a confirm frame from the accepter of one of our invites (inviter side)."""
        if remote.is_confirmed:
            raise _already_confirmed()
        expire_after_ms = int(self._settings.config.invites.expire_after * 1000)
        if now_ms() - remote.create_at > expire_after_ms:
            raise BadRequest(
                "Invitation is expired.", error_id="api.context.invitation_expired.error"
            )
        payload = decode_json(bytes(frame.msg.payload), InvitePayload, param="msg.payload")
        if payload.remote_id != frame.remote_id:
            raise BadRequest(
                "The confirmation names another secure connection.",
                error_id="api.context.remote_id_invalid.app_error",
            )
        if why := check_http_url(payload.site_url):
            raise BadRequest(f"Invalid site_url in the confirmation: {why}.")
        if not is_valid_id(payload.token):
            raise BadRequest("Invalid token in the confirmation.")
        if payload.version < 2 or not is_valid_id(payload.refreshed_token):
            raise BadRequest(
                "The confirmation must carry a refreshed_token (protocol version 2 or later)."
            )
        if token_matches(payload.refreshed_token, remote.token_sha256):
            raise BadRequest("RefreshedToken must be different from the original invite token.")
        confirmed = await self._remotes.confirm(
            remote.remote_id,
            expected_token_sha256=remote.token_sha256,
            site_url=payload.site_url.rstrip("/"),
            remote_token=payload.token,
            token_sha256=hash_token(payload.refreshed_token),
        )
        if confirmed is None:
            raise _already_confirmed()
        _log_confirmed(confirmed, "inviter")
        return confirmed

    async def patch(
        self, remote_id: str, *, display_name: str | None, default_team_id: str | None
    ) -> Remote:
        """Change a remote's display name and/or default team."""
        remote = self._existing(remote_id)
        changes: dict[str, object] = {}
        if display_name is not None:
            changes["display_name"] = check_display_name(display_name, remote.name)
        if default_team_id is not None:
            changes["default_team_id"] = check_id(
                default_team_id, "default_team_id", required=False
            )
        if not changes:
            return remote
        updated = await self._remotes.update(remote_id, **changes)
        if updated is None:  # deleted while this request waited for the store
            raise _not_found()
        log.info(
            "remote.updated", remote_id=remote_id, remote_name=remote.name, fields=sorted(changes)
        )
        return updated

    async def delete(self, remote_id: str) -> Remote:
        """Soft-delete a remote: its credentials stop working at once."""
        remote = self._existing(remote_id)
        deleted = await self._remotes.soft_delete(remote_id)
        if deleted is None:
            raise _not_found()
        log.info("remote.deleted", remote_id=remote_id, remote_name=remote.name)
        return deleted

    def get(self, remote_id: str) -> Remote:
        """Return a remote, deleted ones included, or raise 404."""
        remote = self._remotes.get(remote_id)
        if remote is None:
            raise _not_found()
        return remote


def _not_found() -> NotFound:
    return NotFound("Secure connection not found.", error_id="api.remote_cluster.get.not_found")


def _already_confirmed(
    error_id: str = "api.remote_cluster.already_confirmed.app_error",
) -> BadRequest:
    return BadRequest("The secure connection is already confirmed.", error_id=error_id)


def _log_confirmed(remote: Remote, role: str) -> None:
    log.info(
        "remote.confirmed",
        remote_id=remote.remote_id,
        remote_name=remote.name,
        site_url=remote.site_url,
        role=role,
    )


def _peer_error_summary(status: int, body: bytes) -> str:
    """Describe a peer's refusal by status and error id only.

    A Mattermost peer's message can echo the token it was sent, so the message is never
    repeated; the error id is, when it looks like one.
    """
    error_id = ""
    with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
        error_id = str(msgspec.json.decode(body, type=dict[str, object]).get("id", ""))
    if error_id and error_id.replace(".", "").replace("_", "").isalnum() and len(error_id) < 100:
        return f"HTTP {status} ({error_id})"
    return f"HTTP {status}"
