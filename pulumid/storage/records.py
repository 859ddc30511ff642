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
