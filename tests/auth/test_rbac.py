"""The RBAC file (pulumid.auth.rbac): validation that says where, the role decisions, and the
reload on SIGHUP that keeps the old policy when the new file is bad."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from pulumid.auth.access import PolicyHolder
from pulumid.auth.principal import Principal
from pulumid.auth.rbac import Policy, PolicyError, PolicyReloader, load_policy, parse_policy
from pulumid.auth.roles import Role

POLICY: dict[str, Any] = {
    "organizations": {
        "acme": {
            "default_role": "read",
            "users": {"Carol@Example.com": "write", "dan": "admin", "erin": "none"},
            "groups": {"platform": "admin", "readers": "read", "devs": "write"},
            "stacks": [
                {"match": "acme/*/prod", "groups": {"readers": "none", "devs": "read"}},
                {"match": "acme/secret/*", "default_role": "none", "users": {"frank": "write"}},
                {"match": "acme/open/*", "users": {"nobody-in-particular": "read"}},
                # Never reached for acme/web/prod: the first rule already matched it.
                {"match": "acme/web/*", "groups": {"readers": "admin"}},
            ],
        },
        "other": {
            "users": {"dave@example.com": "admin"},
            "stacks": [{"match": "other/shared/*", "users": {"grace": "read"}}],
        },
        "empty": None,
    },
    "admins": {"users": ["Root@Example.com"], "groups": ["sre"]},
    "token_exchange": [
        {
            "issuer": "https://token.actions.githubusercontent.com",
            "audience": "pulumid-ci",
            "rules": [
                {
                    "organization": "acme",
                    "subject": "repo:acme/*",
                    "role": "write",
                    "claims": {"ref": "refs/heads/main"},
                    "max_lifetime": 600,
                },
                {"organization": "other", "role": "read"},
            ],
        }
    ],
}


def user(login: str, email: str = "", groups: tuple[str, ...] = ()) -> Principal:
    return Principal("user", login, name=login, email=email, groups=frozenset(groups))


def exchanged(login: str, grants: dict[str, Role]) -> Principal:
    return Principal("exchange", login, name=login, grants=grants)


@pytest.fixture
def policy() -> Policy:
    return parse_policy(POLICY)


# -- validation ---------------------------------------------------------------------------


def parse_error(document: Any) -> str:
    with pytest.raises(ValueError) as caught:
        parse_policy(document)
    return str(caught.value)


def org_doc(body: Any) -> dict[str, Any]:
    return {"organizations": {"acme": body}}


def exchange_doc(entry: Any) -> dict[str, Any]:
    return {"token_exchange": [entry]}


def issuer(**rule: Any) -> dict[str, Any]:
    return {"issuer": "https://ci", "audience": "aud", "rules": [rule]}


@pytest.mark.parametrize(
    ("document", "where", "what"),
    [
        ([], "the file", "expected a mapping"),
        ({"organisations": {}}, "the file", "unknown key 'organisations'"),
        ({"organizations": ["acme"]}, "organizations", "expected a mapping"),
        (org_doc({"default_role": "read", "owners": {}}), "organizations.acme", "'owners'"),
        (org_doc("admin"), "organizations.acme", "expected a mapping"),
        (org_doc({"users": ["alice"]}), "organizations.acme.users", "expected a mapping"),
        (org_doc({"groups": "platform"}), "organizations.acme.groups", "expected a mapping"),
        (org_doc({"users": {"alice": "owner"}}), "organizations.acme.users.alice", "'owner'"),
        (org_doc({"users": {"alice": 3}}), "organizations.acme.users.alice", "not 3"),
        (org_doc({"groups": {"platform": None}}), "organizations.acme.groups.platform", "None"),
        (org_doc({"default_role": "root"}), "organizations.acme.default_role", "'root'"),
        (org_doc({"stacks": {"match": "acme/*"}}), "organizations.acme.stacks", "expected a list"),
        (org_doc({"stacks": ["acme/*"]}), "organizations.acme.stacks[0]", "expected a mapping"),
        (
            org_doc({"stacks": [{"match": "acme/*"}, {"users": {"a": "read"}}]}),
            "organizations.acme.stacks[1]",
            "expected a non-empty string",
        ),
        (
            org_doc({"stacks": [{"match": "  "}]}),
            "organizations.acme.stacks[0]",
            "expected a non-empty string",
        ),
        (
            org_doc({"stacks": [{"match": "acme/*", "role": "read"}]}),
            "organizations.acme.stacks[0]",
            "unknown key 'role'",
        ),
        (
            org_doc({"stacks": [{"match": "acme/*", "groups": {"readers": "reader"}}]}),
            "organizations.acme.stacks[0].groups.readers",
            "'reader'",
        ),
        (
            org_doc({"stacks": [{"match": "acme/*", "default_role": "all"}]}),
            "organizations.acme.stacks[0].default_role",
            "'all'",
        ),
        ({"admins": ["root"]}, "admins", "expected a mapping"),
        ({"admins": {"people": ["root"]}}, "admins", "unknown key 'people'"),
        ({"admins": {"users": "root"}}, "admins.users", "expected a list"),
        ({"admins": {"groups": [""]}}, "admins.groups", "expected a non-empty string"),
        ({"admins": {"users": [7]}}, "admins.users", "expected a non-empty string"),
        ({"token_exchange": {"issuer": "x"}}, "token_exchange", "expected a list"),
        (exchange_doc("https://ci"), "token_exchange[0]", "expected a mapping"),
        (
            exchange_doc({**issuer(organization="acme", role="read"), "jwks": "x"}),
            "token_exchange[0]",
            "unknown key 'jwks'",
        ),
        (
            exchange_doc({"issuer": "https://ci", "audience": "aud", "rules": []}),
            "token_exchange[0]",
            "at least one rule is needed",
        ),
        (
            exchange_doc({"audience": "aud", "rules": [{"organization": "a", "role": "read"}]}),
            "token_exchange[0].issuer",
            "expected a non-empty string",
        ),
        (
            exchange_doc(
                {"issuer": "https://ci", "rules": [{"organization": "a", "role": "read"}]}
            ),
            "token_exchange[0].audience",
            "expected a non-empty string",
        ),
        (
            exchange_doc({"issuer": "https://ci", "audience": "aud", "rules": "all"}),
            "token_exchange[0].rules",
            "expected a list",
        ),
        (exchange_doc(issuer(role="read")), "token_exchange[0].rules[0].organization", "string"),
        (exchange_doc(issuer(organization="acme")), "token_exchange[0].rules[0].role", "None"),
        (
            exchange_doc(issuer(organization="acme", role="read", sub="x")),
            "token_exchange[0].rules[0]",
            "unknown key 'sub'",
        ),
        (
            exchange_doc(issuer(organization="acme", role="read", subject="")),
            "token_exchange[0].rules[0].subject",
            "expected a non-empty string",
        ),
        (
            exchange_doc(issuer(organization="acme", role="read", claims=["ref"])),
            "token_exchange[0].rules[0].claims",
            "expected a mapping",
        ),
        (
            exchange_doc(issuer(organization="acme", role="read", max_lifetime=0)),
            "token_exchange[0].rules[0].max_lifetime",
            "positive",
        ),
        (
            exchange_doc(issuer(organization="acme", role="read", max_lifetime="1h")),
            "token_exchange[0].rules[0].max_lifetime",
            "positive",
        ),
        (
            exchange_doc(issuer(organization="acme", role="read", max_lifetime=True)),
            "token_exchange[0].rules[0].max_lifetime",
            "positive",
        ),
    ],
)
def test_every_validation_error_names_where(document: Any, where: str, what: str) -> None:
    message = parse_error(document)
    assert message.startswith(f"{where}: "), message
    assert what in message, message


def test_the_whole_example_parses(policy: Policy) -> None:
    assert list(policy.organizations) == ["acme", "other", "empty"]
    acme = policy.organizations["acme"]
    assert acme.grants.default == Role.READ
    assert acme.grants.users["carol@example.com"] == Role.WRITE  # keys are lower case
    assert [rule.pattern for rule in acme.stacks] == [
        "acme/*/prod",
        "acme/secret/*",
        "acme/open/*",
        "acme/web/*",
    ]
    assert policy.organizations["empty"].grants.default is None
    (trusted,) = policy.issuers
    assert trusted.jwks_url == ""
    first, second = trusted.rules
    assert (first.organization, first.role, first.max_lifetime) == ("acme", Role.WRITE, 600.0)
    assert (second.subject, second.max_lifetime, dict(second.claims)) == ("*", 3600.0, {})


def test_an_empty_document_is_an_empty_policy() -> None:
    for document in ({}, {"organizations": None, "admins": None, "token_exchange": None}):
        policy = parse_policy(document)
        assert dict(policy.organizations) == {}
        assert policy.issuers == ()
        assert policy.org_role(user("anyone"), "acme") == Role.NONE


def test_roles_are_case_insensitive_and_trimmed() -> None:
    policy = parse_policy(org_doc({"users": {"alice": " Admin "}, "groups": {"g": "WRITE"}}))
    assert policy.org_role(user("alice"), "acme") == Role.ADMIN
    assert policy.org_role(user("x", groups=("g",)), "acme") == Role.WRITE


def test_an_empty_user_name_grants_nothing_to_users_without_an_email() -> None:
    """`users: {"": admin}` must not make every identity that has no email an admin: either
    the file is refused or the empty name matches nobody."""
    try:
        policy = parse_policy(org_doc({"users": {"": "admin"}}))
    except ValueError as e:
        assert str(e).startswith("organizations.acme.users"), e
        return
    assert policy.org_role(user("bob"), "acme") == Role.NONE


# -- load_policy ----------------------------------------------------------------------------


def test_load_policy_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "rbac.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    assert load_policy(path) == parse_policy(POLICY)
    path.write_text("")
    assert load_policy(path) == Policy()


def test_load_policy_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyError, match=r"cannot read the RBAC file .*missing\.yaml"):
        load_policy(missing)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("organizations: {acme: [unclosed\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(bad_yaml)
    assert str(caught.value).startswith(f"{bad_yaml}: not valid YAML"), caught.value
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("organizations:\n  acme:\n    users:\n      alice: boss\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(invalid)
    assert str(caught.value).startswith(f"{invalid}: organizations.acme.users.alice:")
    assert "'boss'" in str(caught.value)
    assert isinstance(caught.value, ValueError)


# -- organization roles ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "role"),
    [
        (user("carol@example.com"), Role.WRITE),  # by login
        (user("CAROL@EXAMPLE.COM"), Role.WRITE),  # case-insensitive
        (user("c123", email="Carol@example.COM"), Role.WRITE),  # by email
        (user("Dan"), Role.ADMIN),
        (user("erin"), Role.NONE),  # named with none: the default does not apply
        (user("zed"), Role.READ),  # nobody: the default role
        (user("zed", groups=("readers",)), Role.READ),
        (user("zed", groups=("devs",)), Role.WRITE),
        (user("zed", groups=("readers", "platform", "devs")), Role.ADMIN),  # highest wins
        (user("erin", groups=("devs",)), Role.WRITE),  # highest of user and group
        (user("carol@example.com", groups=("platform",)), Role.ADMIN),
        (user("zed", groups=("Platform",)), Role.READ),  # group names are exact
    ],
)
def test_org_role(policy: Policy, principal: Principal, role: Role) -> None:
    assert policy.org_role(principal, "acme") == role


def test_org_role_without_default_and_unknown_org(policy: Policy) -> None:
    assert policy.org_role(user("dave@example.com"), "other") == Role.ADMIN
    assert policy.org_role(user("carol@example.com"), "other") == Role.NONE
    assert policy.org_role(user("dave@example.com"), "acme") == Role.READ  # acme's default
    assert policy.org_role(user("dave@example.com"), "nowhere") == Role.NONE
    assert policy.org_role(user("dan"), "empty") == Role.NONE


# -- stack roles ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "stack", "role"),
    [
        # acme/*/prod: readers none, devs read; others fall back to the org role.
        (user("zed", groups=("readers",)), ("web", "prod"), Role.NONE),
        (user("zed", groups=("readers",)), ("api", "dev"), Role.READ),
        (user("zed", groups=("devs",)), ("web", "prod"), Role.READ),
        (user("zed", groups=("devs",)), ("web", "dev"), Role.WRITE),
        (user("zed"), ("web", "prod"), Role.READ),  # named by nobody, no rule default
        (user("carol@example.com"), ("web", "prod"), Role.WRITE),
        (user("erin"), ("web", "prod"), Role.NONE),
        # First match wins: acme/web/* (readers admin) is reached for acme/web/staging but
        # never for acme/web/prod (see the first case).
        (user("zed", groups=("readers",)), ("web", "staging"), Role.ADMIN),
        # acme/secret/*: the rule's default (none) for everyone it does not name.
        (user("carol@example.com"), ("secret", "dev"), Role.NONE),
        (user("zed", groups=("devs",)), ("secret", "dev"), Role.NONE),
        (user("frank"), ("secret", "dev"), Role.WRITE),
        (user("frank"), ("secret", "prod"), Role.READ),  # prod matched first: org default
        # acme/open/*: names someone else and has no default: the org role.
        (user("carol@example.com"), ("open", "x"), Role.WRITE),
        (user("zed"), ("open", "x"), Role.READ),
        # Organization admins stay admins whatever the rules say.
        (user("dan"), ("secret", "dev"), Role.ADMIN),
        (user("zed", groups=("platform", "readers")), ("web", "prod"), Role.ADMIN),
    ],
)
def test_stack_role(
    policy: Policy, principal: Principal, stack: tuple[str, str], role: Role
) -> None:
    project, name = stack
    assert policy.stack_role(principal, "acme", project, name) == role


def test_stack_rules_grant_outside_the_org_role(policy: Policy) -> None:
    grace = user("grace")
    assert policy.org_role(grace, "other") == Role.NONE
    assert policy.stack_role(grace, "other", "shared", "s") == Role.READ
    assert policy.stack_role(grace, "other", "private", "s") == Role.NONE


def test_stack_patterns_are_globs_over_org_project_stack() -> None:
    policy = parse_policy(
        org_doc(
            {
                "default_role": "write",
                "stacks": [{"match": "acme/p?/[ab]*", "default_role": "read"}],
            }
        )
    )
    who = user("zed")
    assert policy.stack_role(who, "acme", "p1", "alpha") == Role.READ
    assert policy.stack_role(who, "acme", "p1", "cat") == Role.WRITE
    assert policy.stack_role(who, "acme", "p12", "alpha") == Role.WRITE
    # Case-sensitive, like stack names.
    assert policy.stack_role(who, "acme", "P1", "alpha") == Role.WRITE


# -- site admins ----------------------------------------------------------------------------


def test_site_admins(policy: Policy) -> None:
    root = user("root@example.com")
    by_email = user("r00t", email="ROOT@example.com")
    by_group = user("someone", groups=("sre",))
    for principal in (root, by_email, by_group):
        assert policy.is_site_admin(principal)
        assert policy.org_role(principal, "acme") == Role.ADMIN
        assert policy.org_role(principal, "nowhere") == Role.ADMIN
        assert policy.stack_role(principal, "acme", "secret", "dev") == Role.ADMIN
        assert policy.organizations_of(principal) == ["acme", "other", "empty"]
    assert not policy.is_site_admin(user("dan"))  # an org admin is not a site admin
    assert policy.is_site_admin(Principal("site", "admin"))


# -- exchanged tokens -----------------------------------------------------------------------


def test_exchange_principals_have_their_grants_only(policy: Policy) -> None:
    ci = exchanged("acme", {"acme": Role.WRITE})
    assert policy.org_role(ci, "acme") == Role.WRITE
    assert policy.org_role(ci, "other") == Role.NONE
    # Stack rules and default roles do not apply: the grant is the role everywhere in acme.
    assert policy.stack_role(ci, "acme", "web", "prod") == Role.WRITE
    assert policy.stack_role(ci, "acme", "secret", "dev") == Role.WRITE
    assert policy.organizations_of(ci) == ["acme"]
    assert not policy.is_site_admin(ci)
    # Its login is an org or team name: users/groups entries do not reach it.
    team = exchanged("dan", {"acme": Role.READ})
    assert policy.org_role(team, "acme") == Role.READ
    assert policy.organizations_of(exchanged("x", {"acme": Role.NONE})) == []


def test_an_exchanged_token_named_like_a_site_admin_is_not_one(policy: Policy) -> None:
    """A team token's login is the team named in the exchange request's scope, chosen by the
    CI job: naming the team after a site admin must not make the token a site admin."""
    ci = exchanged("root@example.com", {"acme": Role.READ})
    assert not policy.is_site_admin(ci)
    assert policy.org_role(ci, "other") == Role.NONE
    assert policy.organizations_of(ci) == ["acme"]


# -- organizations_of -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "orgs"),
    [
        (user("carol@example.com"), ["acme"]),
        (user("dave@example.com"), ["acme", "other"]),  # acme's default read
        (user("erin"), []),  # none in acme, nothing elsewhere
        (user("grace"), ["acme", "other"]),  # other only through a stack rule
        (user("erin", groups=("readers",)), ["acme"]),
    ],
)
def test_organizations_of(policy: Policy, principal: Principal, orgs: list[str]) -> None:
    assert policy.organizations_of(principal) == orgs


def test_organizations_of_without_defaults() -> None:
    policy = parse_policy(
        {
            "organizations": {
                "b": {"users": {"x": "read"}},
                "a": {"users": {"x": "none", "y": "write"}},
                "c": {"stacks": [{"match": "c/*/*", "users": {"x": "none"}}]},
            }
        }
    )
    assert policy.organizations_of(user("x")) == ["b"]  # file order, none excluded
    assert policy.organizations_of(user("y")) == ["a"]
    assert policy.organizations_of(user("z")) == []


# -- exchange rules -------------------------------------------------------------------------


def test_exchange_rules_admit_by_subject_and_claims(policy: Policy) -> None:
    first, second = policy.issuers[0].rules
    main = {"sub": "repo:acme/web:ref:refs/heads/main", "ref": "refs/heads/main"}
    assert first.admits(main)
    assert not first.admits({**main, "ref": "refs/heads/feature"})
    assert not first.admits({"sub": "repo:acme/web"})  # the claim is missing
    assert not first.admits({**main, "sub": "repo:evil/web"})
    assert not first.admits({"ref": "refs/heads/main"})  # no subject
    assert not first.admits({**main, "sub": 7})
    assert second.admits({"sub": "anything"})


# -- reloading ------------------------------------------------------------------------------


def write_policy(path: Path, document: Any) -> None:
    path.write_text(yaml.safe_dump(document))


def test_reload_replaces_the_policy_with_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "rbac.yaml"
    write_policy(path, org_doc({"users": {"alice": "read"}}))
    holder = PolicyHolder(load_policy(path))
    reloader = PolicyReloader(holder, path)
    before = holder.policy
    write_policy(path, org_doc({"users": {"alice": "admin"}}))
    assert reloader.reload() is True
    assert holder.policy is not before
    assert holder.policy.org_role(user("alice"), "acme") == Role.ADMIN


@pytest.mark.parametrize(
    "content",
    [
        "organizations: {acme: [\n",  # not YAML
        "organizations:\n  acme:\n    users: {alice: superuser}\n",  # invalid
        "- just\n- a list\n",
    ],
)
def test_reload_keeps_the_policy_when_the_file_is_bad(tmp_path: Path, content: str) -> None:
    path = tmp_path / "rbac.yaml"
    write_policy(path, org_doc({"users": {"alice": "write"}}))
    holder = PolicyHolder(load_policy(path))
    before = holder.policy
    reloader = PolicyReloader(holder, path)
    path.write_text(content)
    assert reloader.reload() is False
    assert holder.policy is before
    path.unlink()
    assert reloader.reload() is False  # a missing file too
    assert holder.policy is before
    assert holder.policy.org_role(user("alice"), "acme") == Role.WRITE


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_through_the_reactor(tmp_path: Path) -> None:
    path = tmp_path / "rbac.yaml"
    write_policy(path, org_doc({"users": {"alice": "read"}}))
    holder = PolicyHolder(load_policy(path))
    reloader = PolicyReloader(holder, path)
    previous = signal.getsignal(signal.SIGHUP)
    reloader.startService()
    try:
        # Without the handler a SIGHUP would end the test run: make sure it is ours.
        installed = signal.getsignal(signal.SIGHUP)
        assert callable(installed) and installed is not previous
        write_policy(path, org_doc({"users": {"alice": "admin"}}))
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(50):
            await sleep(0.02)
            if holder.policy.org_role(user("alice"), "acme") == Role.ADMIN:
                break
        assert holder.policy.org_role(user("alice"), "acme") == Role.ADMIN
        # A bad file on the next SIGHUP: the reloaded policy stays.
        good = holder.policy
        path.write_text("organizations: {acme: {users: {alice: emperor}}}\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await sleep(0.2)
        assert holder.policy is good
    finally:
        reloader.stopService()
    assert signal.getsignal(signal.SIGHUP) == previous
