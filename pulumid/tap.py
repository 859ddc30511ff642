"""`twistd pulumid`: Options and makeService, the one place that knows the concrete classes."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, cast

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

from pulumid.api.app import API
from pulumid.api.channel import GuardedChannel
from pulumid.api.gate import Gate
from pulumid.api.http import limited_request_factory
from pulumid.auth.access import Access, PolicyHolder
from pulumid.auth.authn import Authenticator
from pulumid.auth.exchange import TokenExchange
from pulumid.auth.google import ServiceAccount, WorkspaceGroups
from pulumid.auth.jwt import JWKSKeys, JWTVerifier, StaticKey, principal_of
from pulumid.auth.oidc import OIDCClient, Sealer
from pulumid.auth.outbound import fetch_json, get_json, post_form
from pulumid.auth.people import People
from pulumid.auth.principal import Principal
from pulumid.auth.rbac import Policy, PolicyReloader, load_policy
from pulumid.auth.service import Auth, parse_networks
from pulumid.config import AuthConfig, Config, Options
from pulumid.engine.backend import Backend
from pulumid.engine.events import EventWriter
from pulumid.engine.inflight import InFlight
from pulumid.engine.secrets import MasterKeyMismatch, StackSecrets
from pulumid.ops.access import APISite
from pulumid.ops.acme import ACME, Challenges
from pulumid.ops.acme import Settings as ACMESettings
from pulumid.ops.audit import AuditTrail
from pulumid.ops.backups import Backups, Snapshot, parse_destination
from pulumid.ops.management import Check, Management
from pulumid.ops.metrics import Metrics
from pulumid.ops.tls import ReloadingTLS, SwappableTLS
from pulumid.ops.tracing import Tracing
from pulumid.secrets.crypto import MasterKey
from pulumid.secrets.keys import Keyring, KeyUnavailable, build_keyring
from pulumid.secrets.rotation import KeyRotation
from pulumid.services.timers import SafeTimer
from pulumid.storage.blobs import S3Blobs
from pulumid.storage.faults import Faults
from pulumid.storage.interface import Store
from pulumid.storage.split import BlobbedStore
from pulumid.storage.sql import SQLStore
from pulumid.storage.sqlite import SchemaTooNew, SQLiteStore, StorageUnusable
from pulumid.threads import InlineRunner, PoolRunner, Runner, cpu_pool_size, tune_allocator

__all__ = ["Options", "makeService"]

# Object storage requests in flight at once per node.
BLOB_THREADS = 8
# KMS calls in flight at once (each a blocking HTTP request).
KMS_THREADS = 4


class _TracingService(service.Service):
    """Flushes the spans still batched when the daemon stops."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def stopService(self) -> None:
        super().stopService()
        self.tracing.shutdown()


class _StoreService(service.Service):
    """Closes the store; added before the thread pools, so it stops after they have joined
    (and with them any write still queued, such as audit rows)."""

    def __init__(self) -> None:
        self.store: Store | None = None
        self.setName("storage")

    def stopService(self) -> None:
        super().stopService()
        if self.store is not None:
            self.store.close()


def _master_key(config: Config) -> MasterKey:
    if config.master_key:
        return MasterKey.from_hex(config.master_key)
    database = config.sqlite_path
    key_file = database.with_name(database.name + ".master-key")
    if key_file.exists():
        return MasterKey.from_hex(key_file.read_text().strip())
    key = MasterKey.generate()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    sys.stderr.write(
        "\n*** pulumid: no master key was given, so a new one was generated and written\n"
        f"*** to {key_file} (mode 0600). Back that file up somewhere safe and pass it\n"
        "*** with --master-key-file (or PULUMID_MASTER_KEY_FILE): without it, no secret\n"
        "*** in this database can ever be decrypted again.\n\n"
    )
    return key


def _open_metadata(config: Config, db: Runner) -> tuple[Store, Store]:
    """The metadata store on DB's threads, and one for startup checks on this thread."""
    faults = Faults.parse(config.test_faults)
    if config.postgres:
        import psycopg

        from pulumid.storage.postgres import PostgresStore

        try:
            pg = PostgresStore.open(config.database, db, faults=faults)
        except psycopg.Error as e:
            raise usage.UsageError(f"cannot open the PostgreSQL database: {e}") from e
        except SchemaTooNew as e:
            raise usage.UsageError(str(e)) from e
        return pg, PostgresStore(config.database, InlineRunner())
    try:
        sqlite = SQLiteStore.open(
            config.sqlite_path, db, sync_commits=config.sync_commits, faults=faults
        )
    except (SchemaTooNew, StorageUnusable) as e:
        raise usage.UsageError(str(e)) from e
    return sqlite, SQLiteStore(sqlite._conn, InlineRunner())


