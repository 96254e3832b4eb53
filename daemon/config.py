"""The configuration: strict TOML loaded into one frozen, typed object.

The keys of ``[server]``, ``[storage]``, ``[log]``, ``[heartbeat]``, ``[[operators]]``,
``[[topics]]``, ``[events]``, ``[uploads]``, ``[outbox]`` and ``[metrics]`` are the daemon's
fixed edge (see the README); the daemon adds its own keys beside them, each with a safe default
shown in ``config.example.toml``. Unknown keys are errors. Durations are seconds and may be
fractions. Relative paths are relative to the folder of the config file.

:func:`load` raises :class:`~daemon.errors.ConfigError` whose message names the key's path and
why it is wrong; the CLI prints it and exits 78 (``EX_CONFIG``).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from daemon.errors import ConfigError
from daemon.ids import is_sha256_hex

EX_CONFIG = 78

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Bytes = Annotated[int, msgspec.Meta(ge=1)]
Permission = Literal["manage_secure_connections", "manage_shared_channels"]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Common options of every config table: frozen, and no unknown keys."""


class ServerConfig(_Section, frozen=True):
    """``[server]``: where the daemon listens and how peers reach it."""

    listen: str
    site_url: str
    max_frame_size: Bytes = 300_000
    shutdown_grace: Seconds = 20.0
    keepalive_timeout: Seconds = 75.0


class StorageConfig(_Section, frozen=True):
    """``[storage]``: the SQLite database and received files live under ``data_dir``."""

    data_dir: str


class LogConfig(_Section, frozen=True):
    """``[log]``: ``console`` for people, ``json`` for journald and log shippers."""

    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class HeartbeatConfig(_Section, frozen=True):
    """``[heartbeat]``: outbound pings to every confirmed peer."""

    interval: Seconds = 60.0
    timeout: Seconds = 15.0
    offline_after: Seconds = 300.0
    jitter: Annotated[float, msgspec.Meta(ge=0, le=0.5)] = 0.1
    max_clock_skew: Seconds = 5.0


class InvitesConfig(_Section, frozen=True):
    """``[invites]``: invite lifetime, password policy and the confirm call's timeout."""

    expire_after: Seconds = 48 * 3600.0
    min_password_length: Annotated[int, msgspec.Meta(ge=1)] = 8
    confirm_timeout: Seconds = 15.0


class OperatorConfig(_Section, frozen=True):
    """``[[operators]]``: a bearer token (kept as its SHA-256) and what it may do."""

    name: str
    token_sha256: str
    permissions: tuple[Permission, ...] = ()


class TopicConfig(_Section, frozen=True):
    """``[[topics]]``: where inbound messages of a topic are forwarded."""

    name: str
    forward_url: str
    timeout: Seconds = 30.0


class EventsConfig(_Section, frozen=True):
    """``[events]``: an optional hook that receives lifecycle events."""

    forward_url: str = ""


class UploadsConfig(_Section, frozen=True):
    """``[uploads]``: files and profile images, received and sent."""

    max_file_size: Bytes = 100 * 1024 * 1024
    session_ttl: Seconds = 86_400.0
    min_free_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024 * 1024 * 1024
    commit_every: Bytes = 64 * 1024 * 1024
    progress_timeout: Seconds = 60.0
    max_image_size: Bytes = 6 * 1024 * 1024
    max_image_pixels: Bytes = 7680 * 4320
    keep_done: Seconds = 7 * 86_400.0


class OutboxConfig(_Section, frozen=True):
    """``[outbox]``: the retry policy of queued messages."""

    retry_base: Seconds = 0.5
    retry_max: Seconds = 60.0
    max_attempts: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_age: Seconds = 86_400.0
    max_queued: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    send_timeout: Seconds = 60.0
    keep_done: Seconds = 7 * 86_400.0


class InboxConfig(_Section, frozen=True):
    """``[inbox]``: messages from peers.

    ``dedupe_window`` must outlast the peers' retry horizon (their ``outbox.max_age``): a
    retry that comes later than that could reach the local application a second time.
    """

    dedupe_window: Seconds = 2 * 86_400.0
    retry_after: Seconds = 5.0


class MetricsConfig(_Section, frozen=True):
    """``[metrics]``: an empty digest leaves ``/metrics`` open; ``allow_from`` limits addresses."""

    token_sha256: str = ""
    allow_from: tuple[str, ...] = ()


