"""The ``remoteclusterd`` command (also ``python -m daemon``).

Daemon commands: ``serve``, ``check-config`` and ``token``. Operator commands talk to a running
daemon's management API (see :mod:`daemon.opscli`). Exit statuses: 0 success, 1 the daemon said
no (or failed to start), 2 usage error, 78 invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sys
from collections.abc import Sequence

from daemon import __version__
from daemon import logging as daemon_logging
from daemon.config import EX_CONFIG, load
from daemon.errors import ConfigError
from daemon.opscli import add_commands


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"remoteclusterd: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    daemon_logging.configure(config.log.level, config.log.format)
    from daemon.runtime import serve  # noqa: PLC0415 - keeps `token` and `check-config` light

    return asyncio.run(serve(config, args.config))


def _check_config(args: argparse.Namespace) -> int:
    try:
        load(args.config)
    except ConfigError as exc:
        print(f"remoteclusterd: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(f"{args.config}: OK")
    return 0


def _token(_args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    print(token)
    print(f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"')
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="remoteclusterd",
        description="Secure-connection transport daemon, wire-compatible with Mattermost.",
    )
    parser.add_argument("--version", action="version", version=f"remoteclusterd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", required=True, metavar="PATH", help="the TOML config file")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file (exit 0, or 78)")
    check.add_argument("--config", required=True, metavar="PATH", help="the TOML config file")
    check.set_defaults(func=_check_config)

    token = sub.add_parser("token", help="print a new operator token and its config line")
    token.set_defaults(func=_token)

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status