def _open_blobs(config: Config, meta: Store, top: service.MultiService, reactor: Any) -> Store:
    """META itself when blobs stay inline; else META with blobs in object storage."""
    if config.blob_store == "inline":
        return meta
    runner = PoolRunner(reactor, "blobs", BLOB_THREADS)
    runner.setServiceParent(top)
    return BlobbedStore(meta, S3Blobs.open(config.blob_store, runner, max_connections=BLOB_THREADS))


def _blob_pools(top: service.MultiService) -> list[PoolRunner]:
    return [s for s in top if isinstance(s, PoolRunner) and s.name == "threads-blobs"]


def _metrics(meta: Store, pools: list[PoolRunner]) -> Metrics:
    metrics = Metrics()
    if isinstance(meta, SQLStore):
        histogram = metrics.db_seconds
        meta.timing = lambda name, seconds: histogram.labels(name).observe(seconds)

    def queued() -> dict[str, float]:
        return {p.pool.name or "": float(p.backlog) for p in pools}

    def busy() -> dict[str, float]:
        return {p.pool.name or "": float(p.busy) for p in pools}

    metrics.gauge("pulumid_thread_pool_queue_depth", "Calls waiting for a thread", queued, "pool")
    metrics.gauge("pulumid_thread_pool_busy_threads", "Threads running a call", busy, "pool")
    return metrics


def make_backend(config: Config, reactor: Any) -> tuple[service.MultiService, Backend]:
    top = service.MultiService()
    db = PoolRunner(reactor, "db", config.db_pool_size if config.postgres else 1)
    cpu = PoolRunner(reactor, "cpu", cpu_pool_size())
    meta, startup_store = _open_metadata(config, db)
    uses_local = "local" in (config.secrets_key, *config.previous_secrets_keys)
    master = _master_key(config) if uses_local else None
    # Before the threads run, check the keys on this thread: inline store, inline KMS calls.
    try:
        startup_keys = _keyring(config, master, InlineRunner())
    except ValueError as e:
        meta.close()
        raise usage.UsageError(str(e)) from None
    startup = StackSecrets(startup_store, startup_keys, InlineRunner())
    site_key: list[bytes] = []

    async def check() -> None:
        await startup.check_keys()
        site_key.append(await startup.site_key())

    checked: Deferred[None] = Deferred.fromCoroutine(check())
    failures: list[Failure] = []
    checked.addErrback(failures.append)
    if startup_store is not meta and config.postgres:
        startup_store.close()
    if failures:
        meta.close()
        if failures[0].check(MasterKeyMismatch, KeyUnavailable):
            raise usage.UsageError(str(failures[0].value))
        failures[0].raiseException()
    storage = _StoreService()
    storage.setServiceParent(top)
    db.setServiceParent(top)
    cpu.setServiceParent(top)
    store = storage.store = _open_blobs(config, meta, top, reactor)
    kms: Runner = cpu
    if any(k.startswith(("awskms:", "gcpkms:")) for k in startup_keys.keys):
        kms = PoolRunner(reactor, "kms", KMS_THREADS)
        kms.setServiceParent(top)
    secrets = StackSecrets(store, _keyring(config, master, kms), cpu)
    events = EventWriter(store)
    inflight = InFlight(store, cpu, reactor, config.max_body_size, config.inflight_memory)
    backend = Backend(config, store, reactor, cpu, secrets, events, inflight)
    backend.metrics = _metrics(meta, [db, cpu, *_blob_pools(top)])
    if config.otlp_endpoint:
        backend.tracing = Tracing.otlp(config.otlp_endpoint, config.otel_service_name)
        if isinstance(meta, SQLStore):
            meta.tracing = backend.tracing
        _TracingService(backend.tracing).setServiceParent(top)
    running: dict[str, float] = {"updates": 0.0, "leases": 0.0}

    async def count_running() -> None:
        updates, leases = await store.count_running(reactor.seconds())
        running.update(updates=float(updates), leases=float(leases))

    backend.metrics.gauge(
        "pulumid_running",
        "Running updates, and live leases among them (all nodes)",
        lambda: running,
        "kind",
    )
    SafeTimer("running-gauges", 15.0, count_running, clock=reactor).setServiceParent(top)
    sweep = max(0.5, min(config.lease_ttl / 4, 15.0))
    SafeTimer("lease-expiry", sweep, backend.expire_leases, clock=reactor).setServiceParent(top)
    SafeTimer(
        "retention", config.retention_interval, backend.apply_retention, clock=reactor, now=False
    ).setServiceParent(top)
    if isinstance(store, BlobbedStore):
        SafeTimer(
            "blob-collection",
            config.retention_interval,
            lambda: collect_blobs(store, backend),
            clock=reactor,
            now=False,
        ).setServiceParent(top)
    rotation = KeyRotation(
        store,
        secrets.keyring,
        reactor,
        backend.node,
        config.key_rotation_batch,
        getattr(meta, "faults", None),
    )
    backend.rotation = rotation
    SafeTimer("key-rotation", 30.0, rotation.tick, clock=reactor).setServiceParent(top)
    backend.metrics.gauge(
        "pulumid_secrets_data_keys",
        "Stacks' data keys by the key that wraps them",
        lambda: {k or "(unnamed)": float(n) for k, n in rotation.counts.items()},
        "key_id",
    )
    if config.backup_to:
        backend.backups = make_backups(config, backend, top, reactor)
    backend.auth = make_auth(config, backend, reactor, top, site_key[0])
    return top, backend


