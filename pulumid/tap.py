"""`twistd pulumid`: Options and makeService, the one place that knows the concrete classes."""

from __future__ import annotations

import os
import sys
from typing import Any, cast

from twisted.application import service, strports
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

from pulumid.api.app import API
from pulumid.api.gate import Gate
from pulumid.api.http import limited_request_factory
from pulumid.config import Config, Options
from pulumid.engine.backend import Backend
from pulumid.engine.events import EventWriter
from pulumid.engine.inflight import InFlight
from pulumid.engine.secrets import MasterKeyMismatch, StackSecrets
from pulumid.secrets.crypto import MasterKey
from pulumid.services.timers import SafeTimer
from pulumid.storage.faults import Faults
from pulumid.storage.sqlite import SchemaTooNew, SQLiteStore, StorageUnusable
from pulumid.threads import InlineRunner, PoolRunner, cpu_pool_size

__all__ = ["Options", "makeService"]


class _StoreService(service.Service):
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.setName("storage")

    def stopService(self) -> None:
        super().stopService()
        self.store.close()


def _master_key(config: Config) -> MasterKey:
    if config.master_key:
        return MasterKey.from_hex(config.master_key)
    key_file = config.database.with_name(config.database.name + ".master-key")
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


def make_backend(config: Config, reactor: Any) -> tuple[service.MultiService, Backend]:
    top = service.MultiService()
    db = PoolRunner(reactor, "db", 1)
    cpu = PoolRunner(reactor, "cpu", cpu_pool_size())
    try:
        store = SQLiteStore.open(
            config.database,
            db,
            sync_commits=config.sync_commits,
            faults=Faults.parse(config.test_faults),
        )
    except (SchemaTooNew, StorageUnusable) as e:
        raise usage.UsageError(str(e)) from e
    _StoreService(store).setServiceParent(top)
    master = _master_key(config)
    # Before the threads run, check the key on this thread with an inline store.
    startup = StackSecrets(SQLiteStore(store._conn, InlineRunner()), master, InlineRunner())
    checked: Deferred[None] = Deferred.fromCoroutine(startup.check_master_key())
    failures: list[Failure] = []
    checked.addErrback(failures.append)
    if failures:
        store.close()
        if failures[0].check(MasterKeyMismatch):
            raise usage.UsageError(str(failures[0].value))
        failures[0].raiseException()
    db.setServiceParent(top)
    cpu.setServiceParent(top)
    secrets = StackSecrets(store, master, cpu)
    events = EventWriter(store)
    inflight = InFlight(store, cpu, reactor, config.max_body_size, config.inflight_memory)
    backend = Backend(config, store, reactor, cpu, secrets, events, inflight)
    sweep = max(0.5, min(config.lease_ttl / 4, 15.0))
    SafeTimer("lease-expiry", sweep, backend.expire_leases, clock=reactor).setServiceParent(top)
    SafeTimer(
        "retention", config.retention_interval, backend.apply_retention, clock=reactor, now=False
    ).setServiceParent(top)
    return top, backend


def make_site(backend: Backend) -> Site:
    config = backend.config
    site = Site(API(backend).resource())
    site.requestFactory = limited_request_factory(
        config.max_body_size, Gate(config.token, backend.store)
    )
    site.displayTracebacks = False
    return site


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    config: Config = options.config
    top, backend = make_backend(config, reactor)
    site = make_site(backend)
    for description in config.listen:
        listener = strports.service(description, site)
        listener.setName(f"api:{description}")
        listener.setServiceParent(top)
    return cast(service.IService, top)
