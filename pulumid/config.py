"""One Config object, built from command-line flags > PULUMID_* environment variables > defaults.

`twistd pulumid --help` shows every flag with its environment variable and effective default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.python import usage

MIB = 1024 * 1024
_OWNER = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-_]{1,38}[a-zA-Z0-9]$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


AUTH_MODES = ("single-tenant", "oidc", "google", "jwt")


@dataclass(frozen=True)
class AuthConfig:
    """Who may sign in and how (pulumid.auth); single-tenant needs none of it."""

    mode: str = "single-tenant"
    rbac_config: str = ""
    trusted_proxies: str = ""
    audit_log: str = ""
    audit_retention_days: float = 365.0
    username_claim: str = "email"
    groups_claim: str = "groups"
    # jwt mode: one of secret / public key / JWKS URL verifies the tokens.
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway: float = 30.0
    # oidc and google modes.
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    oidc_scopes: str = "openid email profile"
    oidc_allowed_domains: str = ""
    oidc_recheck_interval: float = 900.0
    public_url: str = ""
    cli_token_days: float = 30.0
    google_hosted_domains: str = ""
    google_service_account_file: str = ""
    google_admin_email: str = ""
    google_directory_url: str = "https://admin.googleapis.com/admin/directory/v1"

    @property
    def multi_user(self) -> bool:
        return self.mode != "single-tenant"


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    # Health, readiness and metrics; "none" turns the listener off.
    management_listen: str = "tcp:9090:interface=127.0.0.1"
    insecure_http: bool = False
    # TLS on the API listeners from PEM files (reloaded when they change).
    tls_cert: str = ""
    tls_key: str = ""
    tls_reload_interval: float = 60.0
    # ACME (HTTP-01): certificates for these names, issued and renewed by pulumid.
    acme_domains: tuple[str, ...] = ()
    acme_email: str = ""
    acme_directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    acme_http_listen: str = "tcp:80"
    acme_renew_days: float = 30.0
    acme_ca_file: str = ""
    acme_check_interval: float = 3600.0
    # Slow and hostile clients (pulumid.api.channel).
    header_timeout: float = 15.0
    body_timeout: float = 600.0
    idle_timeout: float = 120.0
    max_connections_per_ip: int = 256
    max_header_size: int = 16384
    # The log (pulumid.ops.logs): json or text lines; which log types reach it.
    # OpenTelemetry traces over OTLP/HTTP ("" : off).
    otlp_endpoint: str = ""
    otel_service_name: str = "pulumid"
    log_format: str = "json"
    log_types: tuple[str, ...] = ("operational", "access", "audit")
    access_log: str = ""
    # A SQLite file path, or a postgresql:// URL (or libpq key=value string) shared by nodes.
    database: str = "pulumid.db"
    # "inline" keeps state blobs in the database; s3://bucket/prefix?... in object storage.
    blob_store: str = "inline"
    db_pool_size: int = 4
    token: str = ""
    master_key: str | None = None
    secrets_key: str = "local"
    previous_secrets_keys: tuple[str, ...] = ()
    key_rotation_batch: int = 100
    gcp_credentials_file: str = ""
    backup_schedule: float = 0.0
    backup_to: tuple[str, ...] = ()
    backup_keep: int = 14
    backup_max_age: float = 0.0
    organization: str = "organization"
    user: str = "admin"
    lease_ttl: float = 300.0
    state_versions: int = 100
    max_body_size: int = 256 * MIB
    # Large pages: `stack ls --all` over thousands of stacks costs a round trip per page.
    page_size: int = 1000
    sync_commits: bool = True
    journaling: bool = True
    delta_checkpoints: bool = True
    delta_cutoff: int = MIB
    inflight_memory: int = 512 * MIB
    event_retention_days: float = 90.0
    preview_retention_days: float = 30.0
    update_retention_days: float = 0.0
    retention_interval: float = 3600.0
    # Fault points at the storage seam (tests only; env PULUMID_TEST_FAULTS, no flag).
    test_faults: str = ""
    auth: AuthConfig = AuthConfig()

    @property
    def postgres(self) -> bool:
        return is_postgres(self.database)

    @property
    def sqlite_path(self) -> Path:
        return Path(self.database)


def is_postgres(database: str) -> bool:
    """True for postgresql:// and postgres:// URLs and libpq "host=... dbname=..." strings."""
    lowered = database.strip().lower()
    return lowered.startswith(("postgresql://", "postgres://")) or (
        "=" in lowered and "dbname=" in lowered
    )


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"must be positive, not {value}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"must be a finite number of zero or more, not {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must not be negative, not {value}")
    return number


def duration(value: str) -> float:
    """Seconds, or a number with a unit: 90, 90s, 30m, 6h, 7d."""
    text = value.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], 0)
    number = float(text[:-1] if scale else text) * (scale or 1)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"want seconds or a duration such as 30m, 6h, 7d, not {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"must be positive, not {value}")
    return number