def _keyring(config: Config, master: MasterKey | None, runner: Runner) -> Keyring:
    return build_keyring(
        config.secrets_key,
        config.previous_secrets_keys,
        master,
        runner,
        config.gcp_credentials_file,
    )


def make_backups(
    config: Config, backend: Backend, top: service.MultiService, reactor: Any
) -> Backups:
    runner = PoolRunner(reactor, "backup", 1)
    runner.setServiceParent(top)
    snapshot = Snapshot(config.database, config.blob_store, config.postgres)
    destinations = [
        parse_destination(spec, config.backup_keep, config.backup_max_age)
        for spec in config.backup_to
    ]
    backups = Backups(snapshot, destinations, runner, backend.store, reactor, backend.node)
    backups.register(backend.metrics)
    if config.backup_schedule:
        interval = config.backup_schedule
        SafeTimer(
            "backups", interval, lambda: backups.scheduled(interval), clock=reactor
        ).setServiceParent(top)
    return backups


def make_auth(
    config: Config,
    backend: Backend,
    reactor: Any,
    top: service.MultiService,
    site_key: bytes,
) -> Auth:
    """Authentication, the RBAC policy (reloaded on SIGHUP), the audit trail, their timers."""
    settings = config.auth
    policy = load_policy(Path(settings.rbac_config)) if settings.multi_user else Policy()
    holder = PolicyHolder(policy)
    if settings.multi_user:
        backend.organizations = lambda: list(holder.policy.organizations)
        PolicyReloader(holder, Path(settings.rbac_config)).setServiceParent(top)
    authenticator = Authenticator(
        backend.store,
        reactor,
        site_token=config.token,
        site_login=config.user,
        multi_user=settings.multi_user,
        jwt_check=_jwt_check(settings, reactor) if settings.mode == "jwt" else None,
    )
    auth = Auth(
        mode=settings.mode,
        authenticator=authenticator,
        access=Access(holder),
        audit=AuditTrail(backend.store, reactor),
        trusted_proxies=parse_networks(settings.trusted_proxies),
        exchange=TokenExchange(lambda: holder.policy, backend.store, reactor, fetch_json),
    )
    SafeTimer(
        "token-last-used", 60.0, authenticator.flush_last_used, clock=reactor, now=False
    ).setServiceParent(top)
    if settings.mode in ("oidc", "google"):
        sealer = Sealer(site_key, b"pulumid sign-in")
        client = OIDCClient(settings, reactor, fetch_json, post_form, sealer)
        auth.people = People(
            client,
            backend.store,
            reactor,
            sealer,
            authenticator,
            auth.audit,
            settings.cli_token_days,
            backend.node,
            _workspace(settings, reactor),
        )
        SafeTimer(
            "oidc-recheck",
            settings.oidc_recheck_interval,
            auth.people.recheck,
            clock=reactor,
            now=False,
        ).setServiceParent(top)
    return auth


def _workspace(settings: AuthConfig, reactor: Any) -> WorkspaceGroups | None:
    if settings.mode != "google" or not settings.google_service_account_file:
        return None
    return WorkspaceGroups(
        ServiceAccount.load(settings.google_service_account_file),
        settings.google_admin_email,
        get_json,
        post_form,
        reactor,
        settings.google_directory_url,
    )


def _jwt_check(settings: AuthConfig, reactor: Any) -> Any:
    keys: StaticKey | JWKSKeys
    if settings.jwt_secret:
        keys = StaticKey.secret(settings.jwt_secret)
    elif settings.jwt_public_key:
        keys = StaticKey.public(settings.jwt_public_key)
    else:
        keys = JWKSKeys(settings.jwt_jwks_url, fetch_json, reactor)
    verifier = JWTVerifier(
        keys, reactor, settings.jwt_issuer, settings.jwt_audience, settings.jwt_leeway
    )

    async def check(token: str) -> Principal:
        claims = await verifier.verify(token)
        principal: Principal = principal_of(claims, settings.username_claim, settings.groups_claim)
        return principal

    return lambda token: Deferred.fromCoroutine(check(token))


