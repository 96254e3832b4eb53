"""Configuration: strict TOML, clear errors with the key's path, exit 78."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import tomli_w

from daemon.config import EX_CONFIG, Config, load, parse
from daemon.errors import ConfigError
from tests.helpers import config_dict, sha256, write_config

ROOT = Path(__file__).resolve().parent.parent


def _parse(tmp_path: Path, **sections: object) -> Config:
    return parse(tomli_w.dumps(config_dict(tmp_path / "var", 8065, **sections)), tmp_path)


def test_example_config_is_valid() -> None:
    """The shipped example loads, with every contract default."""
    cfg = load(ROOT / "config.example.toml")
    assert cfg.server.listen == "127.0.0.1:8065"
    assert cfg.server.max_frame_size == 300_000
    assert cfg.server.shutdown_grace == 20
    assert cfg.heartbeat.interval == 60 and cfg.heartbeat.timeout == 15
    assert cfg.heartbeat.offline_after == 300
    assert cfg.uploads.max_file_size == 104_857_600
    assert cfg.outbox.retry_base == 0.5 and cfg.outbox.max_age == 86_400
    assert cfg.data_dir == ROOT / "var"


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    """Only listen, site_url, data_dir and one operator are required."""
    text = f"""
[server]
listen = "127.0.0.1:9999"
site_url = "https://a.example.com/mm/"
[storage]
data_dir = "state"
[[operators]]
name = "ops"
token_sha256 = "{sha256("x")}"
"""
    cfg = parse(text, tmp_path)
    assert cfg.server.site_url == "https://a.example.com/mm"  # no trailing slash
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.listen_host == "127.0.0.1" and cfg.listen_port == 9999
    assert cfg.log.format == "console" and cfg.log.level == "info"
    assert cfg.topics == () and cfg.events.forward_url == ""
    assert cfg.metrics.token_sha256 == ""


def test_fractional_durations(tmp_path: Path) -> None:
    """Durations may be fractions of a second."""
    cfg = _parse(tmp_path, heartbeat={"interval": 0.25, "timeout": 0.1, "offline_after": 1})
    assert cfg.heartbeat.interval == 0.25


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"server": {"listen": "x", "site_url": "http://a", "bogus": 1}}, "server.bogus: unknown key"),
        ({"bogus": {"a": 1}}, "bogus: unknown key"),
        ({"server": {"listen": "127.0.0.1:1", "site_url": "http://a", "max_frame_size": "big"}}, "server.max_frame_size: expected `int`"),
        ({"server": {"listen": "127.0.0.1:1", "site_url": "http://a", "max_frame_size": 0}}, "server.max_frame_size: expected `int` >= 1"),
        ({"server": {"listen": "nohostport", "site_url": "http://a"}}, "server.listen: expected host:port"),
        ({"server": {"listen": "127.0.0.1:70000", "site_url": "http://a"}}, "server.listen: port must be"),
        ({"server": {"listen": "127.0.0.1:1", "site_url": "ftp://a"}}, "server.site_url: must start with http"),
        ({"heartbeat": {"interval": -1}}, "heartbeat.interval: expected `float` > 0"),
        ({"heartbeat": {"interval": 60, "offline_after": 60}}, "heartbeat.offline_after: must be longer than heartbeat.interval * (1 + jitter) = 66 s"),
        ({"log": {"format": "xml"}}, "log.format: invalid enum value 'xml'"),
        ({"operators": []}, "operators: at least one"),
        ({"operators": [{"name": "a", "token_sha256": "nothex"}]}, "operators[0].token_sha256: must be 64"),
        ({"operators": [{"name": "a", "token_sha256": sha256("a"), "permissions": ["root"]}]}, "operators[0].permissions[0]: invalid enum value"),
        ({"operators": [{"name": "a", "token_sha256": sha256("a"), "extra": 1}]}, "operators[0].extra: unknown key"),
        ({"topics": [{"name": "t", "forward_url": "nope"}]}, "topics[0].forward_url: must start with http"),
        ({"topics": [{"name": "t", "forward_url": "http://x"}, {"name": "t", "forward_url": "http://x"}]}, "topics[1].name: must be unique"),
        ({"outbox": {"retry_base": 10, "retry_max": 1}}, "outbox.retry_max: must not be smaller"),
        ({"metrics": {"token_sha256": "abc"}}, "metrics.token_sha256: must be empty or 64"),
    ],
)  # fmt: skip
def test_errors_name_the_key(tmp_path: Path, sections: dict[str, object], message: str) -> None:
    """Every error says which key is wrong and why."""
    with pytest.raises(ConfigError) as info:
        _parse(tmp_path, **sections)
    assert message in str(info.value)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.site_url: required key is missing"):
        parse('[server]\nlisten = "127.0.0.1:1"\n[storage]\ndata_dir = "v"\n', tmp_path)


def test_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(toml\)"):
        parse("[server\n", tmp_path)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_exit_codes(tmp_path: Path) -> None:
    """check-config exits 0 on a good file and 78 with the key's path on a bad one."""
    good = write_config(tmp_path / "good.toml", config_dict(tmp_path / "var", 1234))
    assert _run("check-config", "--config", str(good)).returncode == 0
    bad = write_config(
        tmp_path / "bad.toml", config_dict(tmp_path / "var", 1234, log={"level": "loud"})
    )
    result = _run("check-config", "--config", str(bad))
    assert result.returncode == EX_CONFIG
    assert "log.level" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_bad_config_exits_78(tmp_path: Path) -> None:
    """serve refuses a bad config with the same message and no traceback."""
    bad = write_config(
        tmp_path / "bad.toml", config_dict(tmp_path / "var", 1234, server={"listen": "nope"})
    )
    result = _run("serve", "--config", str(bad))
    assert result.returncode == EX_CONFIG
    assert "server.listen" in result.stderr and "Traceback" not in result.stderr
    missing = _run("serve", "--config", str(tmp_path / "absent.toml"))
    assert missing.returncode == EX_CONFIG and "cannot read" in missing.stderr


def test_token_command_prints_a_matching_digest() -> None:
    """`remoteclusterd token` prints a token and the config line for its digest."""
    result = _run("token")
    token, line = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(token) >= 40
    assert line == f'token_sha256 = "{sha256(token)}"'


def test_usage_error_exits_2() -> None:
    assert _run("frobnicate").returncode == 2


def _keys(struct: type, prefix: str = "") -> list[str]:
    keys = []
    for field in msgspec.structs.fields(struct):
        kind = field.type
        origin = getattr(kind, "__origin__", None)
        inner = kind.__args__[0] if origin is tuple else kind
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            keys += _keys(inner, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def test_example_config_shows_every_key() -> None:
    """config.example.toml documents every key the daemon accepts (set or commented out)."""
    text = (ROOT / "config.example.toml").read_text()
    sections = {
        line.strip().lstrip("# ").strip("[]")
        for line in text.splitlines()
        if line.lstrip("# ").startswith("[")
    }
    for key in _keys(Config):
        section, _, name = key.rpartition(".")
        assert section in sections, section
        assert f"\n{name} = " in text or f"\n# {name} = " in text, key
