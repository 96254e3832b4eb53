"""The schema, as an append-only list of migration scripts.

Step *n* (1-based) brings the database to ``PRAGMA user_version = n``. Never edit a step that
has shipped; add a new one. Scripts hold only ``;``-separated DDL without ``;`` in literals.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: remote clusters and the channels shared with them.
    """
    CREATE TABLE remote_clusters (
        remote_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        display_name TEXT NOT NULL,
        site_url TEXT NOT NULL,
        default_team_id TEXT NOT NULL DEFAULT '',
        create_at INTEGER NOT NULL,
        delete_at INTEGER NOT NULL DEFAULT 0,
        last_ping_at INTEGER NOT NULL DEFAULT 0,
        last_global_user_sync_at INTEGER NOT NULL DEFAULT 0,
        token_sha256 TEXT NOT NULL,
        remote_token TEXT NOT NULL DEFAULT '',
        topics TEXT NOT NULL DEFAULT '',
        creator_id TEXT NOT NULL,
        plugin_id TEXT NOT NULL DEFAULT '',
        options INTEGER NOT NULL DEFAULT 0,
        remote_team_id TEXT NOT NULL DEFAULT '',
        accepting INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE TABLE shared_channel_remotes (
        channel_id TEXT NOT NULL,
        remote_id TEXT NOT NULL REFERENCES remote_clusters (remote_id),
        create_at INTEGER NOT NULL,
        update_at INTEGER NOT NULL,
        delete_at INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (channel_id, remote_id)
    ) STRICT;
    CREATE INDEX shared_channel_remotes_remote ON shared_channel_remotes (remote_id)
    """,
    # 2: the liveness last announced for each remote, so transitions across restarts are seen.
    """
    ALTER TABLE remote_clusters ADD COLUMN online_announced INTEGER NOT NULL DEFAULT 0
    """,
    # 3: the outbox (messages for peers) and the inbox (final answers to peers' messages).
    """
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        msg_id TEXT NOT NULL UNIQUE,
        remote_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        create_at INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued'
            CHECK (state IN ('queued', 'delivered', 'rejected', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        response BLOB,
        update_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX outbox_queue ON outbox (remote_id, state, seq);
    CREATE INDEX outbox_done ON outbox (state, update_at);
    CREATE TABLE inbox (
        remote_id TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        status TEXT NOT NULL,
        err TEXT NOT NULL,
        payload BLOB NOT NULL,
        answered_at INTEGER NOT NULL,
        PRIMARY KEY (remote_id, msg_id)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX inbox_answered ON inbox (answered_at)
    """,
    # 4: upload sessions peers opened here, and files this daemon sends.
    """
    CREATE TABLE uploads_in (
        upload_id TEXT PRIMARY KEY,
        remote_id TEXT NOT NULL,
        type TEXT NOT NULL,
        user_id TEXT NOT NULL,
        channel_id TEXT NOT NULL,
        filename TEXT NOT NULL,
        file_size INTEGER NOT NULL,
        committed INTEGER NOT NULL DEFAULT 0,
        req_file_id TEXT NOT NULL,
        create_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'receiving' CHECK (state IN ('receiving', 'complete')),
        file_info BLOB,
        update_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX uploads_in_state ON uploads_in (state, expires_at);
    CREATE TABLE uploads_out (
        upload_id TEXT PRIMARY KEY,
        file_id TEXT NOT NULL,
        remote_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        filename TEXT NOT NULL,
        channel_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        size INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued'
            CHECK (state IN ('queued', 'sending', 'completed', 'rejected', 'dead')),
        session_created INTEGER NOT NULL DEFAULT 0,
        sent INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        file_info BLOB,
        create_at INTEGER NOT NULL,
        update_at INTEGER NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX uploads_out_file ON uploads_out (remote_id, file_id);
    CREATE INDEX uploads_out_queue ON uploads_out (remote_id, state, create_at)
    """,
)
