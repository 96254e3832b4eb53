"""remoteclusterd: a standalone secure-connection transport daemon, wire-compatible with
Mattermost's remote clusters.

Layout (one module per concern; ``create_app`` in :mod:`daemon.app` wires them together):

* :mod:`daemon.cli`: the ``remoteclusterd`` command; :mod:`daemon.runtime` runs the server
  process (listener, signals, graceful shutdown).
* :mod:`daemon.config`: the strict TOML configuration; :mod:`daemon.settings` holds the live one.
* :mod:`daemon.logging`: structlog set-up, secret redaction.
* :mod:`daemon.errors`: the one error hierarchy; :mod:`daemon.middleware` maps it to JSON.
* :mod:`daemon.ids`, :mod:`daemon.models`: Mattermost ids, tokens and wire models.
* :mod:`daemon.store`, :mod:`daemon.migrations`: the SQLite store and its schema.
* :mod:`daemon.remotes`: remote clusters, durable and mirrored in memory.
* :mod:`daemon.invites`: invite code crypto; :mod:`daemon.links`: create/accept/confirm/delete.
* :mod:`daemon.auth`: operator and remote-cluster authentication, one middleware.
* :mod:`daemon.peers`: outbound calls to peers.
* :mod:`daemon.events`: lifecycle events for local applications.
* :mod:`daemon.handlers`: the HTTP handlers; :mod:`daemon.routes`: the route table with the
  policy of every route; :mod:`daemon.keys`: typed app and request keys.
"""

__version__ = "0.1.0"