def _read_file(option: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise usage.UsageError(f"--{option}: cannot read {path}: {e.strerror}") from None


# name, default, coercer, help
_PARAMETERS: list[tuple[str, Any, Callable[[str], Any] | None, str]] = [
    (
        "database",
        "pulumid.db",
        None,
        "Path of the SQLite database file, or a postgresql://user:password@host/db URL "
        "that several nodes share",
    ),
    (
        "blob-store",
        "inline",
        None,
        "Where state versions, journal batches and deltas go: 'inline' in the database, or "
        "s3://bucket/prefix?endpoint=URL&region=NAME&path_style=true (credentials from the AWS "
        "chain)",
    ),
    (
        "db-pool-size",
        4,
        _positive_int,
        "Database connections (and threads) per node, with PostgreSQL; SQLite uses one",
    ),
    (
        "management-listen",
        "tcp:9090:interface=127.0.0.1",
        None,
        "Endpoint of /healthz, /readyz and /metrics ('none' for no listener)",
    ),
    ("tls-cert", None, None, "PEM certificate (and chain) for TLS on the API's tcp listeners"),
    ("tls-key", None, None, "PEM private key of --tls-cert"),
    (
        "tls-reload-interval",
        60.0,
        _positive_float,
        "Seconds between checks of the TLS files for a new pair",
    ),
    (
        "acme-domains",
        "",
        None,
        "Get and renew the API's certificate from an ACME CA for these comma-separated names",
    ),
    ("acme-email", "", None, "Contact email of the ACME account"),
    (
        "acme-directory",
        "https://acme-v02.api.letsencrypt.org/directory",
        None,
        "The ACME directory URL (Let's Encrypt by default; any RFC 8555 CA)",
    ),
    (
        "acme-http-listen",
        "tcp:80",
        None,
        "Plain HTTP listener that answers the CA's HTTP-01 challenges",
    ),
    ("acme-renew-days", 30.0, _positive_float, "Renew this many days before expiry"),
    ("acme-ca-file", "", None, "CA bundle to trust for the ACME directory's own TLS"),
    (
        "acme-check-interval",
        3600.0,
        _positive_float,
        "Seconds between checks of the certificate (renewal, pick-up from other nodes)",
    ),
    ("token", None, None, "The single-tenant access token the CLI logs in with (required)"),
    ("token-file", None, None, "Read the access token from this file instead"),
    (
        "master-key",
        None,
        None,
        "Secrets master key, 64 hex characters; generated and printed once when absent",
    ),
    ("master-key-file", None, None, "Read the master key from this file instead"),
    (
        "secrets-key",
        "local",
        None,
        "The key that wraps stacks' data keys: local (the master key), file:PATH, "
        "awskms://KEY?region=R&endpoint=URL or gcpkms://projects/.../cryptoKeys/K",
    ),
    (
        "previous-secrets-keys",
        "",
        None,
        "Comma-separated keys that still open what they wrapped; the daemon re-wraps it all "
        "under --secrets-key, then they can go",
    ),
    ("key-rotation-batch", 100, _positive_int, "Data keys re-wrapped per transaction"),
    (
        "gcp-credentials-file",
        "",
        None,
        "Google service account key file for gcpkms:// keys",
    ),
    (
        "backup-schedule",
        0.0,
        duration,
        "Take a backup this often (seconds, or 30m, 6h, 1d; 0: only on request); the first "
        "one at start",
    ),
    (
        "backup-to",
        "",
        None,
        "Comma-separated backup destinations: a directory, or s3://bucket/prefix?endpoint=URL"
        "&region=R&path_style=true; each may end in ?keep=N&max_age=30d (or &keep=...)",
    ),
    ("backup-keep", 14, _positive_int, "Backups kept per destination (unless it says keep=)"),
    (
        "backup-max-age",
        0.0,
        duration,
        "Backups older than this are deleted (0: by count only), unless a destination says",
    ),
    ("organization", "organization", None, "Default organization name"),
    ("user", "admin", None, "The user name the token logs in as"),
    (
        "lease-ttl",
        300.0,
        _positive_float,
        "Seconds an update lease lives without renewal (the CLI renews every 150 s)",
    ),
    (
        "state-versions",
        100,
        _non_negative_int,
        "State versions kept per stack for export --version (0 keeps all)",
    ),
    (
        "max-body-size",
        256 * MIB,
        _positive_int,
        "Largest request body accepted, in bytes after decompression",
    ),
    (
        "header-timeout",
        15.0,
        _non_negative_float,
        "Seconds a request's headers may take from its first byte (0: no limit)",
    ),
    (
        "body-timeout",
        600.0,
        _non_negative_float,
        "Seconds a request's body may take after its headers (0: no limit)",
    ),
    ("idle-timeout", 120.0, _positive_float, "Seconds an idle keep-alive connection stays open"),
    (
        "max-connections-per-ip",
        256,
        _non_negative_int,
        "Open connections one address may hold (0: no cap; behind a proxy, all are the proxy's)",
    ),
    ("max-header-size", 16384, _positive_int, "Largest request head (all headers), in bytes"),
    (
        "otlp-endpoint",
        "",
        None,
        "Send OpenTelemetry traces over OTLP/HTTP here (e.g. http://collector:4318/v1/traces)",
    ),
    ("otel-service-name", "pulumid", None, "service.name of the traces"),
    ("log-format", "json", None, "json (one JSON object per line) or text"),
    (
        "log-types",
        "operational,access,audit",
        None,
        "Which lines reach the main log (twistd's --logfile, or stdout with -n)",
    ),
    ("access-log", "", None, "Also write access lines to stdout, stderr or a file"),
    ("page-size", 1000, _positive_int, "Stacks per page of stack listings"),
    (
        "delta-cutoff",
        MIB,
        _non_negative_int,
        "Checkpoints at least this many bytes are sent as deltas (delta-checkpoint-uploads-v2)",
    ),
    (
        "inflight-memory",
        512 * MIB,
        _positive_int,
        "Bytes of state text kept in memory for updates in flight (journal replay, delta "
        "baselines); past it, the least recently used are rebuilt from the database",
    ),
    (
        "event-retention-days",
        90.0,
        _non_negative_float,
        "Days engine events are kept after their update ends (0 keeps them forever)",
    ),
    (
        "preview-retention-days",
        30.0,
        _non_negative_float,
        "Days previews are kept in the history after they end (0 keeps them forever)",
    ),
    (
        "update-retention-days",
        0.0,
        _non_negative_float,
        "Days ended updates are kept in the history (0, the default, keeps them forever)",
    ),
    (
        "retention-interval",
        3600.0,
        _positive_float,
        "Seconds between retention sweeps",
    ),
    # -- who may sign in (pulumid.auth) --
    (
        "auth-mode",
        "single-tenant",
        None,
        "single-tenant (one shared token), oidc, google or jwt (people and machines, RBAC)",
    ),
    ("rbac-config", None, None, "The RBAC YAML file (required by the multi-user modes)"),
    (
        "trusted-proxies",
        "",
        None,
        "Comma-separated CIDRs of proxies whose X-Forwarded-For / X-Real-IP are believed",
    ),
    ("audit-log", "", None, "Also write audit events as JSON lines to stdout, stderr or a file"),
    (
        "audit-retention-days",
        365.0,
        _non_negative_float,
        "Days audit events are kept in the database (0 keeps them forever)",
    ),
    ("username-claim", "email", None, "The ID token / JWT claim that names the user"),
    ("groups-claim", "groups", None, "The ID token / JWT claim that lists the user's groups"),
    ("jwt-secret", None, None, "jwt mode: the HMAC secret that signs the tokens"),
    ("jwt-secret-file", None, None, "Read the HMAC secret from this file instead"),
    ("jwt-public-key-file", None, None, "jwt mode: PEM public key (RSA or ECDSA) of the signer"),
    ("jwt-jwks-url", None, None, "jwt mode: the signer's JWKS URL (keys refetched on rotation)"),
    ("jwt-issuer", None, None, "jwt mode: the required `iss`"),
    ("jwt-audience", None, None, "jwt mode: the required `aud`"),
    ("jwt-leeway", 30.0, _non_negative_float, "Seconds of clock skew allowed on exp/nbf/iat"),
    ("oidc-issuer", None, None, "oidc mode: the provider's issuer URL (discovery is read)"),
    ("oidc-client-id", None, None, "oidc/google modes: the client ID registered at the provider"),
    ("oidc-client-secret", None, None, "oidc/google modes: the client secret"),
    ("oidc-client-secret-file", None, None, "Read the client secret from this file instead"),
    (
        "oidc-scopes",
        "openid email profile",
        None,
        "Scopes asked for (space-separated); offline_access is added to get a refresh token",
    ),
    (
        "oidc-allowed-domains",
        "",
        None,
        "Comma-separated email domains allowed to sign in (empty: any)",
    ),
    (
        "oidc-recheck-interval",
        900.0,
        _positive_float,
        "Seconds between checks with the provider that a signed-in user may still sign in",
    ),
    (
        "public-url",
        None,
        None,
        "The URL users reach pulumid at (e.g. https://pulumi.example.com): sign-in redirects",
    ),
    (
        "cli-token-days",
        30.0,
        _positive_float,
        "Days a token minted by the browser login lives",
    ),
    (
        "google-hosted-domains",
        "",
        None,
        "google mode: comma-separated Workspace domains (`hd` claim) allowed to sign in",
    ),
    (
        "google-service-account-file",
        None,
        None,
        "google mode: key file of a service account with domain-wide delegation, to read "
        "people's Workspace groups (without it, google mode has no groups)",
    ),
    (
        "google-admin-email",
        None,
        None,
        "google mode: the Workspace admin the service account acts as for the groups",
    ),
    (
        "google-directory-url",
        "https://admin.googleapis.com/admin/directory/v1",
        None,
        "google mode: the Admin SDK Directory API base URL",
    ),
]


def env_name(option: str) -> str:
    return "PULUMID_" + option.upper().replace("-", "_")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# name, default, help: each gets --name and --no-name, and PULUMID_NAME=true/false.
_BOOLEANS: list[tuple[str, bool, str]] = [
    (
        "sync-commits",
        True,
        "fsync every commit, so acknowledged writes survive power loss (--no-sync-commits "
        "keeps only what survives a crash of the process)",
    ),
    (
        "journaling",
        True,
        "accept journal entries from CLIs that offer them (3.225+), instead of checkpoints",
    ),
    (
        "insecure-http",
        False,
        "allow the API on a non-loopback address without TLS (behind a TLS-terminating proxy)",
    ),
    (
        "acme-staging",
        False,
        "use Let's Encrypt's staging directory (certificates no browser trusts, for trials)",
    ),
    (
        "delta-checkpoints",
        True,
        "advertise delta checkpoints to CLIs that do not journal (their checkpoint writer then "
        "drops pending operations: turn off to keep them)",
    ),
]


def _boolean(var: str, raw: str) -> bool:
    if raw.lower() not in _TRUE | _FALSE:
        raise usage.UsageError(f"{var}: not a boolean: {raw}")
    return raw.lower() in _TRUE


class Options(usage.Options):
    optParameters = [
        [name, None, default, text, coerce] for name, default, coerce, text in _PARAMETERS
    ]
    optFlags = [[name, None, text] for name, _default, text in _BOOLEANS] + [
        [f"no-{name}", None, f"turn off --{name}"] for name, _default, _text in _BOOLEANS
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.from_env: dict[str, Any] = {}
        for name, _default, coerce, _text in _PARAMETERS:
            var = env_name(name)
            self.docs[name] = f"{self.docs.get(name, '')} (env {var})"
            raw = os.environ.get(var)
            if raw is None:
                continue
            try:
                value = coerce(raw) if coerce else raw
            except ValueError as e:
                raise usage.UsageError(f"{var}: {e}") from e
            self[name] = self.defaults[name] = self.from_env[name] = value
        self.booleans: dict[str, bool] = {}
        for name, default, _text in _BOOLEANS:
            var = env_name(name)
            raw = os.environ.get(var)
            self.booleans[name] = default if raw is None else _boolean(var, raw)
            self.docs[name] += f" (env {var}) [default: {str(self.booleans[name]).lower()}]"

    def opt_listen(self, value: str) -> None:
        """API listener, a Twisted endpoint description; may be repeated
        (env PULUMID_LISTEN, comma-separated) [default: tcp:8080:interface=127.0.0.1]"""
        self["listen"].append(value)

    def postOptions(self) -> None:
        self.config = build_config(self)
        self._log_through_pulumid()

    def _log_through_pulumid(self) -> None:
        """Give twistd pulumid's log observer, unless its own --logger was chosen."""
        parent: Any = getattr(self, "parent", None)
        if parent is None or parent.get("logger"):
            return
        from pulumid.ops import logs

        config = self.config
        main = parent.get("logfile") or ("-" if parent.get("nodaemon") else "twistd.log")
        # twistd takes the name of a factory (it imports it after these options are done).
        logs.SETTINGS = logs.LogSettings(
            config.log_format, main, config.log_types, config.access_log, config.auth.audit_log
        )
        parent["logger"] = "pulumid.ops.logs.twistd_observer"


def _secret(opts: usage.Options | dict[str, Any], name: str) -> str | None:
    """A value that may come inline or from a file: flags beat env vars, whichever form."""
    from_env: dict[str, Any] = getattr(opts, "from_env", {})

    def given(option: str, on_command_line: bool) -> bool:
        value = opts.get(option)
        if value is None:
            return False
        came_from_env = option in from_env and from_env[option] == value
        return came_from_env != on_command_line

    for on_command_line in (True, False):
        inline, from_file = given(name, on_command_line), given(f"{name}-file", on_command_line)
        if inline and from_file:
            where = "on the command line" if on_command_line else "in the environment"
            raise usage.UsageError(f"give either --{name} or --{name}-file {where}, not both")
        if inline:
            return str(opts[name])
        if from_file:
            return _read_file(f"{name}-file", opts[f"{name}-file"])
    return None


def _flag(opts: usage.Options | dict[str, Any], name: str) -> bool:
    if opts.get(f"no-{name}"):
        return False
    if opts.get(name):
        return True
    booleans: dict[str, bool] = getattr(opts, "booleans", {})
    return booleans.get(name, {n: d for n, d, _ in _BOOLEANS}[name])


def build_config(opts: usage.Options | dict[str, Any]) -> Config:
    listen = list(opts["listen"]) if opts.get("listen") else []
    if not listen:
        env_listen = os.environ.get(env_name("listen"), "tcp:8080:interface=127.0.0.1")
        listen = [part.strip() for part in env_listen.split(",") if part.strip()]
    insecure_http = _flag(opts, "insecure-http")
    tls_cert, tls_key = _text(opts, "tls-cert"), _text(opts, "tls-key")
    if bool(tls_cert) != bool(tls_key):
        raise usage.UsageError("--tls-cert and --tls-key go together")
    if tls_cert:
        from pulumid.ops.tls import TLSFilesError, load_options

        try:
            load_options(Path(tls_cert), Path(tls_key))
        except TLSFilesError as e:
            raise usage.UsageError(f"TLS: {e}") from None
    acme_domains = tuple(d.strip() for d in _text(opts, "acme-domains").split(",") if d.strip())
    if acme_domains and tls_cert:
        raise usage.UsageError(
            "--acme-domains and --tls-cert both choose the API's certificate: give one"
        )
    acme_directory = (
        _text(opts, "acme-directory") or "https://acme-v02.api.letsencrypt.org/directory"
    )
    if _flag(opts, "acme-staging"):
        acme_directory = "https://acme-staging-v02.api.letsencrypt.org/directory"
    secured = bool(tls_cert or acme_domains)
    for description in listen:
        if not insecure_http and not secured and plain_http_beyond_loopback(description):
            raise usage.UsageError(
                f"--listen {description} serves plain HTTP beyond this machine: tokens and "
                "state would cross the network in clear. Use TLS, or pass --insecure-http "
                "(PULUMID_INSECURE_HTTP=true) behind a proxy that terminates TLS"
            )
    management = _text(opts, "management-listen") or "tcp:9090:interface=127.0.0.1"
    log_format = (_text(opts, "log-format") or "json").lower()
    if log_format not in ("json", "text"):
        raise usage.UsageError(f"--log-format must be json or text, not {log_format!r}")
    raw_types = _text(opts, "log-types") or "operational,access,audit"
    log_types = tuple(t.strip() for t in raw_types.split(",") if t.strip())
    unknown = sorted(set(log_types) - {"operational", "access", "audit"})
    if unknown:
        raise usage.UsageError(f"--log-types: unknown {unknown[0]!r} (operational, access, audit)")
    auth = _auth_config(opts)
    token = _secret(opts, "token") or ""
    if auth.multi_user:
        if token:
            raise usage.UsageError(
                f"--auth-mode {auth.mode} has no shared token: remove --token / --token-file "
                "(PULUMID_TOKEN / PULUMID_TOKEN_FILE); people sign in, machines use their tokens"
            )
    elif not token:
        raise usage.UsageError(
            "an access token is required: pass --token (or --token-file), or set PULUMID_TOKEN"
        )
    elif len(token) < 8:
        raise usage.UsageError("the access token must be at least 8 characters long")
    master_key = _secret(opts, "master-key")
    if master_key is not None and not _HEX64.match(master_key):
        raise usage.UsageError("the master key must be exactly 64 hexadecimal characters")
    for what in ("organization", "user"):
        if not _OWNER.match(str(opts[what])):
            raise usage.UsageError(
                f"--{what} must be 3-40 letters, digits, '-' or '_', not {opts[what]!r}"
            )
    database = str(opts["database"]).strip()
    if not database:
        raise usage.UsageError("--database must name a SQLite file or a postgresql:// URL")
    blob_store = str(opts["blob-store"]).strip()
    if blob_store != "inline":
        from pulumid.storage.blobs import parse_s3_url

        try:
            parse_s3_url(blob_store)
        except ValueError as e:
            raise usage.UsageError(f"--blob-store: {e}") from None
    secrets_key = _text(opts, "secrets-key") or "local"
    previous_keys = tuple(
        k.strip() for k in _text(opts, "previous-secrets-keys").split(",") if k.strip()
    )
    for option, spec in [("--secrets-key", secrets_key)] + [
        ("--previous-secrets-keys", k) for k in previous_keys
    ]:
        from pulumid.secrets.keys import KeySpec

        try:
            KeySpec.parse(spec)
        except ValueError as e:
            raise usage.UsageError(f"{option}: {e}") from None
    needs_local = "local" in (secrets_key, *previous_keys)
    backup_to = tuple(d.strip() for d in _text(opts, "backup-to").split(",") if d.strip())
    if backup_to:
        from pulumid.ops.backups import parse_destination

        for spec in backup_to:
            try:
                parse_destination(spec, 1, 0.0)
            except ValueError as e:
                raise usage.UsageError(f"--backup-to: {e}") from None
    if float(opts["backup-schedule"]) and not backup_to:
        raise usage.UsageError("--backup-schedule needs somewhere to put them: --backup-to")
    if is_postgres(database) and master_key is None and needs_local:
        raise usage.UsageError(
            "with PostgreSQL, every node needs the same secrets master key: pass "
            "--master-key-file (or PULUMID_MASTER_KEY_FILE)"
        )
    return Config(
        listen=tuple(listen),
        database=database,
        blob_store=blob_store,
        db_pool_size=int(opts["db-pool-size"]),
        token=token,
        master_key=master_key.lower() if master_key else None,
        secrets_key=secrets_key,
        previous_secrets_keys=previous_keys,
        key_rotation_batch=int(opts["key-rotation-batch"]),
        gcp_credentials_file=_text(opts, "gcp-credentials-file"),
        backup_schedule=float(opts["backup-schedule"]),
        backup_to=backup_to,
        backup_keep=int(opts["backup-keep"]),
        backup_max_age=float(opts["backup-max-age"]),
        organization=opts["organization"],
        user=opts["user"],
        lease_ttl=float(opts["lease-ttl"]),
        state_versions=int(opts["state-versions"]),
        max_body_size=int(opts["max-body-size"]),
        page_size=int(opts["page-size"]),
        sync_commits=_flag(opts, "sync-commits"),
        journaling=_flag(opts, "journaling"),
        delta_checkpoints=_flag(opts, "delta-checkpoints"),
        delta_cutoff=int(opts["delta-cutoff"]),
        inflight_memory=int(opts["inflight-memory"]),
        event_retention_days=float(opts["event-retention-days"]),
        preview_retention_days=float(opts["preview-retention-days"]),
        update_retention_days=float(opts["update-retention-days"]),
        retention_interval=float(opts["retention-interval"]),
        test_faults=_faults(),
        auth=auth,
        management_listen=management,
        insecure_http=insecure_http,
        header_timeout=float(opts["header-timeout"]),
        body_timeout=float(opts["body-timeout"]),
        idle_timeout=float(opts["idle-timeout"]),
        max_connections_per_ip=int(opts["max-connections-per-ip"]),
        max_header_size=int(opts["max-header-size"]),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_reload_interval=float(opts.get("tls-reload-interval", 60.0)),
        acme_domains=acme_domains,
        acme_email=_text(opts, "acme-email"),
        acme_directory=acme_directory,
        acme_http_listen=_text(opts, "acme-http-listen") or "tcp:80",
        acme_renew_days=float(opts.get("acme-renew-days", 30.0)),
        acme_ca_file=_text(opts, "acme-ca-file"),
        acme_check_interval=float(opts.get("acme-check-interval", 3600.0)),
        otlp_endpoint=_text(opts, "otlp-endpoint"),
        otel_service_name=_text(opts, "otel-service-name") or "pulumid",
        log_format=log_format,
        log_types=log_types,
        access_log=_text(opts, "access-log"),
    )


_LOOPBACK = ("127.", "::1", "localhost")


def plain_http_beyond_loopback(description: str) -> bool:
    """Whether a Twisted endpoint description listens on TCP, without TLS, beyond loopback."""
    kind, _, rest = description.partition(":")
    if kind.lower() not in ("tcp", "tcp6") or not rest:
        return False  # ssl:, unix:, systemd: and the like
    parts = rest.replace("\\:", "\0").split(":")  # "\:" escapes a colon (IPv6)
    options = dict(p.replace("\0", ":").split("=", 1) for p in parts if "=" in p)
    interface = options.get("interface", "").strip("[]")
    return not interface.startswith(_LOOPBACK)


def _text(opts: usage.Options | dict[str, Any], name: str) -> str:
    value = opts.get(name)
    return "" if value is None else str(value).strip()


def _auth_config(opts: usage.Options | dict[str, Any]) -> AuthConfig:
    mode = _text(opts, "auth-mode") or "single-tenant"
    if mode not in AUTH_MODES:
        raise usage.UsageError(f"--auth-mode must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    auth = AuthConfig(
        mode=mode,
        rbac_config=_text(opts, "rbac-config"),
        trusted_proxies=_text(opts, "trusted-proxies"),
        audit_log=_text(opts, "audit-log"),
        audit_retention_days=float(opts.get("audit-retention-days", 365.0)),
        username_claim=_text(opts, "username-claim") or "email",
        groups_claim=_text(opts, "groups-claim") or "groups",
        jwt_secret=_secret(opts, "jwt-secret") or "",
        jwt_public_key=_read_file("jwt-public-key-file", _text(opts, "jwt-public-key-file"))
        if _text(opts, "jwt-public-key-file")
        else "",
        jwt_jwks_url=_text(opts, "jwt-jwks-url"),
        jwt_issuer=_text(opts, "jwt-issuer"),
        jwt_audience=_text(opts, "jwt-audience"),
        jwt_leeway=float(opts.get("jwt-leeway", 30.0)),
        oidc_issuer=_text(opts, "oidc-issuer").rstrip("/"),
        oidc_client_id=_text(opts, "oidc-client-id"),
        oidc_client_secret=_secret(opts, "oidc-client-secret") or "",
        oidc_scopes=_text(opts, "oidc-scopes") or "openid email profile",
        oidc_allowed_domains=_text(opts, "oidc-allowed-domains"),
        oidc_recheck_interval=float(opts.get("oidc-recheck-interval", 900.0)),
        public_url=_text(opts, "public-url").rstrip("/"),
        cli_token_days=float(opts.get("cli-token-days", 30.0)),
        google_hosted_domains=_text(opts, "google-hosted-domains"),
        google_service_account_file=_text(opts, "google-service-account-file"),
        google_admin_email=_text(opts, "google-admin-email"),
        google_directory_url=_text(opts, "google-directory-url")
        or "https://admin.googleapis.com/admin/directory/v1",
    )
    _check_auth(auth)
    return auth


def _check_auth(auth: AuthConfig) -> None:
    from pulumid.auth.service import parse_networks

    try:
        parse_networks(auth.trusted_proxies)
    except ValueError as e:
        raise usage.UsageError(f"--trusted-proxies: {e}") from None
    if not auth.multi_user:
        return
    if not auth.rbac_config:
        raise usage.UsageError(
            f"--auth-mode {auth.mode} needs --rbac-config (PULUMID_RBAC_CONFIG): the YAML file "
            "that says who may do what (see conf/rbac.yaml); without it nobody could"
        )
    from pulumid.auth.rbac import PolicyError, load_policy

    try:
        load_policy(Path(auth.rbac_config))
    except PolicyError as e:
        raise usage.UsageError(str(e)) from None
    if auth.mode == "jwt":
        keys = [bool(auth.jwt_secret), bool(auth.jwt_public_key), bool(auth.jwt_jwks_url)]
        if sum(keys) != 1:
            raise usage.UsageError(
                "--auth-mode jwt needs exactly one of --jwt-secret(-file), "
                "--jwt-public-key-file or --jwt-jwks-url"
            )
        if auth.jwt_secret and len(auth.jwt_secret) < 32:
            raise usage.UsageError("--jwt-secret must be at least 32 characters long")
    if auth.mode in ("oidc", "google"):
        missing = [
            flag
            for flag, value in (
                ("--oidc-issuer", auth.oidc_issuer or auth.mode == "google"),
                ("--oidc-client-id", auth.oidc_client_id),
                ("--oidc-client-secret", auth.oidc_client_secret),
                ("--public-url", auth.public_url),
            )
            if not value
        ]
        if missing:
            raise usage.UsageError(f"--auth-mode {auth.mode} needs {', '.join(missing)}")
        if not auth.public_url.startswith(("http://", "https://")):
            raise usage.UsageError("--public-url must start with http:// or https://")
    if auth.mode == "google" and not auth.google_hosted_domains:
        raise usage.UsageError(
            "--auth-mode google needs --google-hosted-domains: the Workspace domains allowed"
        )
    if auth.google_service_account_file:
        from pulumid.auth.google import ServiceAccount

        if not auth.google_admin_email:
            raise usage.UsageError(
                "--google-service-account-file needs --google-admin-email (the Workspace admin "
                "it acts as to read groups)"
            )
        try:
            ServiceAccount.load(auth.google_service_account_file)
        except ValueError as e:
            raise usage.UsageError(f"--google-service-account-file: {e}") from None


def _faults() -> str:
    spec = os.environ.get("PULUMID_TEST_FAULTS", "")
    if spec:
        from pulumid.storage.faults import Faults

        try:
            Faults.parse(spec)
        except ValueError as e:
            raise usage.UsageError(f"PULUMID_TEST_FAULTS: {e}") from None
    return spec


def env_file(active: dict[str, str]) -> str:
    """A commented copy of every PULUMID_* variable with its help and default (an
    EnvironmentFile for a service manager); the variables in ACTIVE are set, not commented."""
    import textwrap

    entries: list[tuple[str, str, str]] = [
        ("listen", "tcp:8080:interface=127.0.0.1", "API listeners, comma-separated endpoints")
    ]
    for name, default, _coerce, text in _PARAMETERS:
        entries.append((name, "" if default is None else str(default), text))
    for name, flag, text in _BOOLEANS:
        entries.append((name, "true" if flag else "false", text))
    lines = [
        "# pulumid's environment: every PULUMID_* variable `twistd pulumid --help` documents.",
        "# Flags on the command line win over these. Secrets belong in files (the *_FILE",
        "# variables), readable only by the service user.",
    ]
    for name, default, text in entries:
        var = env_name(name)
        lines.append("")
        lines.extend(textwrap.wrap(text, 88, initial_indent="# ", subsequent_indent="# "))
        if var in active:
            lines.append(f"{var}={active[var]}")
        else:
            lines.append(f"#{var}={default}")
    unknown = sorted(set(active) - {env_name(name) for name, _d, _t in entries})
    if unknown:
        raise ValueError(f"not pulumid variables: {', '.join(unknown)}")
    return "\n".join(lines) + "\n"