async def collect_blobs(store: BlobbedStore, backend: Backend) -> int:
    """Delete orphaned blobs; one node per interval does it."""
    now = backend.clock.seconds()
    until = now + backend.config.retention_interval * 0.9
    if not await store.claim("blob-collection", backend.node, now, until):
        return 0
    deleted = await store.collect(time.time())
    if deleted:
        backend.log.info("deleted {count} orphaned blobs", count=deleted)
    return deleted


def make_site(backend: Backend) -> Site:
    config = backend.config
    auth: Auth = backend.auth
    site = APISite(API(backend, auth).resource(), timeout=config.idle_timeout)
    site.metrics = backend.metrics
    site.max_per_peer = config.max_connections_per_ip
    site.protocol = type(  # type: ignore[assignment]
        "PulumidChannel",
        (GuardedChannel,),
        {
            "header_timeout": config.header_timeout,
            "body_timeout": config.body_timeout,
            "totalHeadersSize": config.max_header_size,
        },
    )
    site.requestFactory = limited_request_factory(config.max_body_size, Gate(auth.authenticator))
    site.displayTracebacks = False
    return site


def make_acme(
    config: Config, backend: Backend, tls: SwappableTLS, top: service.MultiService, reactor: Any
) -> ACME:
    """The ACME service: its HTTP-01 listener and the timer that issues and renews."""
    challenges = Challenges(backend.store)
    settings = ACMESettings(
        directory=config.acme_directory,
        names=config.acme_domains,
        email=config.acme_email,
        renew_days=config.acme_renew_days,
        ca_file=config.acme_ca_file,
    )
    acme = ACME(settings, backend.store, reactor, tls, challenges, backend.node)
    listener = strports.service(config.acme_http_listen, Site(challenges))
    listener.setName("acme-http")
    listener.setServiceParent(top)
    SafeTimer(
        "acme", config.acme_check_interval, acme.check, clock=reactor, wait_on_stop=False
    ).setServiceParent(top)
    return acme


def make_management(
    backend: Backend, startup: StackSecrets, acme: ACME | None = None
) -> Management:
    """The management site's checks: the database answers, the master key still fits."""

    async def database() -> str | None:
        await backend.store.get_meta("master_key_canary")
        return None

    async def master_key() -> str | None:
        try:
            await startup.check_canary(startup.keyring.primary)
        except (MasterKeyMismatch, KeyUnavailable) as e:
            return str(e)
        return None

    async def schema() -> str | None:
        # A newer node may have migrated the database past what this one knows.
        current = await backend.store.schema_version()
        expected = int(getattr(backend.store, "expected_schema", current))
        if current != expected:
            return f"the database schema is version {current}; this node knows {expected}"
        return None

    checks: dict[str, Check] = {"database": database, "schema": schema, "master_key": master_key}
    if acme is not None:
        served = acme

        async def certificate() -> str | None:
            return served.problem()

        checks["certificate"] = certificate
    return Management(backend.metrics, checks)


def _listener(
    description: str, site: Site, tls: SwappableTLS | None, reactor: Any
) -> service.Service:
    """A tcp listener gets TLS when files are configured; other descriptions stay as given."""
    if tls is None or description.split(":", 1)[0].lower() not in ("tcp", "tcp6"):
        return cast(service.Service, strports.service(description, site))
    endpoint = serverFromString(reactor, description)
    return StreamServerEndpointService(endpoint, tls.wrap(site))


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    tune_allocator()
    config: Config = options.config
    top, backend = make_backend(config, reactor)
    site = make_site(backend)
    tls: SwappableTLS | None = None
    acme: ACME | None = None
    if config.tls_cert:
        files = ReloadingTLS(Path(config.tls_cert), Path(config.tls_key))
        SafeTimer(
            "tls-reload", config.tls_reload_interval, files.check, clock=reactor, now=False
        ).setServiceParent(top)
        tls = files
    elif config.acme_domains:
        tls = SwappableTLS()
        acme = make_acme(config, backend, tls, top, reactor)
    for description in config.listen:
        listener = _listener(description, site, tls, reactor)
        listener.setName(f"api:{description}")
        listener.setServiceParent(top)
    if tls is not None:
        served = tls
        backend.metrics.gauge(
            "pulumid_tls_certificate_expiry_timestamp_seconds",
            "When the served certificate expires (epoch seconds)",
            lambda: {"": served.not_after},
        )
    if config.management_listen.lower() != "none":
        management = make_management(backend, backend.secrets, acme)
        listener = strports.service(config.management_listen, management.site())
        listener.setName("management")
        listener.setServiceParent(top)
    return cast(service.IService, top)
