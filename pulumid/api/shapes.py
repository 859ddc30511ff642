"""JSON shapes of request and response bodies, declared at the routes (`route(...,
body=..., answer=...)`) and published in GET /api/openapi. Written from what pulumid sends
and accepts; `additionalProperties` stays open where the CLI may send more."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
BOOLEAN: Schema = {"type": "boolean"}
BASE64: Schema = {"type": "string", "contentEncoding": "base64"}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
    }


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


ORGANIZATION = obj(
    {"githubLogin": STRING, "name": STRING, "avatarUrl": STRING},
    {"role": {"enum": ["admin", "member"]}},
)
USER = obj(
    {
        "id": STRING,
        "githubLogin": STRING,
        "name": STRING,
        "email": STRING,
        "avatarUrl": STRING,
        "organizations": array(ORGANIZATION),
        "identities": array(STRING),
        "siteAdmin": BOOLEAN,
        "hasMFA": BOOLEAN,
        "isOrgManaged": BOOLEAN,
        "isManagedByMultiOrg": BOOLEAN,
    },
    {"tokenInfo": obj({"name": STRING}, {"organization": STRING, "team": STRING})},
)
DEFAULT_ORG = obj({"GitHubLogin": STRING, "Messages": array({"type": "object"})})
CAPABILITIES = obj({"capabilities": array(obj({"capability": STRING, "version": INTEGER}))})
STACK_SUMMARY = obj(
    {"id": STRING, "orgName": STRING, "projectName": STRING, "stackName": STRING},
    {"lastUpdate": INTEGER, "resourceCount": INTEGER},
)
STACKS = obj({"stacks": array(STACK_SUMMARY)}, {"continuationToken": STRING})
STACK = obj(
    {
        "id": STRING,
        "orgName": STRING,
        "projectName": STRING,
        "stackName": STRING,
        "activeUpdate": STRING,
        "tags": {"type": "object", "additionalProperties": STRING},
        "version": INTEGER,
    },
    {"currentOperation": {"type": "object"}},
)
CREATE_STACK = obj(
    {"stackName": STRING},
    {"tags": {"type": "object", "additionalProperties": STRING}, "teams": array(STRING)},
)
UPDATE_INFO = obj(
    {
        "updateID": STRING,
        "kind": STRING,
        "startTime": INTEGER,
        "message": STRING,
        "environment": {"type": "object"},
        "config": {"type": "object"},
        "result": STRING,
        "version": INTEGER,
        "resourceChanges": {"type": "object", "additionalProperties": INTEGER},
    },
    {"endTime": INTEGER, "failure": STRING},
)
HISTORY = obj({"updates": array(UPDATE_INFO)})
ENCRYPT = obj({"plaintext": BASE64})
ENCRYPTED = obj({"ciphertext": BASE64})
DECRYPT = obj({"ciphertext": BASE64})
DECRYPTED = obj({"plaintext": BASE64})
BATCH_ENCRYPT = obj({"plaintexts": array(BASE64)})
BATCH_ENCRYPTED = obj({"ciphertexts": array(BASE64)})
BATCH_DECRYPT = obj({"ciphertexts": array(BASE64)})
BATCH_DECRYPTED = obj({"plaintexts": {"type": "object", "additionalProperties": BASE64}})
TOKEN = obj(
    {
        "id": STRING,
        "name": STRING,
        "description": STRING,
        "created": STRING,
        "createdBy": STRING,
        "expires": INTEGER,
        "lastUsed": INTEGER,
        "admin": BOOLEAN,
    },
    {"kind": {"enum": ["personal", "cli", "exchange"]}},
)
TOKENS = obj({"tokens": array(TOKEN)})
CREATE_TOKEN = {
    "type": "object",
    "properties": {"description": {"type": "string", "maxLength": 1024}, "expires": INTEGER},
}
CREATED_TOKEN = obj({"id": STRING, "tokenValue": STRING})
EXCHANGED = obj(
    {
        "access_token": STRING,
        "issued_token_type": STRING,
        "token_type": STRING,
        "expires_in": INTEGER,
        "scope": STRING,
    }
)
MEMBERS = obj(
    {
        "members": array(
            obj(
                {
                    "role": STRING,
                    "fgaRole": obj({"id": STRING, "name": STRING, "modifiedAt": STRING}),
                    "user": obj({"name": STRING, "githubLogin": STRING, "avatarUrl": STRING}),
                    "created": STRING,
                    "knownToPulumi": BOOLEAN,
                    "virtualAdmin": BOOLEAN,
                }
            )
        )
    }
)
TEAMS = obj(
    {
        "teams": array(
            obj({"kind": STRING, "name": STRING, "displayName": STRING, "description": STRING})
        )
    }
)
ROLES = obj({"roles": array(obj({"id": STRING, "name": STRING, "isOrgDefault": BOOLEAN}))})
AUDIT_LOGS = obj(
    {
        "auditLogEvents": array(
            obj(
                {
                    "timestamp": INTEGER,
                    "sourceIP": STRING,
                    "event": STRING,
                    "description": STRING,
                    "user": obj({"name": STRING, "githubLogin": STRING, "avatarUrl": STRING}),
                },
                {"authFailure": BOOLEAN},
            )
        )
    },
    {"continuationToken": STRING},
)

# -- the update lifecycle -------------------------------------------------------------------

NULLABLE_STRING: Schema = {"type": ["string", "null"]}
CREATE_UPDATE = obj(
    {},
    {
        "name": STRING,
        "runtime": STRING,
        "main": STRING,
        "description": STRING,
        "options": {"type": "object"},
        "config": {"type": "object"},
        "metadata": {"type": "object"},
    },
)
CREATED_UPDATE = obj(
    {"updateID": STRING, "requiredPolicies": array({"type": "object"}), "messages": array({})}
)
STARTED_UPDATE = obj(
    {"version": INTEGER, "token": STRING, "tokenExpiration": INTEGER},
    {"journalVersion": INTEGER},
)
UPDATE_STATUS = obj(
    {"status": STRING, "events": array({"type": "object"}), "continuationToken": NULLABLE_STRING},
    {"failure": STRING},
)
RENEW_LEASE = obj({}, {"duration": INTEGER, "token": STRING})
RENEWED_LEASE = obj({"token": STRING, "tokenExpiration": INTEGER})
COMPLETE = obj({"status": STRING}, {"result": {"type": "object"}})
EVENTS = obj({"events": array({"type": "object"}), "continuationToken": NULLABLE_STRING})
EVENT_BATCH = obj({"events": array({"type": "object"})})
CHECKPOINT = obj(
    {}, {"version": INTEGER, "deployment": {"type": "object"}, "features": array(STRING)}
)
VERBATIM = obj({"version": INTEGER, "sequenceNumber": INTEGER}, {"untypedDeployment": {}})
DELTA = obj(
    {"version": INTEGER, "checkpointHash": STRING, "sequenceNumber": INTEGER},
    {"deploymentDelta": {}},
)
JOURNAL = obj({"entries": array({"type": "object"})})

BACKUP = obj(
    {
        "name": STRING,
        "file": STRING,
        "created": {"type": "number"},
        "sha256": STRING,
        "size": INTEGER,
        "schema_version": INTEGER,
        "pulumid_version": STRING,
        "stacks": INTEGER,
        "updates": INTEGER,
    },
    {"destination": STRING, "keys": {"type": "object"}},
)
BACKUP_TAKEN = obj(
    {"backup": BACKUP, "stored": array(STRING), "failed": {"type": "object"}},
)
BACKUPS = obj({"backups": array(BACKUP)})
KEYS = obj(
    {
        "primary": STRING,
        "lastRotation": {
            "oneOf": [
                {"type": "null"},
                obj({"rewrapped": INTEGER, "skipped": INTEGER, "seconds": {"type": "number"}}),
            ]
        },
        "keys": array(
            obj(
                {
                    "keyId": STRING,
                    "stacks": INTEGER,
                    "configured": BOOLEAN,
                    "primary": BOOLEAN,
                }
            )
        ),
    }
)
