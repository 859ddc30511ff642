"""The RBAC file: who holds which role in each organization and on which stacks.

Roles come from the identity's login or email (`users`) and its provider groups (`groups`);
the highest match wins, else the organization's `default_role`. Stack rules (`stacks`, globs
over "org/project/stack", first match wins) replace the organization role on the stacks they
match, except that organization admins stay admins. Site `admins` are admins everywhere and
may manage anyone's tokens. `token_exchange` lists the issuers whose tokens CI jobs may trade
for a short-lived pulumid token (see pulumid.auth.exchange).

The file is read at start and again on SIGHUP: a file that does not parse keeps the old policy
in force (and says why in the log).
"""

from __future__ import annotations

import fnmatch
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from twisted.application import service
from twisted.logger import Logger

from pulumid.auth.principal import Principal
from pulumid.auth.roles import Role


class PolicyError(ValueError):
    """The RBAC file is missing, unreadable or invalid; the message says where."""


@dataclass(frozen=True)
class Grants:
    """Roles by user (login or email, lower case) and by group, with a fallback."""

    users: Mapping[str, Role] = field(default_factory=dict)
    groups: Mapping[str, Role] = field(default_factory=dict)
    default: Role | None = None

    def match(self, principal: Principal) -> Role | None:
        """The highest role that names this principal, else the default (None if unset)."""
        names = {n.lower() for n in (principal.login, principal.email) if n}
        found = [role for key, role in self.users.items() if key in names]
        found += [role for group, role in self.groups.items() if group in principal.groups]
        return max(found) if found else self.default


@dataclass(frozen=True)
class StackRule:
    pattern: str
    grants: Grants

    def covers(self, org: str, project: str, stack: str) -> bool:
        return fnmatch.fnmatchcase(f"{org}/{project}/{stack}", self.pattern)


@dataclass(frozen=True)
class Organization:
    name: str
    grants: Grants
    stacks: tuple[StackRule, ...] = ()


@dataclass(frozen=True)
class ExchangeRule:
    organization: str
    role: Role
    subject: str = "*"  # glob over the token's `sub`
    claims: Mapping[str, str] = field(default_factory=dict)  # exact matches
    max_lifetime: float = 3600.0

    def admits(self, claims: Mapping[str, Any]) -> bool:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not fnmatch.fnmatchcase(subject, self.subject):
            return False
        return all(str(claims.get(name)) == value for name, value in self.claims.items())


@dataclass(frozen=True)
class TrustedIssuer:
    issuer: str
    audience: str
    rules: tuple[ExchangeRule, ...]
    jwks_url: str = ""  # empty: from the issuer's discovery document


@dataclass(frozen=True)
class Policy:
    organizations: Mapping[str, Organization] = field(default_factory=dict)
    admins: Grants = field(default_factory=Grants)
    issuers: tuple[TrustedIssuer, ...] = ()

    # -- decisions ------------------------------------------------------------------------

    def is_site_admin(self, principal: Principal) -> bool:
        # Only people: an exchanged token's name is chosen by the job that asked for it.
        if principal.kind != "user":
            return principal.site
        return self.admins.match(principal) == Role.ADMIN

    def org_role(self, principal: Principal, org: str) -> Role:
        if self.is_site_admin(principal):
            return Role.ADMIN
        if principal.kind == "exchange":
            return principal.grants.get(org, Role.NONE)
        entry = self.organizations.get(org)
        if entry is None:
            return Role.NONE
        return entry.grants.match(principal) or Role.NONE

    def stack_role(self, principal: Principal, org: str, project: str, stack: str) -> Role:
        role = self.org_role(principal, org)
        if role == Role.ADMIN or principal.kind == "exchange":
            return role
        entry = self.organizations.get(org)
        for rule in entry.stacks if entry else ():
            if rule.covers(org, project, stack):
                matched = rule.grants.match(principal)
                return role if matched is None else matched
        return role

    def has_stack_rules(self, principal: Principal, org: str) -> bool:
        """Whether a stack's role in ORG can differ from the principal's role on ORG."""
        if principal.kind == "exchange" or self.org_role(principal, org) == Role.ADMIN:
            return False
        entry = self.organizations.get(org)
        return bool(entry and entry.stacks)

    def organizations_of(self, principal: Principal) -> list[str]:
        """Organizations where the principal may read something, in file order."""
        if principal.kind == "exchange":
            return [org for org, role in principal.grants.items() if role >= Role.READ]
        names = []
        for name, entry in self.organizations.items():
            if self.org_role(principal, name) >= Role.READ or any(
                (rule.grants.match(principal) or Role.NONE) >= Role.READ for rule in entry.stacks
            ):
                names.append(name)
        return names


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(f"cannot read the RBAC file {path}: {e.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{path}: not valid YAML: {e}") from None
    try:
        return parse_policy(document or {})
    except ValueError as e:
        raise PolicyError(f"{path}: {e}") from None


