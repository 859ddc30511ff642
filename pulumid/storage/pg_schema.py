"""PostgreSQL schema, versioned: each entry migrates from the previous version.

An entry is an SQL script (several statements, no parameters) or a function for steps that
need Python. Version 1 is the SQLite schema at its version 3, in PostgreSQL types: BIGINT for
integers, DOUBLE PRECISION for times, BOOLEAN for flags, BYTEA for blobs, JSON kept as TEXT.
Migrations run in one transaction under an advisory lock (see postgres.migrate), so only one
node migrates at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from pulumid.storage.rows import CLAIMS_TABLE

# pg_advisory_xact_lock key held while migrating: "pulumid" in ASCII.
MIGRATION_LOCK = 0x70756C756D6964

MIGRATIONS: list[str | Callable[[psycopg.Connection[Any]], None]] = [
    # 1: initial schema (SQLite's version 3)
    """
    CREATE TABLE stacks (
        id BIGSERIAL PRIMARY KEY,
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        version BIGINT NOT NULL DEFAULT 0,
        locked_by TEXT,
        last_update TEXT,
        resource_count BIGINT,
        last_update_time BIGINT,
        created BIGINT NOT NULL,
        UNIQUE (org, project, name)
    );
    CREATE TABLE stack_tags (
        stack_id BIGINT NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (stack_id, name)
    );
    CREATE INDEX stack_tags_by_name ON stack_tags (name, value);
    -- Old names of renamed stacks: state written before a rename still addresses them.
    CREATE TABLE stack_aliases (
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        name TEXT NOT NULL,
        stack_id BIGINT NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        PRIMARY KEY (org, project, name)
    );
    -- PostgreSQL does not index referencing columns: the cascade from stacks needs it.
    CREATE INDEX stack_aliases_by_stack ON stack_aliases (stack_id);
    CREATE TABLE stack_keys (
        stack_id BIGINT PRIMARY KEY REFERENCES stacks(id) ON DELETE CASCADE,
        wrapped BYTEA NOT NULL
    );
    CREATE TABLE states (
        stack_id BIGINT NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        version BIGINT NOT NULL,
        data BYTEA NOT NULL,
        resource_count BIGINT NOT NULL,
        PRIMARY KEY (stack_id, version)
    );
    CREATE TABLE updates (
        id TEXT PRIMARY KEY,
        stack_id BIGINT NOT NULL REFERENCES stacks(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        dry_run BOOLEAN NOT NULL,
        status TEXT NOT NULL,
        version BIGINT NOT NULL,
        program TEXT NOT NULL,
        config TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        token_hash TEXT,
        lease_expires DOUBLE PRECISION,
        start_time DOUBLE PRECISION,
        end_time DOUBLE PRECISION,
        resource_changes TEXT,
        journal_version BIGINT NOT NULL DEFAULT 0,
        requested_by TEXT NOT NULL DEFAULT '',
        engine_version TEXT NOT NULL DEFAULT '',
        checkpoint_seq BIGINT NOT NULL DEFAULT 0,
        failure TEXT
    );
    CREATE INDEX updates_history ON updates (stack_id, dry_run, version);
    CREATE INDEX updates_running ON updates (status, lease_expires);
    CREATE INDEX updates_token ON updates (token_hash);
    -- Retention sweeps find ended updates by age.
    CREATE INDEX updates_ended ON updates (end_time);
    CREATE TABLE events (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (update_id, seq)
    );
    -- Journal entry batches as the CLI sent them (gzip bytes): replayed after a restart.
    CREATE TABLE journal_batches (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        batch BIGINT NOT NULL,
        body BYTEA NOT NULL,
        PRIMARY KEY (update_id, batch)
    );
    -- Delta checkpoint requests since the update's last full state, in sequence order.
    CREATE TABLE checkpoint_deltas (
        update_id TEXT NOT NULL REFERENCES updates(id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        body BYTEA NOT NULL,
        PRIMARY KEY (update_id, seq)
    );
    """,
    # 2: timed work claimed by one node at a time
    CLAIMS_TABLE,
    # 3: identities, access tokens and the audit trail (SQLite's version 5)
    """
    -- Who signed in: their groups then (a JSON array), the provider's encrypted refresh token.
    CREATE TABLE identities (
        login TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        email TEXT NOT NULL,
        groups TEXT NOT NULL,
        provider TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        checked DOUBLE PRECISION NOT NULL,
        refresh_token BYTEA,
        disabled BOOLEAN NOT NULL DEFAULT FALSE
    );
    -- Access tokens, kept as the SHA-256 of the token only (expires 0: never).
    CREATE TABLE access_tokens (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        login TEXT NOT NULL,
        kind TEXT NOT NULL,
        description TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_used DOUBLE PRECISION NOT NULL DEFAULT 0,
        org TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX access_tokens_by_login ON access_tokens (login);
    CREATE TABLE audit_events (
        id BIGSERIAL PRIMARY KEY,
        time DOUBLE PRECISION NOT NULL,
        org TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        resource TEXT NOT NULL,
        status INTEGER NOT NULL,
        client_ip TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        auth_failure BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX audit_events_by_org ON audit_events (org, id);
    -- Retention sweeps find old events by age.
    CREATE INDEX audit_events_by_time ON audit_events (time);
    """,
    # v4: which key wraps each stack's data key ('' : the master key of before key ids).
    """
    ALTER TABLE stack_keys ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX stack_keys_by_key ON stack_keys (key_id, stack_id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
