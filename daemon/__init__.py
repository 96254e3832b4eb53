"""remoteclusterd: a standalone secure-connection transport daemon, wire-compatible with
Mattermost's remote clusters.

Layout (one module per concern; ``create_app`` in :mod:`daemon.app` wires them together):

* Process and configuration: :mod:`~daemon.cli` (the ``remoteclusterd`` command),
  :mod:`~daemon.opscli` and :mod:`~daemon.opsclient` (operator commands and their client),
  :mod:`~daemon.runtime` (listener, signals, systemd, reload, shutdown), :mod:`~daemon.systemd`
  (sd_notify), :mod:`~daemon.config` (strict TOML), :mod:`~daemon.settings` (the live config),
  :mod:`~daemon.logging` (structlog, redaction), :mod:`~daemon.metrics` (Prometheus),
  :mod:`~daemon.tasks` (background tasks without a request's context, janitors, work that
  outlives a cancelled request).
* HTTP: :mod:`~daemon.routes` (every route and its policy), :mod:`~daemon.middleware`
  (request context, the one error mapping, authentication), :mod:`~daemon.auth` (policies and
  operators), :mod:`~daemon.handlers` (thin handlers), :mod:`~daemon.keys` (typed app keys),
  :mod:`~daemon.errors` (the one error hierarchy).
* Data: :mod:`~daemon.ids` (ids, tokens), :mod:`~daemon.models` (wire models and their
  checks), :mod:`~daemon.store` and :mod:`~daemon.migrations` (SQLite), :mod:`~daemon.remotes`
  (remote clusters, mirrored in memory), :mod:`~daemon.filestore` (files from validated ids).
* Links: :mod:`~daemon.invites` (invite crypto), :mod:`~daemon.links` (create, accept,
  confirm, delete), :mod:`~daemon.peers` and :mod:`~daemon.httplite` (outbound calls; the
  lean client for small JSON POSTs), :mod:`~daemon.heartbeat` (pings and liveness),
  :mod:`~daemon.events` (lifecycle events).
* Messages: :mod:`~daemon.inbound` (routing to local applications, answers given once),
  :mod:`~daemon.outbox` (durable, ordered delivery), :mod:`~daemon.delivery` (what a peer's
  answer means, the backoff).
* Files: :mod:`~daemon.filemodels` (UploadSession, FileInfo), :mod:`~daemon.upload_sessions`
  (peers opening sessions), :mod:`~daemon.uploads` and :mod:`~daemon.appender` (receiving,
  resumable), :mod:`~daemon.filesend` and :mod:`~daemon.transfer` (sending),
  :mod:`~daemon.images` (profile images).
* Delivery to peers: :mod:`~daemon.workers` (one worker per remote, for the outbox and the file
  sender).
"""

__version__ = "0.1.0"
