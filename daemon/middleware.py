"""The middlewares and the access log: request context and errors, then authentication.

:func:`request_context` binds a request id and answers errors; :func:`auth_middleware`
enforces the matched route's policy (see :mod:`daemon.auth`).

Every error a handler raises, ours (:class:`~daemon.errors.AppError`) or aiohttp's
(:class:`aiohttp.web.HTTPException`, e.g. 404, 405 or 413 from a body over the size cap), is
answered here, and only here, as Mattermost's JSON error body. Anything else is a bug: it is
logged with its traceback and answered 500 without details.
"""

from __future__ import annotations

import ipaddress
import logging
import time

import msgspec
import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from daemon import __version__
from daemon.auth import MetricsPolicy, OperatorPolicy, RemotePolicy, bearer_matches
from daemon.errors import AppError, BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized
from daemon.ids import RequestIds
from daemon.keys import (
    METRICS,
    OPERATOR,
    OPERATORS,
    POLICIES,
    REMOTE,
    REMOTES,
    REQUEST_ID,
    SETTINGS,
)
from daemon.peers import HEADER_REMOTE_ID, HEADER_REMOTE_TOKEN

log = structlog.get_logger(__name__)

_QUIET_PATHS = frozenset({"/healthz", "/metrics"})
_REQUEST_IDS = RequestIds()


def error_response(err: AppError, request_id: str) -> web.Response:
    """Render an :class:`AppError` as Mattermost's error body."""
    body = msgspec.json.encode(
        {
            "id": err.error_id,
            "message": err.message,
            "detailed_error": err.detail,
            "request_id": request_id,
            "status_code": err.status,
        }
    )
    return web.Response(
        status=err.status, body=body, content_type="application/json", headers=err.headers
    )


def _from_http_exception(exc: web.HTTPException) -> AppError:
    if exc.status == 413:
        return PayloadTooLarge(detail=exc.text or "")
    if exc.status == 404:
        return NotFound()
    err: AppError = BadRequest(exc.reason, error_id=f"api.http.{exc.status}")
    err.status = exc.status
    return err


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to the logs, and turn every error into a JSON error body."""
    request_id = _REQUEST_IDS.next()
    request[REQUEST_ID] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    try:
        response = await handler(request)
    except AppError as err:
        response = error_response(err, request_id)
        log.log(
            20 if err.status < 500 else 40,
            "http.refused",
            status=err.status,
            error_id=err.error_id,
            why=err.message,
            detail=err.detail or None,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http_exception(exc), request_id)
    except Exception:
        log.exception("http.unhandled_error", path=request.path)
        response = error_response(AppError(), request_id)
    response.headers["X-Request-ID"] = request_id
    response.headers["X-Version-ID"] = __version__
    route = request.match_info.route.name or "unmatched"
    metrics = request.app[METRICS]
    metrics.requests.labels(route, str(response.status)).inc()
    metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
    return response


def _unauthorized() -> Unauthorized:
    # One body for every remote-credential failure, so a caller learns nothing from it.
    return Unauthorized(
        "Invalid or missing secure connection credentials.",
        error_id="api.context.invalid_token.error",
    )


def _refused(request: web.Request, kind: str, reason: str, **fields: object) -> None:
    request.app[METRICS].auth_failures.labels(kind, reason).inc()
    log.info("auth.refused", kind=kind, reason=reason, **fields)


def _address_allowed(address: str | None, networks: tuple[str, ...]) -> bool:
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Enforce the matched route's policy before its handler runs."""
    policy = request.app[POLICIES].get(request.match_info.route)
    if isinstance(policy, OperatorPolicy):
        operator = request.app[OPERATORS].authenticate(request.headers.get("Authorization", ""))
        if operator is None:
            _refused(request, "operator", "missing_or_unknown_token")
            raise Unauthorized()
        if not operator.permissions & policy.permissions:
            _refused(request, "operator", "permission", operator=operator.name)
            raise Forbidden()
        request[OPERATOR] = operator
    elif isinstance(policy, RemotePolicy):
        remote_id = request.headers.get(HEADER_REMOTE_ID, "")
        remote, failure = request.app[REMOTES].authenticate(
            remote_id,
            request.headers.get(HEADER_REMOTE_TOKEN, ""),
            allow_pending=policy.allow_pending,
        )
        if remote is None:
            assert failure is not None
            log.info("auth.refused", kind="remote", reason=failure.value, remote_id=remote_id[:64])
            raise _unauthorized()
        request[REMOTE] = remote
    elif isinstance(policy, MetricsPolicy):
        cfg = request.app[SETTINGS].config.metrics
        if cfg.allow_from and not _address_allowed(request.remote, cfg.allow_from):
            _refused(request, "metrics", "address", peer=request.remote)
            raise Forbidden()
        if cfg.token_sha256 and not bearer_matches(
            request.headers.get("Authorization", ""), cfg.token_sha256
        ):
            _refused(request, "metrics", "missing_or_unknown_token")
            raise Unauthorized()
    return await handler(request)


class AccessLogger(AbstractAccessLogger):
    """One ``http.request`` event per request, with the request id bound by the middleware."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Emit the request's canonical log line."""
        level = 10 if request.path in _QUIET_PATHS else 20
        if not logging.getLogger(__name__).isEnabledFor(level):
            return
        route = request.match_info.route.name if isinstance(request, web.Request) else None
        log.log(
            level,
            "http.request",
            method=request.method,
            path=request.path,
            route=route,
            status=response.status,
            bytes=response.body_length,
            duration_ms=round(time * 1000, 2),
            peer=request.remote,
        )