class Config(_Section, frozen=True):
    """The whole configuration, validated and with paths resolved."""

    server: ServerConfig
    storage: StorageConfig
    operators: tuple[OperatorConfig, ...]
    log: LogConfig = LogConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    invites: InvitesConfig = InvitesConfig()
    topics: tuple[TopicConfig, ...] = ()
    events: EventsConfig = EventsConfig()
    uploads: UploadsConfig = UploadsConfig()
    outbox: OutboxConfig = OutboxConfig()
    inbox: InboxConfig = InboxConfig()
    metrics: MetricsConfig = MetricsConfig()

    @property
    def data_dir(self) -> Path:
        """The resolved data directory."""
        return Path(self.storage.data_dir)

    @property
    def listen_host(self) -> str:
        """The host part of ``server.listen``."""
        return split_listen(self.server.listen)[0]

    @property
    def listen_port(self) -> int:
        """The port part of ``server.listen``."""
        return split_listen(self.server.listen)[1]


_MSGSPEC_PATH = re.compile(r"^(?P<why>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<key>[^`]+)`")
_TOPIC_NAME = re.compile(r"\*|[A-Za-z0-9._\-]{1,64}")


def _explain(err: msgspec.ValidationError) -> str:
    """Turn msgspec's message into ``key.path: why``."""
    match = _MSGSPEC_PATH.match(str(err))
    assert match is not None
    why, path = match["why"], (match["path"] or "")
    path = path.lstrip(".")
    if m := _UNKNOWN.match(why):
        return f"{_join(path, m['key'])}: unknown key"
    if m := _MISSING.match(why):
        return f"{_join(path, m['key'])}: required key is missing"
    return f"{path or '(top level)'}: {why[0].lower()}{why[1:]}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts, or raise ``ValueError``."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError("port must be 1-65535")
    return host, port


def check_http_url(url: str) -> str | None:
    """Return why ``url`` is not an absolute http(s) URL, or ``None`` when it is."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "must name a host"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


def _check_operators(cfg: Config) -> None:
    if not cfg.operators:
        raise ConfigError("operators: at least one [[operators]] entry is required")
    names: set[str] = set()
    for i, op in enumerate(cfg.operators):
        if not op.name or op.name in names:
            raise ConfigError(f"operators[{i}].name: must be non-empty and unique")
        names.add(op.name)
        if not is_sha256_hex(op.token_sha256):
            raise ConfigError(
                f"operators[{i}].token_sha256: must be 64 lowercase hex digits "
                "(run `remoteclusterd token` to make one)"
            )


def _check_topics(cfg: Config) -> None:
    names: set[str] = set()
    for i, topic in enumerate(cfg.topics):
        if not _TOPIC_NAME.fullmatch(topic.name) or topic.name in names:
            raise ConfigError(f"topics[{i}].name: must be unique, '*' or 1-64 of [A-Za-z0-9._-]")
        names.add(topic.name)
        if why := check_http_url(topic.forward_url):
            raise ConfigError(f"topics[{i}].forward_url: {why}")


def _validate(cfg: Config, base: Path) -> Config:
    """Cross-field checks msgspec cannot express; resolves relative paths against ``base``."""
    try:
        split_listen(cfg.server.listen)
    except ValueError as exc:
        raise ConfigError(f"server.listen: {exc}") from None
    if why := check_http_url(cfg.server.site_url):
        raise ConfigError(f"server.site_url: {why}")
    if not cfg.storage.data_dir:
        raise ConfigError("storage.data_dir: must not be empty")
    _check_operators(cfg)
    _check_topics(cfg)
    if cfg.events.forward_url and (why := check_http_url(cfg.events.forward_url)):
        raise ConfigError(f"events.forward_url: {why}")
    if cfg.metrics.token_sha256 and not is_sha256_hex(cfg.metrics.token_sha256):
        raise ConfigError("metrics.token_sha256: must be empty or 64 lowercase hex digits")
    for i, network in enumerate(cfg.metrics.allow_from):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"metrics.allow_from[{i}]: not an IP address or network: {network!r}"
            ) from None
    beat = cfg.heartbeat
    if beat.offline_after <= beat.interval * (1 + beat.jitter):
        # Otherwise a healthy peer ages out before its next ping and flaps offline/online.
        raise ConfigError(
            "heartbeat.offline_after: must be longer than heartbeat.interval * (1 + jitter) "
            f"= {beat.interval * (1 + beat.jitter):g} s"
        )
    if cfg.outbox.retry_max < cfg.outbox.retry_base:
        raise ConfigError("outbox.retry_max: must not be smaller than outbox.retry_base")
    data_dir = Path(cfg.storage.data_dir)
    if not data_dir.is_absolute():
        data_dir = base / data_dir
    return msgspec.structs.replace(
        cfg,
        server=msgspec.structs.replace(cfg.server, site_url=cfg.server.site_url.rstrip("/")),
        storage=StorageConfig(data_dir=str(data_dir)),
    )


def parse(text: str, base: Path) -> Config:
    """Parse and validate TOML text; relative paths are resolved against ``base``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"(toml): {exc}") from None
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    return _validate(cfg, base)


def load(path: str | Path) -> Config:
    """Read, parse and validate the config file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, path.resolve().parent)
