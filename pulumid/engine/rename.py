"""Rewrite a stack's deployment so that it lives under a new stack (and project) name.

URNs embed the stack and project names, so a rename has to touch every place that
stores a URN: resource fields, provider references and resource references inside
property values.
"""

from __future__ import annotations

import copy
from typing import Any

URN_PREFIX = "urn:pulumi:"
STACK_TYPE = "pulumi:pulumi:Stack"

# Property-value signatures used by the engine's JSON encoding.
SIG_KEY = "4dabf18193072939515e22adb298388d"
SIG_RESOURCE_REF = "5cf8f73096256a8f31e491e813e4eb8e"
SIG_SECRET = "1b47061264138c4ac30d75fd1eb44270"


def split_urn(urn: str) -> tuple[str, str, str, str] | None:
    """Return (stack, project, qualified type, name), or None if `urn` is not a URN.

    Only the name may contain "::", so splitting at most three times is exact.
    """
    if not urn.startswith(URN_PREFIX):
        return None
    parts = urn[len(URN_PREFIX) :].split("::", 3)
    if len(parts) != 4 or not all(parts[:3]):
        return None
    stack, project, qualified_type, name = parts
    return stack, project, qualified_type, name


def rename_urn(
    urn: str, *, old_project: str, old_stack: str, new_project: str, new_stack: str
) -> str:
    """Move `urn` from old_project/old_stack to new_project/new_stack.

    URNs of other stacks or projects, and strings that are not URNs, come back unchanged.
    """
    parts = split_urn(urn)
    if parts is None:
        return urn
    stack, project, qualified_type, name = parts
    if stack != old_stack or project != old_project:
        return urn
    if qualified_type == STACK_TYPE:
        # The root stack resource is named after the project and stack.
        name = f"{new_project}-{new_stack}"
    return f"{URN_PREFIX}{new_stack}::{new_project}::{qualified_type}::{name}"


def rename_deployment(
    deployment: dict[str, Any],
    *,
    old_project: str,
    old_stack: str,
    new_project: str,
    new_stack: str,
    owner: str,
) -> dict[str, Any]:
    """Return a copy of a DeploymentV3 renamed from old_project/old_stack.

    `deployment` itself is not modified.
    """
    for label, value in (
        ("old_project", old_project),
        ("old_stack", old_stack),
        ("new_project", new_project),
        ("new_stack", new_stack),
    ):
        # Either would produce URNs that cannot be parsed back.
        if not value or "::" in value:
            raise ValueError(f"{label} must be non-empty and must not contain '::': {value!r}")

    renamer = _Renamer(old_project, old_stack, new_project, new_stack)
    result = copy.deepcopy(deployment)

    for resource in result.get("resources") or []:
        if isinstance(resource, dict):
            renamer.resource(resource)
    for operation in result.get("pending_operations") or []:
        if isinstance(operation, dict) and isinstance(operation.get("resource"), dict):
            renamer.resource(operation["resource"])

    providers = result.get("secrets_providers")
    if isinstance(providers, dict) and providers.get("type") == "service":
        state = providers.get("state")
        if isinstance(state, dict):
            # The service secrets manager addresses /api/stacks/{owner}/{project}/{stack},
            # so it must point at the new name. Renames never change the owner.
            state["owner"] = owner
            state["project"] = new_project
            state["stack"] = new_stack
    return result


class _Renamer:
    def __init__(self, old_project: str, old_stack: str, new_project: str, new_stack: str) -> None:
        self.old_project = old_project
        self.old_stack = old_stack
        self.new_project = new_project
        self.new_stack = new_stack

    def urn(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return rename_urn(
            value,
            old_project=self.old_project,
            old_stack=self.old_stack,
            new_project=self.new_project,
            new_stack=self.new_stack,
        )

    def urn_list(self, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [self.urn(item) for item in value]

    def provider_ref(self, value: Any) -> Any:
        # "<provider urn>::<provider id>"; the URN's name may itself contain "::",
        # so the id is whatever follows the last separator.
        if not isinstance(value, str) or "::" not in value:
            return value
        urn, provider_id = value.rsplit("::", 1)
        return f"{self.urn(urn)}::{provider_id}"

    def property_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.property_value(item) for item in value]
        if not isinstance(value, dict):
            return value
        signature = value.get(SIG_KEY)
        if signature == SIG_SECRET:
            return value
        if signature == SIG_RESOURCE_REF:
            if isinstance(value.get("urn"), str):
                value = dict(value)
                value["urn"] = self.urn(value["urn"])
            return value
        return {key: self.property_value(item) for key, item in value.items()}

    def resource(self, resource: dict[str, Any]) -> None:
        """Rename in place; callers pass an already copied resource."""
        for key in ("urn", "parent", "deletedWith", "viewOf", "replacementTrigger"):
            if key in resource:
                resource[key] = self.urn(resource[key])
        for key in ("dependencies", "replaceWith", "aliases"):
            if key in resource:
                # Non-string aliases (alias specs) are left alone by urn().
                resource[key] = self.urn_list(resource[key])
        if "provider" in resource:
            resource["provider"] = self.provider_ref(resource["provider"])
        deps = resource.get("propertyDependencies")
        if isinstance(deps, dict):
            resource["propertyDependencies"] = {
                key: self.urn_list(urns) for key, urns in deps.items()
            }
        for key in ("inputs", "outputs"):
            if key in resource:
                resource[key] = self.property_value(resource[key])
