"""Who may call what: route policies, operator bearer tokens and remote-cluster credentials.

Each route is registered with a :data:`Policy` (see :mod:`daemon.routes`), enforced by
:func:`daemon.middleware.auth_middleware`:

* :data:`PUBLIC`: no credentials (``/healthz``).
* :class:`OperatorPolicy`: ``Authorization: Bearer <token>``; the token's SHA-256 must match an
  ``[[operators]]`` entry (401 otherwise) that holds one of the listed permissions (403).
* :class:`MetricsPolicy`: ``/metrics``, open or behind its own bearer token (``[metrics]``).
* :class:`RemotePolicy`: ``X-RemoteCluster-Id`` and ``X-RemoteCluster-Token``; the token must
  match, in constant time, the digest of the token this daemon issued to that remote. A
  missing id, an unknown or deleted remote and a wrong token all get the same 401 body; the
  reason is only logged (``auth.refused``). Until an invite is confirmed, the invite token is
  good for ``/confirm_invite`` alone.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from daemon.config import OperatorConfig
from daemon.ids import token_bytes
from daemon.remotes import creator_id_for
from daemon.settings import Settings

MANAGE_SECURE_CONNECTIONS = "manage_secure_connections"
MANAGE_SHARED_CHANNELS = "manage_shared_channels"


@dataclass(frozen=True, slots=True)
class OperatorPolicy:
    """The caller must be an operator holding any of ``permissions``."""

    permissions: frozenset[str]


@dataclass(frozen=True, slots=True)
class RemotePolicy:
    """The caller must be a linked remote (or, with ``allow_pending``, an invited one)."""

    allow_pending: bool = False


@dataclass(frozen=True, slots=True)
class MetricsPolicy:
    """Open when ``[metrics] token_sha256`` is empty, else that bearer token is needed."""


class _Public:
    def __repr__(self) -> str:
        return "PUBLIC"


PUBLIC = _Public()
Policy = OperatorPolicy | RemotePolicy | MetricsPolicy | _Public

MANAGE = OperatorPolicy(frozenset({MANAGE_SECURE_CONNECTIONS}))
READ = OperatorPolicy(frozenset({MANAGE_SECURE_CONNECTIONS, MANAGE_SHARED_CHANNELS}))
LINKED_REMOTE = RemotePolicy()
INVITED_REMOTE = RemotePolicy(allow_pending=True)
METRICS_READER = MetricsPolicy()


@dataclass(frozen=True, slots=True)
class Operator:
    """An authenticated operator."""

    name: str
    permissions: frozenset[str]

    @property
    def creator_id(self) -> str:
        """The id recorded as ``creator_id`` of the remotes this operator creates."""
        return creator_id_for(self.name)


def bearer_digest(authorization: str) -> bytes | None:
    """The SHA-256 of an ``Authorization: Bearer`` token, or None when there is none."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return hashlib.sha256(token_bytes(token.strip())).digest()


def bearer_matches(authorization: str, digest_hex: str) -> bool:
    """Whether the bearer token's SHA-256 is ``digest_hex`` (constant time)."""
    digest = bearer_digest(authorization)
    return digest is not None and hmac.compare_digest(digest, bytes.fromhex(digest_hex))


class OperatorAuth:
    """Matches bearer tokens against the configured operators' digests.

    It follows the live configuration: after a reload, the new ``[[operators]]`` apply.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._source: tuple[OperatorConfig, ...] | None = None
        self._entries: list[tuple[bytes, Operator]] = []

    def _current(self) -> list[tuple[bytes, Operator]]:
        operators = self._settings.config.operators
        if operators is not self._source:
            self._entries = [
                (bytes.fromhex(op.token_sha256), Operator(op.name, frozenset(op.permissions)))
                for op in operators
            ]
            self._source = operators
        return self._entries

    def authenticate(self, authorization: str) -> Operator | None:
        """Return the operator whose token is presented, comparing every digest."""
        digest = bearer_digest(authorization)
        if digest is None:
            return None
        found = None
        for stored, operator in self._current():
            if hmac.compare_digest(digest, stored):
                found = operator
        return found
