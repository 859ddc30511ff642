"""What every Store implementation shares: columns, rows to records, the lease rules.

The SQL dialects differ (placeholders, upserts, locks); the rules and messages must not.
"""

from __future__ import annotations

import json
from typing import Any

from pulumid.auth.tokens import same
from pulumid.errors import Conflict, Forbidden
from pulumid.storage.records import (
    AuditRecord,
    IdentityRecord,
    RetentionRules,
    StackRecord,
    TokenRecord,
    UpdateRecord,
)

STACK_HAS_RESOURCES = "Bad Request: Stack still contains resources."
ANOTHER_UPDATE = "Conflict: Another update is currently in progress."
STORAGE_FAILED = "Service Unavailable: the database could not complete the request; try again"

STACK_COLUMNS = (
    "id, org, project, name, version, locked_by, last_update, resource_count, "
    "last_update_time, created"
)
UPDATE_COLUMNS = (
    "id, stack_id, kind, dry_run, status, version, program, config, metadata, created, "
    "token_hash, lease_expires, start_time, end_time, resource_changes, journal_version, "
    "requested_by, engine_version, checkpoint_seq, failure"
)
UPDATE_COLUMN_COUNT = UPDATE_COLUMNS.count(",") + 1
IDENTITY_COLUMNS = "login, name, email, groups, provider, created, checked, refresh_token, disabled"
TOKEN_COLUMNS = "id, token_hash, login, kind, description, created, expires, last_used, org, role"
# Without `id`, which the database assigns: what an insert names.
AUDIT_INSERT_COLUMNS = (
    "time, org, actor, action, resource, status, client_ip, description, auth_failure"
)
AUDIT_COLUMNS = "id, " + AUDIT_INSERT_COLUMNS


def placeholders(columns: str) -> str:
    """`?, ?, ...`: one for each of COLUMNS (a comma-separated list)."""
    return ", ".join("?" * (columns.count(",") + 1))


def stack_from_row(row: tuple[Any, ...], tags: dict[str, str]) -> StackRecord:
    return StackRecord(
        id=row[0],
        org=row[1],
        project=row[2],
        name=row[3],
        tags=tags,
        version=row[4],
        locked_by=row[5],
        last_update=row[6],
        resource_count=row[7],
        last_update_time=row[8],
        created=row[9],
    )


def update_from_row(row: tuple[Any, ...]) -> UpdateRecord:
    return UpdateRecord(
        id=row[0],
        stack_id=row[1],
        kind=row[2],
        dry_run=bool(row[3]),
        status=row[4],
        version=row[5],
        program=json.loads(row[6]),
        config=json.loads(row[7]),
        metadata=json.loads(row[8]),
        created=row[9],
        token_hash=row[10],
        lease_expires=row[11],
        start_time=row[12],
        end_time=row[13],
        resource_changes=json.loads(row[14]) if row[14] else None,
        journal_version=row[15],
        requested_by=row[16],
        engine_version=row[17],
        checkpoint_seq=row[18],
        failure=row[19],
    )


def update_values(update: UpdateRecord, *, status: str, version: int) -> tuple[Any, ...]:
    """The values of UPDATE_COLUMNS for inserting `update` with this status and version."""
    return (
        update.id,
        update.stack_id,
        update.kind,
        bool(update.dry_run),
        status,
        version,
        json.dumps(update.program),
        json.dumps(update.config),
        json.dumps(update.metadata),
        update.created,
        update.token_hash,
        update.lease_expires,
        update.start_time,
        update.end_time,
        json.dumps(update.resource_changes) if update.resource_changes is not None else None,
        update.journal_version,
        update.requested_by,
        update.engine_version,
        update.checkpoint_seq,
        update.failure,
    )


def identity_from_row(row: tuple[Any, ...]) -> IdentityRecord:
    return IdentityRecord(
        login=row[0],
        name=row[1],
        email=row[2],
        groups=tuple(json.loads(row[3])),
        provider=row[4],
        created=row[5],
        checked=row[6],
        refresh_token=None if row[7] is None else bytes(row[7]),
        disabled=bool(row[8]),
    )


def identity_values(identity: IdentityRecord) -> tuple[Any, ...]:
    """The values of IDENTITY_COLUMNS; groups are kept as a JSON array."""
    return (
        identity.login,
        identity.name,
        identity.email,
        json.dumps(list(identity.groups)),
        identity.provider,
        identity.created,
        identity.checked,
        identity.refresh_token,
        bool(identity.disabled),
    )


def token_from_row(row: tuple[Any, ...]) -> TokenRecord:
    return TokenRecord(
        id=row[0],
        token_hash=row[1],
        login=row[2],
        kind=row[3],
        description=row[4],
        created=row[5],
        expires=row[6],
        last_used=row[7],
        org=row[8],
        role=row[9],
    )


def token_values(token: TokenRecord) -> tuple[Any, ...]:
    """The values of TOKEN_COLUMNS."""
    return (
        token.id,
        token.token_hash,
        token.login,
        token.kind,
        token.description,
        token.created,
        token.expires,
        token.last_used,
        token.org,
        token.role,
    )


