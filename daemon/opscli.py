"""Operator commands: the common jobs on a running daemon, without hand-written curl.

They talk to the management API at ``--url`` (default ``$REMOTECLUSTERD_URL``, else
``http://127.0.0.1:8065``) with the operator token from ``$REMOTECLUSTERD_TOKEN`` or
``--token-file``, never from the command line (it would show in ``ps`` and shell history).
Passwords and invites are read from files for the same reason.

Human output is written for terminals; ``--json`` prints the API's answer as one JSON
document. Exit status: 0 success, 1 the daemon said no or could not be reached (its error on
stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from daemon.opsclient import DEFAULT_URL, Refused, UsageError, client_from, read_secret

API = "/api/v4/remotecluster"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _age(ms: int) -> str:
    if not ms:
        return "never"
    seconds = max(0, int(time.time() - ms / 1000))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _state(rc: dict[str, Any]) -> str:
    if rc["delete_at"]:
        return "deleted"
    return "pending" if rc["site_url"].startswith("pending_") else "linked"


def _online(rc: dict[str, Any], offline_after_s: float = 300.0) -> str:
    if _state(rc) != "linked":
        return "-"
    fresh = rc["last_ping_at"] and time.time() - rc["last_ping_at"] / 1000 < offline_after_s
    return "yes" if fresh else "no"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _show_remote(rc: dict[str, Any]) -> None:
    for key in ("remote_id", "name", "display_name", "site_url", "default_team_id", "creator_id"):
        print(f"{key:16} {rc[key]}")
    print(f"{'state':16} {_state(rc)}")
    print(f"{'online':16} {_online(rc)}")
    print(f"{'last ping':16} {_age(rc['last_ping_at'])}")


# --- commands ---------------------------------------------------------------------------


def remote_list(args: argparse.Namespace) -> None:
    """List remotes as a table (or JSON)."""
    params = {"per_page": "200", "include_deleted": "true" if args.all else "false"}
    remotes = client_from(args).call("GET", API, params=params)
    if args.json:
        _print_json(remotes)
        return
    if not remotes:
        print("no remotes")
        return
    rows = [["NAME", "STATE", "ONLINE", "LAST PING", "SITE URL", "ID"]]
    rows += [
        [
            rc["name"],
            _state(rc),
            _online(rc),
            _age(rc["last_ping_at"]),
            rc["site_url"],
            rc["remote_id"],
        ]
        for rc in remotes
    ]
    print(_table(rows))


def remote_show(args: argparse.Namespace) -> None:
    """Show one remote."""
    rc = client_from(args).call("GET", f"{API}/{args.id}")
    _print_json(rc) if args.json else _show_remote(rc)


def remote_create(args: argparse.Namespace) -> None:
    """Create a remote and print its invite (and the generated password) once."""
    body = {
        "name": args.name,
        "default_team_id": args.team,
        "display_name": args.display_name or "",
    }
    if args.password_file:
        body["password"] = read_secret(args.password_file, "password")
    answer = client_from(args).call("POST", API, body=body)
    if args.json:
        _print_json(answer)
        return
    rc = answer["remote_cluster"]
    print(f"created {rc['name']} ({rc['remote_id']}), waiting for the other side to accept")
    print(f"invite:   {answer['invite']}")
    if "password" in answer:
        print(f"password: {answer['password']}")
    print("Give the invite and, separately, the password to the other side's operator.")


def remote_accept(args: argparse.Namespace) -> None:
    """Accept an invite from files."""
    body = {
        "name": args.name,
        "display_name": args.display_name or "",
        "default_team_id": args.team,
        "invite": read_secret(args.invite_file, "invite"),
        "password": read_secret(args.password_file, "password"),
    }
    rc = client_from(args).call("POST", f"{API}/accept_invite", body=body)
    if args.json:
        _print_json(rc)
    else:
        print(f"linked with {rc['site_url']} as {rc['name']} ({rc['remote_id']})")


def remote_invite(args: argparse.Namespace) -> None:
    """Generate a new invite for a pending remote (earlier invites stop working)."""
    password = read_secret(args.password_file, "password")
    invite = client_from(args).call(
        "POST", f"{API}/{args.id}/generate_invite", body={"password": password}
    )
    _print_json(invite) if args.json else print(invite)


def remote_patch(args: argparse.Namespace) -> None:
    """Change a remote's display name or default team."""
    body = {}
    if args.display_name is not None:
        body["display_name"] = args.display_name
    if args.team is not None:
        body["default_team_id"] = args.team
    if not body:
        raise UsageError("nothing to change: give --display-name and/or --team")
    rc = client_from(args).call("PATCH", f"{API}/{args.id}", body=body)
    _print_json(rc) if args.json else _show_remote(rc)


