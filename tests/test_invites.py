"""Invite codes against an independent implementation.

``tests/vectors/invites.json`` was produced by a Go port of Mattermost's
``RemoteClusterInvite.Encrypt`` (``tests/vectors/invitegen``; the README there has the
commands). In the other direction, the daemon's invites are opened with pycryptodome, a
library the daemon does not use, and with the Go program when Go is installed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import PBKDF2, scrypt

from daemon import invites
from daemon.errors import InviteError
from daemon.ids import new_id
from daemon.models import InvitePayload

VECTORS_DIR = Path(__file__).parent / "vectors"
VECTORS: list[dict[str, Any]] = json.loads((VECTORS_DIR / "invites.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_decrypts_go_vectors(vector: dict[str, Any]) -> None:
    """Every invite made by the Go implementation decrypts to its plaintext."""
    invite = invites.decrypt(vector["invite"], vector["password"])
    expected = json.loads(vector["plaintext"])
    assert invite.remote_id == expected["remote_id"]
    assert invite.site_url == expected["site_url"]
    assert invite.token == expected["token"]
    assert invite.version == expected.get("version", 0)


def test_accepts_unpadded_and_standard_base64() -> None:
    vector = VECTORS[0]
    code = vector["invite"]
    unpadded = code.rstrip("=")
    standard = code.replace("-", "+").replace("_", "/")
    for variant in (unpadded, standard, f"  {code}\n"):
        assert (
            invites.decrypt(variant, vector["password"]).token
            == invites.decrypt(code, vector["password"]).token
        )


def test_wrong_password_and_damage_are_refused() -> None:
    vector = VECTORS[0]
    with pytest.raises(InviteError, match="could not decrypt"):
        invites.decrypt(vector["invite"], vector["password"] + "x")
    blob = bytearray(base64.urlsafe_b64decode(vector["invite"]))
    blob[-1] ^= 1
    with pytest.raises(InviteError, match="could not decrypt"):
        invites.decrypt(base64.urlsafe_b64encode(bytes(blob)).decode(), vector["password"])
    with pytest.raises(InviteError, match="too short"):
        invites.decrypt(vector["invite"][:30], vector["password"])
    with pytest.raises(InviteError, match="base64"):
        invites.decrypt("not base64 at all!", vector["password"])


def _pycryptodome_decrypt(code: str, password: str) -> dict[str, Any]:
    """Mattermost's Decrypt, written with pycryptodome (PBKDF2 first, then scrypt)."""
    blob = base64.urlsafe_b64decode(code)
    salt, nonce, sealed = blob[:16], blob[16:28], blob[28:]
    keys = [
        PBKDF2(password.encode(), salt, dkLen=32, count=600_000, hmac_hash_module=SHA256),
        scrypt(password.encode(), salt, key_len=32, N=32768, r=8, p=1),  # type: ignore[arg-type]
    ]
    for key in keys:
        cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
        try:
            plaintext = cipher.decrypt_and_verify(sealed[:-16], sealed[-16:])
        except ValueError:
            continue
        return dict(json.loads(plaintext))
    raise AssertionError("pycryptodome could not decrypt the invite")


@pytest.mark.parametrize("version", [3, 2, 0])
def test_own_invites_open_with_pycryptodome(version: int) -> None:
    """Our invites are Mattermost's bytes: padded URL-safe base64, PBKDF2 for v3, scrypt below."""
    payload = InvitePayload(
        remote_id=new_id(), site_url="https://a.example.com", token=new_id(), version=version
    )
    code = invites.encrypt(payload, "pässwörd-✓")
    assert len(code) % 4 == 0 and "+" not in code and "/" not in code
    plain = _pycryptodome_decrypt(code, "pässwörd-✓")
    expected = {
        "remote_id": payload.remote_id,
        "remote_team_id": "",
        "site_url": payload.site_url,
        "token": payload.token,
    }
    if version:
        expected["version"] = version
    assert plain == expected
    assert list(plain) == list(expected)  # Go's field order; omitted fields stay omitted


@pytest.mark.skipif(
    shutil.which("go") is None, reason="Go is not installed (see tests/vectors/README.md)"
)
def test_own_invite_opens_with_go() -> None:
    """The Go port of Mattermost's Decrypt opens an invite this daemon made."""
    payload = InvitePayload(
        remote_id=new_id(), site_url="http://127.0.0.1:8065", token=new_id(), version=3
    )
    code = invites.encrypt(payload, "s3cret-password")
    result = subprocess.run(
        ["go", "run", "./tests/vectors/invitegen", "decrypt"],
        input=code,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
        env={
            **os.environ,
            "INVITE_PASSWORD": "s3cret-password",
            "GO111MODULE": "off",
            "GOPATH": "/usr/share/gocode",
        },
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(payload.to_json())


async def test_key_derivation_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The async wrappers derive keys in a worker thread, never on the loop's thread."""
    threads: list[int] = []
    real = invites._pbkdf2

    def spy(password: bytes, salt: bytes) -> bytes:
        threads.append(threading.get_ident())
        return real(password, salt)

    monkeypatch.setattr(invites, "_pbkdf2", spy)
    payload = InvitePayload(remote_id=new_id(), site_url="http://x", token=new_id(), version=3)
    code = await invites.encrypt_async(payload, "password1")
    assert (await invites.decrypt_async(code, "password1")).token == payload.token
    loop_thread = threading.get_ident()
    assert len(threads) == 2 and loop_thread not in threads
    assert asyncio.get_running_loop().is_running()
