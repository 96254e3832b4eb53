"""The live configuration: a holder whose frozen :class:`~daemon.config.Config` can be swapped.

Components read ``settings.config`` when they need a value instead of keeping copies, so a
reload (SIGHUP) takes effect by replacing one reference. The config object itself never changes.
"""

from __future__ import annotations

from daemon.config import Config


class Settings:
    """Holds the current configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def offline_after_ms(self) -> int:
        """``heartbeat.offline_after`` in milliseconds."""
        return int(self.config.heartbeat.offline_after * 1000)