def parse_policy(document: Any) -> Policy:
    _mapping(document, "the file", {"organizations", "admins", "token_exchange"})
    orgs = {}
    for name, body in _mapping(document.get("organizations") or {}, "organizations").items():
        where = f"organizations.{name}"
        body = _mapping(body or {}, where, {"default_role", "users", "groups", "stacks"})
        rules = tuple(
            StackRule(
                _text(_mapping(rule, f"{where}.stacks[{i}]").get("match"), f"{where}.stacks[{i}]"),
                _grants(rule, f"{where}.stacks[{i}]", extra={"match"}),
            )
            for i, rule in enumerate(_sequence(body.get("stacks") or [], f"{where}.stacks"))
        )
        orgs[str(name)] = Organization(str(name), _grants(body, where, extra={"stacks"}), rules)
    admins = _mapping(document.get("admins") or {}, "admins", {"users", "groups"})
    site = Grants(
        users={u.lower(): Role.ADMIN for u in _strings(admins.get("users") or [], "admins.users")},
        groups=dict.fromkeys(_strings(admins.get("groups") or [], "admins.groups"), Role.ADMIN),
    )
    issuers = tuple(
        _issuer(entry, f"token_exchange[{i}]")
        for i, entry in enumerate(_sequence(document.get("token_exchange") or [], "token_exchange"))
    )
    return Policy(orgs, site, issuers)


def _issuer(entry: Any, where: str) -> TrustedIssuer:
    entry = _mapping(entry, where, {"issuer", "audience", "jwks_url", "rules"})
    rules = []
    for i, rule in enumerate(_sequence(entry.get("rules") or [], f"{where}.rules")):
        at = f"{where}.rules[{i}]"
        rule = _mapping(rule, at, {"organization", "role", "subject", "claims", "max_lifetime"})
        claims = _mapping(rule.get("claims") or {}, f"{at}.claims")
        lifetime = rule.get("max_lifetime", 3600)
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            raise ValueError(f"{at}.max_lifetime: must be a positive number of seconds")
        rules.append(
            ExchangeRule(
                organization=_text(rule.get("organization"), f"{at}.organization"),
                role=Role.parse(rule.get("role"), f"{at}.role"),
                subject=_text(rule.get("subject", "*"), f"{at}.subject"),
                claims={str(k): str(v) for k, v in claims.items()},
                max_lifetime=float(lifetime),
            )
        )
    if not rules:
        raise ValueError(f"{where}: at least one rule is needed")
    return TrustedIssuer(
        issuer=_text(entry.get("issuer"), f"{where}.issuer"),
        audience=_text(entry.get("audience"), f"{where}.audience"),
        rules=tuple(rules),
        jwks_url=str(entry.get("jwks_url") or ""),
    )


def _grants(body: Mapping[str, Any], where: str, extra: Iterable[str] = ()) -> Grants:
    _mapping(body, where, {"default_role", "users", "groups", *extra})
    users = _mapping(body.get("users") or {}, f"{where}.users")
    groups = _mapping(body.get("groups") or {}, f"{where}.groups")
    default = body.get("default_role")
    for key in users:
        _text(key, f"{where}.users: a name")
    for key in groups:
        _text(key, f"{where}.groups: a name")
    return Grants(
        users={str(k).lower(): Role.parse(v, f"{where}.users.{k}") for k, v in users.items()},
        groups={str(k): Role.parse(v, f"{where}.groups.{k}") for k, v in groups.items()},
        default=None if default is None else Role.parse(default, f"{where}.default_role"),
    )


def _mapping(value: Any, where: str, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping")
    if allowed is not None:
        unknown = sorted(set(map(str, value)) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    return value


def _sequence(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list")
    return value


def _strings(value: Any, where: str) -> list[str]:
    return [_text(v, where) for v in _sequence(value, where)]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a non-empty string")
    return value.strip()


class PolicyReloader(service.Service):
    """Reads the RBAC file again on SIGHUP; a bad file leaves the policy in force."""

    log = Logger()

    def __init__(self, holder: Any, path: Path) -> None:
        self.holder = holder
        self.path = path
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        def on_signal(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.reload)  # type: ignore[attr-defined]

        self._previous = signal.signal(signal.SIGHUP, on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def reload(self) -> bool:
        try:
            policy = load_policy(self.path)
        except PolicyError as e:
            self.log.error("RBAC file not reloaded, the old policy stays: {error}", error=e)
            return False
        self.holder.policy = policy
        self.log.info(
            "RBAC file reloaded from {path}: {count} organizations",
            path=self.path,
            count=len(policy.organizations),
        )
        return True
