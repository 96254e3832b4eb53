"""The daemon's one error hierarchy.

::

    DaemonError                      anything the daemon raises on purpose
    ├── ConfigError                  the configuration is invalid (exit 78)
    ├── StoreError                   the database cannot be used (newer schema, corrupt file)
    ├── InviteError                  an invite code cannot be decoded or decrypted
    ├── PeerError                    an outbound call to a peer failed
    └── AppError                     answered to an HTTP client as a JSON error body
        ├── BadRequest               400
        ├── Unauthorized             401
        ├── Forbidden                403
        ├── NotFound                 404
        ├── Conflict                 409
        ├── PayloadTooLarge          413
        ├── TooManyRequests          429
        ├── BadGateway               502  a peer refused or could not be reached
        ├── ServiceUnavailable       503  try again later (with Retry-After)
        └── InsufficientStorage      507

:class:`AppError` is turned into Mattermost's error body
``{"id","message","detailed_error","request_id","status_code"}`` in exactly one place, the
error middleware in :mod:`daemon.middleware`. Messages and details are written for the caller
and must never contain a token, password or invite code.
"""

from __future__ import annotations

from collections.abc import Mapping


class DaemonError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(DaemonError):
    """The configuration is invalid; the message names the key's path and why."""


class StoreError(DaemonError):
    """The database cannot be used: a schema newer than the code, or a corrupt file."""


class InviteError(DaemonError):
    """An invite code could not be decoded or decrypted."""


class PeerError(DaemonError):
    """An outbound call to a peer failed.

    ``reason`` is a short machine-readable cause (``timeout``, ``unreachable``, ``http_503``,
    ``bad_response``, ...); ``status`` is the peer's HTTP status when it answered.
    """

    def __init__(self, reason: str, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status


class AppError(DaemonError):
    """An error answered to an HTTP client as a Mattermost-shaped JSON body."""

    status = 500
    default_id = "api.server.internal_error"
    default_message = "An internal error occurred."

    def __init__(
        self,
        message: str | None = None,
        *,
        error_id: str | None = None,
        detail: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.error_id = error_id or self.default_id
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(self.message)


class BadRequest(AppError):
    """The request is malformed or invalid (400)."""

    status = 400
    default_id = "api.context.invalid_param.app_error"
    default_message = "Invalid or missing parameters in the request."


class Unauthorized(AppError):
    """No or invalid credentials (401)."""

    status = 401
    default_id = "api.context.session_expired.app_error"
    default_message = "Invalid or expired session, please login again."


class Forbidden(AppError):
    """Valid credentials without the needed permission (403)."""

    status = 403
    default_id = "api.context.permissions.app_error"
    default_message = "You do not have the appropriate permissions."


class NotFound(AppError):
    """The addressed resource does not exist (404)."""

    status = 404
    default_id = "api.context.not_found.app_error"
    default_message = "Not found."


class Conflict(AppError):
    """The request conflicts with the resource's current state (409)."""

    status = 409
    default_id = "api.context.conflict.app_error"
    default_message = "The request conflicts with the current state."


class RequestTimeout(AppError):
    """The client did not send its body in time (408)."""

    status = 408
    default_id = "api.context.request_timeout.app_error"
    default_message = "The request body did not arrive in time."


class PayloadTooLarge(AppError):
    """The body is larger than allowed (413)."""

    status = 413
    default_id = "api.context.request_body_too_large.app_error"
    default_message = "The request body is too large."


class TooManyRequests(AppError):
    """A queue or rate limit is full (429)."""

    status = 429
    default_id = "api.context.too_many_requests.app_error"
    default_message = "Too many requests; try again later."


class BadGateway(AppError):
    """A peer refused a call this request needed, or could not be reached (502)."""

    status = 502
    default_id = "api.remote_cluster.peer_error.app_error"
    default_message = "The remote cluster could not complete the request."


class ServiceUnavailable(AppError):
    """The daemon cannot serve this now; the caller should retry (503)."""

    status = 503
    default_id = "api.context.service_unavailable.app_error"
    default_message = "The service is unavailable; try again later."


class InsufficientStorage(AppError):
    """Not enough disk space to accept the request (507)."""

    status = 507
    default_id = "api.context.insufficient_storage.app_error"
    default_message = "Not enough storage to accept the request."
