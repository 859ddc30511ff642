"""SQLite schema, versioned: each entry migrates from the previous version.

An entry is an SQL script, or a function for steps that need Python (e.g. hashing).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from pulumid.auth.tokens import hash_token
from pulumid.storage.rows import CLAIMS_TABLE


def _v3_hashed_tokens_and_failures(conn: sqlite3.Connection) -> None:
    """Update tokens are kept as hashes only; updates the server ended say why."""
    conn.execute("ALTER TABLE updates ADD COLUMN token_hash TEXT")
    conn.execute("ALTER TABLE updates ADD COLUMN failure TEXT")
    rows = conn.execute("SELECT id, token FROM updates WHERE token IS NOT NULL").fetchall()
    conn.executemany(
        "UPDATE updates SET token_hash = ? WHERE id = ?",
        [(hash_token(token), update_id) for update_id, token in rows],
    )
    conn.execute("ALTER TABLE updates DROP COLUMN token")
    conn.execute("CREATE INDEX updates_token ON updates (token_hash)")
    # Retention sweeps find ended updates by age.
    conn.execute("CREATE INDEX updates_ended ON updates (end_time)")


MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    # 1: initial schema
    """
    CREATE TABLE stacks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL DEFAULT 0,
        locked_by TEXT,
        last_update TEXT,
        resource_count INTEGER,
        last_update_time INTEGER,
        created INTEGER NOT NULL,
        UNIQUE (org, project, name)
    );
    CREATE TABLE stack_tags (
        stack_id INTEGER NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (stack_id, name)
    ) WITHOUT ROWID;
    CREATE INDEX stack_tags_by_name ON stack_tags (name, value);
    -- Old names of renamed stacks: state written before a rename still addresses them.
    CREATE TABLE stack_aliases (
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        stack_id INTEGER NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        PRIMARY KEY (org, project, name)
    );
    CREATE TABLE stack_keys (
        stack_id INTEGER PRIMARY KEY REFERENCES stacks(id) ON DELETE CASCADE,
        wrapped BLOB NOT NULL
    );
    CREATE TABLE states (
        stack_id INTEGER NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        data BLOB NOT NULL,
        resource_count INTEGER NOT NULL,
        PRIMARY KEY (stack_id, version)
    );
    CREATE TABLE updates (
        id TEXT PRIMARY KEY,
        stack_id INTEGER NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        dry_run INTEGER NOT NULL,
        status TEXT NOT NULL,
        version INTEGER NOT NULL,
        program TEXT NOT NULL,
        config TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created REAL NOT NULL,
        token TEXT,
        lease_expires REAL,
        start_time REAL,
        end_time REAL,
        resource_changes TEXT,
        journal_version INTEGER NOT NULL DEFAULT 0,
        requested_by TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX updates_history ON updates (stack_id, dry_run, version);
    CREATE INDEX updates_running ON updates (status, lease_expires);
    CREATE TABLE events (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (update_id, seq)
    ) WITHOUT ROWID;
    """,
    # 2: journaling and delta checkpoints
    """
    ALTER TABLE updates ADD COLUMN engine_version TEXT NOT NULL DEFAULT '';
    ALTER TABLE updates ADD COLUMN checkpoint_seq INTEGER NOT NULL DEFAULT 0;
    -- Journal entry batches as the CLI sent them (gzip bytes): replayed after a restart.
    CREATE TABLE journal_batches (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        batch INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (update_id, batch)
    ) WITHOUT ROWID;
    -- Delta checkpoint requests since the update's last full state, in sequence order.
    CREATE TABLE checkpoint_deltas (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (update_id, seq)
    ) WITHOUT ROWID;
    """,
    # 3: hashed update tokens, the reason an update was ended by the server
    _v3_hashed_tokens_and_failures,
    # 4: timed work claimed by one node at a time
    CLAIMS_TABLE,
    # 5: identities, access tokens and the audit trail
    """
    -- Who signed in: their groups then (a JSON array), the provider's encrypted refresh token.
    CREATE TABLE identities (
        login TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        email TEXT NOT NULL,
        groups TEXT NOT NULL,
        provider TEXT NOT NULL,
        created REAL NOT NULL,
        checked REAL NOT NULL,
        refresh_token BLOB,
        disabled INTEGER NOT NULL DEFAULT 0
    );
    -- Access tokens, kept as the SHA-256 of the token only (expires 0: never).
    CREATE TABLE access_tokens (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        login TEXT NOT NULL,
        kind TEXT NOT NULL,
        description TEXT NOT NULL,
        created REAL NOT NULL,
        expires REAL NOT NULL DEFAULT 0,
        last_used REAL NOT NULL DEFAULT 0,
        org TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX access_tokens_by_login ON access_tokens (login);
    -- AUTOINCREMENT: an id is never handed out twice, so pages (before an id) stay stable.
    CREATE TABLE audit_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        org TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        resource TEXT NOT NULL,
        status INTEGER NOT NULL,
        client_ip TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        auth_failure INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX audit_events_by_org ON audit_events (org, id);
    -- Retention sweeps find old events by age.
    CREATE INDEX audit_events_by_time ON audit_events (time);
    """,
    # v6: which key wraps each stack's data key ('' : the master key of before key ids,
    # adopted at the next start), so keys can be rotated while the daemon serves.
    """
    ALTER TABLE stack_keys ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX stack_keys_by_key ON stack_keys (key_id, stack_id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
