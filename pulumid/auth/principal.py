"""Who is calling: the one value that authentication produces and authorization reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from pulumid.auth.roles import Role


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    kind: "site" (the single-tenant token, admin everywhere), "user" (a person: signed in
    through a provider, a JWT, or one of their tokens), "exchange" (a CI job's token from the
    RFC 8693 exchange: the role its rule granted, in one organization), "update" (an update
    token: only the routes of its own update, checked by those routes).
    """

    kind: str
    login: str
    name: str = ""
    email: str = ""
    groups: frozenset[str] = frozenset()
    # Fixed roles by organization ("exchange" tokens); RBAC decides for the others.
    grants: dict[str, Role] = field(default_factory=dict)
    token_id: str = ""  # the stored token that authenticated it, if any
    token_name: str = ""
    expires: float = 0.0  # epoch seconds, 0: no expiry known
    update_token_hash: str = ""

    @property
    def site(self) -> bool:
        return self.kind == "site"
