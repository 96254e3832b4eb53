"""The operator commands' HTTP client: credentials from the environment or a file, errors as exits.

:class:`Client` is a small synchronous client of the management API (``urllib``: the commands
run once and exit, an event loop would add nothing). :class:`Refused` is what the daemon said
no with, or why it could not be reached (exit 1); :class:`UsageError` is a command line that
cannot run (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol

DEFAULT_URL = "http://127.0.0.1:8065"
TIMEOUT = 60.0


class Readable(Protocol):
    """Anything with ``read``: a file, or a reader that draws progress."""

    def read(self, size: int = -1, /) -> bytes: ...


class UsageError(Exception):
    """The command line cannot be run as given (exit 2)."""


class Refused(Exception):
    """The daemon answered with an error, or could not be reached (exit 1)."""


class Client:
    """A minimal, synchronous client of the management API."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._token = token

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: Readable | None = None,
        length: int | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """Send one request; return the parsed JSON answer (None when empty)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        headers = {"Authorization": f"Bearer {self._token}"}
        payload: Any = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            payload = data
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(length)
        request = urllib.request.Request(  # noqa: S310 - the operator's own daemon URL
            self.url + path + query, data=payload, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise Refused(_describe_error(exc.code, exc.read())) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Refused(f"cannot reach the daemon at {self.url}: {reason}") from None
        return json.loads(raw) if raw else None


def _describe_error(status: int, raw: bytes) -> str:
    try:
        doc = json.loads(raw)
        message = f"{doc.get('message', '')} ({doc.get('id', '')})"
        if doc.get("detailed_error"):
            message += f": {doc['detailed_error']}"
    except (ValueError, AttributeError):
        message = raw.decode(errors="replace")[:200]
    return f"HTTP {status}: {message}"


def read_secret(path: str, what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file: {exc.strerror}") from None
    if not value:
        raise UsageError(f"the {what} file is empty")
    return value


def client_from(args: argparse.Namespace) -> Client:
    if args.token_file:
        token = read_secret(args.token_file, "token")
    else:
        token = os.environ.get("REMOTECLUSTERD_TOKEN", "").strip()
    if not token:
        raise UsageError("no operator token: set REMOTECLUSTERD_TOKEN or pass --token-file")
    return Client(args.url or os.environ.get("REMOTECLUSTERD_URL") or DEFAULT_URL, token)