def remote_delete(args: argparse.Namespace) -> None:
    """Delete a remote, after a confirmation unless --yes."""
    client = client_from(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("refusing to delete without confirmation: pass --yes")
        rc = client.call("GET", f"{API}/{args.id}")
        answer = input(f"Delete {rc['name']} ({rc['remote_id']}, {rc['site_url']})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return
    client.call("DELETE", f"{API}/{args.id}")
    print(f"deleted {args.id}")


def send(args: argparse.Namespace) -> None:
    """Queue a message (its payload a JSON file) for a remote."""
    try:
        payload = json.loads(Path(args.payload_file).read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read the payload file: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"the payload file is not JSON: {exc}") from None
    answer = client_from(args).call(
        "POST", f"{API}/{args.id}/msg", body={"topic": args.topic, "payload": payload}
    )
    _print_json(answer) if args.json else print(f"queued message {answer['id']}")


class _Progress:
    """A file reader that draws a progress bar on stderr when it is a terminal."""

    def __init__(self, f: IO[bytes], total: int) -> None:
        self._f, self._total, self._done = f, total, 0
        self._draw = sys.stderr.isatty()

    def read(self, size: int = -1) -> bytes:
        block = self._f.read(size)
        self._done += len(block)
        if self._draw:
            filled = int(30 * self._done / max(self._total, 1))
            percent = 100 * self._done // max(self._total, 1)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {percent:3d}%")
            if self._done >= self._total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        return block


def send_file(args: argparse.Namespace) -> None:
    """Hand a file to the daemon for a remote (it is sent from there)."""
    path = Path(args.path)
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    params = {"filename": args.filename or path.name}
    for key in ("channel_id", "user_id", "file_id"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    with f:
        answer = client_from(args).call(
            "POST",
            f"{API}/{args.id}/files",
            data=_Progress(f, size),
            length=size,
            params=params,
        )
    if args.json:
        _print_json(answer)
    else:
        print(f"queued file {answer['file_id']} (upload {answer['upload_id']})")


def msg_status(args: argparse.Namespace) -> None:
    """Show a message's state."""
    doc = client_from(args).call("GET", f"{API}/{args.id}/msg/{args.msg_id}")
    _print_json(doc) if args.json else print(
        f"{doc['id']}  {doc['state']}  attempts={doc['attempts']}  {doc['last_error']}".rstrip()
    )


def file_status(args: argparse.Namespace) -> None:
    """Show a file's transfer state."""
    doc = client_from(args).call("GET", f"{API}/{args.id}/files/{args.file_id}")
    progress = f"{doc['offset']}/{doc['size']} bytes"
    line = f"{doc['file_id']}  {doc['state']}  {progress}  {doc['last_error']}"
    _print_json(doc) if args.json else print(line.rstrip())


def outbox(args: argparse.Namespace) -> None:
    """List a remote's recent messages (``--state dead`` for the dead ones)."""
    params = {"state": args.state or "", "limit": str(args.limit)}
    docs = client_from(args).call("GET", f"{API}/{args.id}/msg", params=params)
    if args.json:
        _print_json(docs)
        return
    if not docs:
        print("no messages")
        return
    rows = [["ID", "TOPIC", "STATE", "ATTEMPTS", "LAST ERROR"]]
    rows += [[d["id"], d["topic"], d["state"], str(d["attempts"]), d["last_error"]] for d in docs]
    print(_table(rows))


def retry(args: argparse.Namespace) -> None:
    """Queue a dead message again."""
    answer = client_from(args).call("POST", f"{API}/{args.id}/msg/{args.msg_id}/retry")
    _print_json(answer) if args.json else print(f"queued message {answer['id']} again")


def retry_file(args: argparse.Namespace) -> None:
    """Queue a dead file again."""
    answer = client_from(args).call("POST", f"{API}/{args.id}/files/{args.file_id}/retry")
    _print_json(answer) if args.json else print(f"queued file {answer['file_id']} again")


Command = Callable[[argparse.Namespace], None]
Register = Callable[[Any, str, Command, str], argparse.ArgumentParser]


def add_commands(sub: Any) -> None:
    """Register the operator commands on the ``remoteclusterd`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help=f"the daemon's URL (default $REMOTECLUSTERD_URL or {DEFAULT_URL})"
    )
    common.add_argument(
        "--token-file", metavar="PATH", help="read the operator token from this file"
    )
    common.add_argument("--json", action="store_true", help="print the API's answer as JSON")

    def command(parent: Any, name: str, func: Command, help_: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_)
        parser.set_defaults(func=run(func))
        return parser

    remote = sub.add_parser("remote", help="manage secure connections").add_subparsers(
        dest="remote_command", required=True, metavar="COMMAND"
    )
    _remote_commands(remote, command)
    _traffic_commands(sub, command)


def _remote_commands(remote: Any, command: Register) -> None:
    p = command(remote, "list", remote_list, "list remotes")
    p.add_argument("--all", action="store_true", help="include deleted remotes")
    command(remote, "show", remote_show, "show one remote").add_argument("id")
    p = command(remote, "create", remote_create, "create a remote and print its invite")
    p.add_argument("name")
    p.add_argument("--team", required=True, metavar="TEAM_ID")
    p.add_argument("--display-name")
    p.add_argument("--password-file", metavar="PATH", help="default: the daemon generates one")
    p = command(remote, "accept", remote_accept, "accept an invite")
    p.add_argument("name")
    p.add_argument("--team", required=True, metavar="TEAM_ID")
    p.add_argument("--display-name")
    p.add_argument("--invite-file", required=True, metavar="PATH")
    p.add_argument("--password-file", required=True, metavar="PATH")
    p = command(remote, "invite", remote_invite, "generate a new invite for a pending remote")
    p.add_argument("id")
    p.add_argument("--password-file", required=True, metavar="PATH")
    p = command(remote, "patch", remote_patch, "change a remote's display name or team")
    p.add_argument("id")
    p.add_argument("--display-name")
    p.add_argument("--team", metavar="TEAM_ID")
    p = command(remote, "delete", remote_delete, "delete a remote")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _traffic_commands(sub: Any, command: Register) -> None:
    p = command(sub, "send", send, "queue a message for a remote")
    p.add_argument("id")
    p.add_argument("topic")
    p.add_argument("--payload-file", required=True, metavar="PATH", help="the payload, as JSON")
    p = command(sub, "send-file", send_file, "send a file to a remote")
    p.add_argument("id")
    p.add_argument("path")
    p.add_argument("--filename", help="the name the peer sees (default: the file's)")
    p.add_argument("--channel-id", dest="channel_id")
    p.add_argument("--user-id", dest="user_id")
    p.add_argument("--file-id", dest="file_id")
    p = command(sub, "msg-status", msg_status, "show a message's state")
    p.add_argument("id")
    p.add_argument("msg_id")
    p = command(sub, "file-status", file_status, "show a file's transfer state")
    p.add_argument("id")
    p.add_argument("file_id")
    p = command(sub, "outbox", outbox, "list a remote's recent messages")
    p.add_argument("id")
    p.add_argument("--state", choices=["queued", "delivered", "rejected", "dead"])
    p.add_argument("--limit", type=int, default=50)
    p = command(sub, "retry", retry, "queue a dead message again")
    p.add_argument("id")
    p.add_argument("msg_id")
    p = command(sub, "retry-file", retry_file, "queue a dead file again")
    p.add_argument("id")
    p.add_argument("file_id")


def run(func: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: map its failures to exit statuses and messages on stderr."""

    def runner(args: argparse.Namespace) -> int:
        try:
            func(args)
        except UsageError as exc:
            print(f"remoteclusterd: {exc}", file=sys.stderr)
            return 2
        except Refused as exc:
            print(f"remoteclusterd: {exc}", file=sys.stderr)
            return 1
        return 0

    return runner
