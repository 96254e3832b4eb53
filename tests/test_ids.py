"""Mattermost ids and token digests."""

from __future__ import annotations

import re

from daemon.ids import hash_token, id_from_bytes, is_valid_id, new_id, new_password, token_matches


def test_new_id_is_a_mattermost_id() -> None:
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[ybndrfg8ejkmcpqxot1uwisza345h769]{26}", i) for i in ids)
    assert all(is_valid_id(i) for i in ids)


def test_id_validation() -> None:
    assert not is_valid_id("a" * 25) and not is_valid_id("a" * 27)
    assert not is_valid_id("a" * 25 + "-") and not is_valid_id("../" + "a" * 23)
    assert not is_valid_id(None) and is_valid_id("A" * 26)


def test_id_from_bytes_is_stable() -> None:
    assert id_from_bytes(b"x") == id_from_bytes(b"x") != id_from_bytes(b"y")
    assert is_valid_id(id_from_bytes(b"x"))


def test_token_digest_comparison() -> None:
    token = new_id()
    digest = hash_token(token)
    assert token_matches(token, digest)
    assert not token_matches(token + "x", digest)
    assert not token_matches("", digest)
    assert not token_matches(token, "not-hex")
    assert not token_matches(token, digest[:-2])


def test_generated_password() -> None:
    password = new_password()
    assert len(password) == 16
    assert re.fullmatch(r"[a-zA-Z0-9!@#$%&*]{16}", password)
