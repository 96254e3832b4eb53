"""Invite codes, byte-compatible with Mattermost's ``RemoteClusterInvite.Encrypt/Decrypt``.

Layout: ``salt[16] ‖ nonce[12] ‖ AES-256-GCM ciphertext ‖ tag[16]`` of the invite's JSON, no
associated data, in URL-safe base64 with ``=`` padding. The 32-byte key comes from the password:

* version ≥ 3: PBKDF2-HMAC-SHA256, 600,000 iterations (what this daemon emits);
* older invites: scrypt N=32768, r=8, p=1.

Decryption tries PBKDF2 first, then scrypt, as Mattermost does. Both KDFs cost 0.1-0.4 s of CPU,
so the async wrappers run them in a worker thread: ``hashlib`` releases the GIL while it derives
a key, and the event loop keeps serving pings meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from daemon.errors import InviteError
from daemon.models import InvitePayload

INVITE_VERSION = 3
PBKDF2_ITERATIONS = 600_000
SCRYPT_N, SCRYPT_R, SCRYPT_P = 32768, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024  # 128·N·r = 32 MiB, above OpenSSL's default limit
_SALT, _NONCE, _TAG, _KEY = 16, 12, 16, 32


def _pbkdf2(password: bytes, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, PBKDF2_ITERATIONS, _KEY)


def _scrypt(password: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_SCRYPT_MAXMEM, dklen=_KEY
    )


def encrypt(invite: InvitePayload, password: str) -> str:
    """Encrypt ``invite`` with ``password``; the KDF follows ``invite.version``. Blocking."""
    salt, nonce = os.urandom(_SALT), os.urandom(_NONCE)
    secret = password.encode("utf-8")
    key = _pbkdf2(secret, salt) if invite.version >= 3 else _scrypt(secret, salt)
    sealed = AESGCM(key).encrypt(nonce, invite.to_json(), None)
    return base64.urlsafe_b64encode(salt + nonce + sealed).decode("ascii")


def decode_code(code: str) -> bytes:
    """Decode an invite code's base64: URL-safe or standard alphabet, padded or not."""
    text = "".join(code.split()).replace("+", "-").replace("/", "_").rstrip("=")
    text += "=" * (-len(text) % 4)
    try:
        blob = base64.b64decode(text, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise InviteError("the invite is not valid base64") from None
    if len(blob) < _SALT + _NONCE + _TAG:
        raise InviteError("the invite is too short")
    return blob


def decrypt(code: str, password: str) -> InvitePayload:
    """Decrypt an invite code (PBKDF2 first, then scrypt). Blocking.

    Raises :class:`InviteError` with one generic message for a wrong password and for a
    tampered or truncated invite: GCM cannot tell them apart, and neither should the caller.
    """
    blob = decode_code(code)
    salt, nonce, sealed = blob[:_SALT], blob[_SALT : _SALT + _NONCE], blob[_SALT + _NONCE :]
    secret = password.encode("utf-8")
    for derive in (_pbkdf2, _scrypt):
        try:
            plaintext = AESGCM(derive(secret, salt)).decrypt(nonce, sealed, None)
        except InvalidTag:
            continue
        try:
            return msgspec.json.decode(plaintext, type=InvitePayload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise InviteError("the invite's content is not valid") from None
    raise InviteError("could not decrypt the invite with the given password")


async def encrypt_async(invite: InvitePayload, password: str) -> str:
    """:func:`encrypt` in a worker thread, off the event loop."""
    return await asyncio.to_thread(encrypt, invite, password)


async def decrypt_async(code: str, password: str) -> InvitePayload:
    """:func:`decrypt` in a worker thread, off the event loop."""
    return await asyncio.to_thread(decrypt, code, password)
