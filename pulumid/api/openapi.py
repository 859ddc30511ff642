"""The OpenAPI 3.1 description of the API, generated from the route table.

Nothing here is written per route by hand: paths and methods come from Klein's url map,
path parameters from the rules' converters (the update kinds as an enum), credentials and
the error statuses a caller can meet from each route's Need (pulumid.auth.access), the
summary from the handler's docstring.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from klein import Klein
from werkzeug.routing import AnyConverter

from pulumid import __version__
from pulumid.auth.access import Need

ERROR = {"$ref": "#/components/schemas/Error"}
_PARAMETER = re.compile(r"<(?:([^:>(]+)(?:\(([^)]*)\))?:)?([^>]+)>")


def document(
    app: Klein,
    needs: dict[str, Need],
    handlers: dict[str, Any],
    shapes: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] | None = None,
) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        need = needs.get(rule.endpoint)
        if need is None:
            continue
        path, parameters = _path(rule)
        method = rule.endpoint.rsplit(":", 1)[1].lower()
        name = rule.endpoint.rsplit(":", 1)[0]
        handler = handlers.get(name)
        doc = inspect.getdoc(handler) if handler is not None else None
        operation: dict[str, Any] = {
            "operationId": f"{name}_{method}",
            "summary": (doc or name.replace("_", " ")).splitlines()[0],
            "parameters": parameters,
            "responses": _responses(need, method),
            "security": _security(need),
            "x-pulumid-need": {"scope": need.scope, "role": need.role.label},
        }
        if need.action:
            operation["x-pulumid-audit-action"] = need.action
        body, answer = (shapes or {}).get(rule.endpoint, (None, None))
        if method in ("post", "patch", "put"):
            operation["requestBody"] = {
                "required": body is not None,
                "content": {"application/json": {"schema": body or {"type": "object"}}},
            }
        if answer is not None:
            operation["responses"]["200"] = {
                "description": "done",
                "content": {"application/json": {"schema": answer}},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pulumid",
            "version": __version__,
            "description": "The Pulumi Cloud HTTP API as pulumid serves it.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
                }
            },
            "securitySchemes": {
                "token": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`token <access token>`",
                },
                "updateToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`update-token <the update's token>`",
                },
            },
        },
    }


def _path(rule: Any) -> tuple[str, list[dict[str, Any]]]:
    parameters = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(3)
        schema: dict[str, Any] = {"type": "string"}
        converter = rule._converters.get(name)
        if isinstance(converter, AnyConverter):
            options = match.group(2) or ""
            schema["enum"] = [o.strip() for o in options.split(",") if o.strip()]
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
        return "{" + name + "}"

    return _PARAMETER.sub(replace, rule.rule), parameters


def _security(need: Need) -> list[dict[str, list[str]]]:
    if need.scope == "public":
        return []
    if need.scope == "update":
        return [{"updateToken": []}]
    return [{"token": []}]


def _responses(need: Need, method: str) -> dict[str, Any]:
    error = {"description": "{code, message}", "content": {"application/json": {"schema": ERROR}}}
    responses: dict[str, Any] = {
        "2XX": {"description": "done (JSON, or no content)"},
        "400": {**error, "description": "bad input"},
        "503": {**error, "description": "storage unavailable; retry"},
    }
    if need.scope != "public":
        responses["401"] = {**error, "description": "no or invalid credentials"}
    if need.scope in ("org", "stack", "site-admin", "update", "signed-in"):
        responses["403"] = {**error, "description": "the caller's role is not enough"}
    # No such resource, or a feature this daemon's configuration does not offer.
    responses["404"] = {**error, "description": "no such resource, or not offered here"}
    if method in ("post", "patch", "put", "delete"):
        responses["409"] = {**error, "description": "conflicts with the current state"}
        responses["413"] = {**error, "description": "body too large"}
    return responses