def audit_from_row(row: tuple[Any, ...]) -> AuditRecord:
    return AuditRecord(
        id=row[0],
        time=row[1],
        org=row[2],
        actor=row[3],
        action=row[4],
        resource=row[5],
        status=row[6],
        client_ip=row[7],
        description=row[8],
        auth_failure=bool(row[9]),
    )


def audit_values(event: AuditRecord) -> tuple[Any, ...]:
    """The values of AUDIT_INSERT_COLUMNS (the event's id is the database's to assign)."""
    return (
        event.time,
        event.org,
        event.actor,
        event.action,
        event.resource,
        event.status,
        event.client_ip,
        event.description,
        bool(event.auth_failure),
    )


def check_lease(update: UpdateRecord | None, token_hash: str, now: float) -> UpdateRecord:
    """The update, if `token_hash` holds its live lease; else Forbidden or Conflict."""
    if update is None or not update.token_hash or not same(update.token_hash, token_hash):
        raise Forbidden("Forbidden: the update token is not valid for this update")
    if update.status != "running":
        raise Conflict(not_running_message(update.status))
    if (update.lease_expires or 0) <= now:
        raise Forbidden("Forbidden: the update's lease has expired")
    return update


def check_writable(update: UpdateRecord | None, token_hash: str, now: float) -> UpdateRecord:
    update = check_lease(update, token_hash, now)
    if update.dry_run:
        raise Forbidden(
            "Forbidden: Updating the checkpoint is not permitted for preview operations."
        )
    return update


def check_checkpointing(update: UpdateRecord | None, token_hash: str, now: float) -> UpdateRecord:
    update = check_writable(update, token_hash, now)
    if update.journal_version:
        # Its journal is replayed onto version N as it was at start: a checkpoint would
        # replace that base under the replayer.
        raise Conflict("Conflict: this update sends journal entries, not checkpoints")
    return update


def not_running_message(status: str) -> str:
    return {
        "not-started": "Conflict: The Update has not started",
        "cancelled": "Conflict: The Update has been cancelled",
        "failed": "Conflict: The Update has already completed",
        "succeeded": "Conflict: The Update has already completed",
    }.get(status, "Conflict: The Update is not in progress.")


_ENDED = "status NOT IN ('running', 'not-started')"
# kind -> (the rule's field, the DELETE with {p} for the dialect's placeholder)
_RETENTION = {
    "events": (
        "events_before",
        f"DELETE FROM events WHERE update_id IN (SELECT id FROM updates WHERE {_ENDED} "
        "AND end_time < {p})",
    ),
    "previews": (
        "previews_before",
        f"DELETE FROM updates WHERE dry_run = TRUE AND {_ENDED} AND end_time < {{p}}",
    ),
    # The update that made the current version stays: the stack points at it.
    "updates": (
        "updates_before",
        f"DELETE FROM updates WHERE {_ENDED} AND end_time < {{p}} AND id NOT IN "
        "(SELECT last_update FROM stacks WHERE last_update IS NOT NULL)",
    ),
    "unstarted": (
        "unstarted_before",
        "DELETE FROM updates WHERE status = 'not-started' AND created < {p}",
    ),
    # Claims of timed work that ran out long ago (their names are not reused).
    "claims": ("claims_before", "DELETE FROM claims WHERE until < {p}"),
    # Access tokens past their expiry (0: never expires).
    "tokens": (
        "tokens_expired_before",
        "DELETE FROM access_tokens WHERE expires > 0 AND expires < {p}",
    ),
    "audit": ("audit_before", "DELETE FROM audit_events WHERE time < {p}"),
}
# What prune() counts, every kind present even when its rule is not set.
RETENTION_KINDS = tuple(_RETENTION)


def retention_deletes(rules: RetentionRules, placeholder: str) -> list[tuple[str, str, float]]:
    """(kind, statement, cut-off) for each rule that is set, in one order for every store."""
    deletes = []
    for kind, (field, statement) in _RETENTION.items():
        cutoff = getattr(rules, field)
        if cutoff is not None:
            deletes.append((kind, statement.format(p=placeholder), cutoff))
    return deletes


# Blob references are stored in these columns in place of the bytes they name.
BLOB_COLUMNS = (("states", "data"), ("journal_batches", "body"), ("checkpoint_deltas", "body"))

CLAIMS_TABLE = """
    CREATE TABLE claims (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until DOUBLE PRECISION NOT NULL
    )
"""


def claim_statement(placeholder: str) -> str:
    """Insert or take over a claim unless another holder's is live; returns a row if taken.
    Parameters: name, holder, until, holder, now."""
    p = placeholder
    return (
        f"INSERT INTO claims (name, holder, until) VALUES ({p}, {p}, {p}) "
        "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until "
        f"WHERE claims.holder = {p} OR claims.until <= {p} RETURNING holder"
    )
