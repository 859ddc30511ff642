"""The one place that decides who may do what.

Every route declares what it needs (`Need`) where it is defined; `Access.authorize` is the
only code that compares that need with the caller's role. Refusals are audited here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pulumid.auth.principal import Principal
from pulumid.auth.rbac import Policy
from pulumid.auth.roles import Role
from pulumid.errors import Forbidden, Unauthorized
from pulumid.storage.records import StackRecord


@dataclass(frozen=True)
class Need:
    """What a route needs.

    scope: "public" (no credentials), "signed-in" (any access token), "site-admin",
    "org" (ROLE in the route's organization), "stack" (ROLE on the route's stack), or
    "update" (the update token of the route's own update, checked by the route itself).
    action: the audit name of what the route does ("" for reads and update traffic).
    """

    scope: str
    role: Role = Role.NONE
    action: str = ""


PUBLIC = Need("public")
SIGNED_IN = Need("signed-in")
UPDATE_TOKEN = Need("update")


def signed_in(action: str) -> Need:
    return Need("signed-in", action=action)


def site_admin(action: str = "") -> Need:
    return Need("site-admin", Role.ADMIN, action)


def org(role: Role, action: str = "") -> Need:
    return Need("org", role, action)


def stack(role: Role, action: str = "") -> Need:
    return Need("stack", role, action)


class PolicyHolder:
    """The policy in force; replaced whole on reload, so a request sees one or the other."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


class Access:
    def __init__(self, holder: PolicyHolder) -> None:
        self.holder = holder

    @property
    def policy(self) -> Policy:
        return self.holder.policy

    def decide(self, principal: Principal | None, need: Need, params: Mapping[str, str]) -> None:
        """Raise Unauthorized or Forbidden unless PRINCIPAL may do what NEED says here."""
        if need.scope in ("public", "update"):
            return
        if principal is None or principal.kind == "update":
            raise Unauthorized("Unauthorized: No credentials provided or are invalid.")
        if need.scope == "signed-in":
            return
        policy = self.policy
        if need.scope == "site-admin":
            if not policy.is_site_admin(principal):
                raise Forbidden(f"Forbidden: {principal.login} is not an administrator")
            return
        org_name = params.get("org", "")
        if need.scope == "org":
            role, target = policy.org_role(principal, org_name), f"organization {org_name}"
        else:
            project, name = params.get("project", ""), params.get("stack", "")
            role = policy.stack_role(principal, org_name, project, name)
            target = f"stack {org_name}/{project}/{name}"
        if role < need.role:
            raise Forbidden(
                f"Forbidden: {principal.login} has the {role.label} role on {target}; "
                f"this needs {need.role.label}"
            )

    def may_read_stack(self, principal: Principal, org: str, project: str, name: str) -> bool:
        return self.policy.stack_role(principal, org, project, name) >= Role.READ

    def readable(self, principal: Principal, stacks: Iterable[StackRecord]) -> list[StackRecord]:
        """The stacks PRINCIPAL may read. An organization without stack rules (or where the
        principal is an admin) is decided once, not per stack: a listing has thousands."""
        policy = self.policy
        # Per organization: True or False for all its stacks, None to ask per stack.
        whole: dict[str, bool | None] = {}
        kept = []
        for stack in stacks:
            org = stack.org
            if org not in whole:
                rules = policy.has_stack_rules(principal, org)
                whole[org] = None if rules else policy.org_role(principal, org) >= Role.READ
            verdict = whole[org]
            if verdict is None:
                verdict = self.may_read_stack(principal, org, stack.project, stack.name)
            if verdict:
                kept.append(stack)
        return kept
