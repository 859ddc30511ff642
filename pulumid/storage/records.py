"""Value types that cross the storage seam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StackRef:
    org: str
    project: str
    name: str

    def __str__(self) -> str:
        return f"{self.org}/{self.project}/{self.name}"


@dataclass(frozen=True)
class StackRecord:
    id: int
    org: str
    project: str
    name: str
    tags: dict[str, str]
    version: int
    # The running real update that holds the stack, if any.
    locked_by: str | None
    # The newest update of any kind, for `pulumi cancel` and history links.
    last_update: str | None
    resource_count: int | None
    last_update_time: int | None
    created: int

    @property
    def ref(self) -> StackRef:
        return StackRef(self.org, self.project, self.name)


@dataclass(frozen=True)
class StateBlob:
    """One stored UntypedDeployment: gzip-compressed JSON text, kept byte for byte."""

    gzipped: bytes
    resource_count: int


@dataclass(frozen=True)
class UpdateRecord:
    id: str
    stack_id: int
    kind: str
    dry_run: bool
    status: str  # not-started | running | succeeded | failed | cancelled
    version: int
    program: dict[str, Any]
    config: dict[str, Any]
    metadata: dict[str, Any]
    created: float
    # Only the hash of the update token is stored; `token` is set on the record that
    # start_update returns, the one time the plaintext exists.
    token_hash: str | None = None
    token: str | None = None
    lease_expires: float | None = None
    start_time: float | None = None
    end_time: float | None = None
    resource_changes: dict[str, int] | None = None
    journal_version: int = 0
    requested_by: str = ""
    engine_version: str = ""
    # Sequence number of the last checkpoint (verbatim or delta) this update saved.
    checkpoint_seq: int = 0
    # Why the server ended the update (e.g. its final state could not be built), if it did.
    failure: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    sequence: int
    data: bytes


@dataclass(frozen=True)
class RetentionRules:
    """Cut-off times (epoch seconds) before which ended things are deleted; None keeps all."""

    events_before: float | None = None
    previews_before: float | None = None
    updates_before: float | None = None
    unstarted_before: float | None = None
    claims_before: float | None = None
    # Tokens whose expiry (non-zero) is before this; audit events older than this.
    tokens_expired_before: float | None = None
    audit_before: float | None = None


@dataclass(frozen=True)
class IdentityRecord:
    """A person (or machine) known from a sign-in: who they are and their groups then.

    `refresh_token` is the identity provider's refresh token, encrypted with the master key
    (None when the mode has none); `checked` is when the provider last vouched for them.
    """

    login: str
    name: str
    email: str
    groups: tuple[str, ...]
    provider: str  # single-tenant | oidc | google | jwt | exchange
    created: float
    checked: float
    refresh_token: bytes | None = None
    disabled: bool = False


@dataclass(frozen=True)
class TokenRecord:
    """An access token: only its SHA-256 is stored.

    kind: personal (made by a user), cli (minted by the browser login), exchange (RFC 8693).
    `expires` is epoch seconds, 0 when it never expires. Exchanged tokens carry the
    organization and role their rule granted; the others act as their identity.
    """

    id: str
    token_hash: str
    login: str
    kind: str
    description: str
    created: float
    expires: float = 0.0
    last_used: float = 0.0
    org: str = ""
    role: str = ""


@dataclass(frozen=True)
class AuditRecord:
    """One audited action. `id` is assigned by the store (0 before it is stored)."""

    time: float
    org: str
    actor: str
    action: str
    resource: str
    status: int
    client_ip: str
    description: str = ""
    auth_failure: bool = False
    id: int = 0


@dataclass(frozen=True)
class WrappedKey:
    """A data key as stored: encrypted by the keyring's key KEY_ID ('' : the master key of
    databases from before key ids, adopted at start)."""

    key_id: str
    wrapped: bytes
