"""Mattermost-style ids, tokens and passwords.

Every id and token the daemon makes is a Mattermost id: 16 random bytes in base32 with the
alphabet ``ybndrfg8ejkmcpqxot1uwisza345h769`` and no padding, 26 characters. Mattermost's
database columns for tokens are ``VARCHAR(26)``, so nothing longer may ever be handed to a peer.

Tokens this daemon issues are kept only as SHA-256 digests; :func:`token_matches` compares a
presented token with a stored digest in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets

_STD_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_MM_ALPHABET = "ybndrfg8ejkmcpqxot1uwisza345h769"
_TO_MM = str.maketrans(_STD_ALPHABET, _MM_ALPHABET)

# Mattermost's IsValidId accepts any 26 Unicode letters or digits. Ids here also become parts of
# file names, so only ASCII letters and digits pass; every id Mattermost generates is of that form.
_ID_RE = re.compile(r"[A-Za-z0-9]{26}")
_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")

# Mattermost's utils.SecureRandString alphabet, used for generated invite passwords.
_PASSWORD_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!@#$%&*0123456789"  # noqa: S105
GENERATED_PASSWORD_LENGTH = 16


def _encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").translate(_TO_MM)


def new_id() -> str:
    """Return a new random 26-character id (Mattermost's ``model.NewId``)."""
    return _encode(os.urandom(16))


def id_from_bytes(data: bytes) -> str:
    """Return a stable id derived from ``data`` (Mattermost's ``newIDFromBytes``)."""
    return _encode(hashlib.sha256(data).digest())[:26]


def is_valid_id(value: object) -> bool:
    """Tell whether ``value`` is a 26-character id of ASCII letters and digits."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def is_sha256_hex(value: str) -> bool:
    """Tell whether ``value`` is a lowercase hex SHA-256 digest."""
    return _SHA256_HEX_RE.fullmatch(value) is not None


def hash_token(token: str) -> str:
    """Return the hex SHA-256 digest under which an issued token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_bytes(token: str) -> bytes:
    """A presented token's bytes as they came: aiohttp decodes header bytes that are not
    UTF-8 as surrogates, which plain ``encode`` would refuse (a 500 instead of a 401)."""
    return token.encode("utf-8", "surrogateescape")


def token_matches(token: str, digest_hex: str) -> bool:
    """Compare a presented token with a stored digest in constant time.

    Digests of equal length are compared, so neither the token's length nor its content shows
    in the timing.
    """
    presented = hashlib.sha256(token_bytes(token)).digest()
    try:
        stored = bytes.fromhex(digest_hex)
    except ValueError:
        stored = b""
    return hmac.compare_digest(presented, stored.ljust(32, b"\0")[:32]) and len(stored) == 32


class RequestIds:
    """Cheap unique request ids of the usual 26-character form: a random prefix and a counter.

    They label log lines, so they must be unique, not unguessable; ``os.urandom`` per request
    would cost more than it gives.
    """

    def __init__(self) -> None:
        self._prefix = new_id()[:16]
        self._counter = 0

    def next(self) -> str:
        """The next id (the counter in 10 base-32 digits: 2^50 ids before it wraps)."""
        self._counter += 1
        n, digits = self._counter, []
        for _ in range(10):
            digits.append(_MM_ALPHABET[n & 31])
            n >>= 5
        return self._prefix + "".join(reversed(digits))


def new_password() -> str:
    """Return a random invite password as Mattermost generates one (16 characters)."""
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(GENERATED_PASSWORD_LENGTH))
