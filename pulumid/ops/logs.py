"""The daemon's log: JSON lines by default (text as an option), one `log_type` per line.

`operational` is everything the daemon says about itself; `access` is one line per answered
request (method, route template, status, latency, bytes, user); `audit` is pulumid.ops.audit's.
`--log-types` chooses which reach the main log; `--access-log` and `--audit-log` send those
to destinations of their own. twistd is given this observer through its `logger` option
(see pulumid.config.Options.postOptions), so it applies from the first line.

No line carries a token, the master key or a secret: events name people by login and
requests by route template; request bodies and headers are never logged.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

LOG_TYPES = ("operational", "access", "audit")
# Structured fields copied from events onto their JSON line.
FIELDS = (
    "method",
    "route",
    "path",
    "status",
    "latency_ms",
    "bytes",
    "user",
    "client_ip",
    "actor",
    "action",
    "resource",
    "org",
    "description",
    "auth_failure",
)


def log_type(event: LogEvent) -> str:
    kind = event.get("log_type")
    return kind if kind in LOG_TYPES else "operational"


def open_stream(destination: str) -> IO[str]:
    if destination in ("", "-", "stdout"):
        return sys.stdout
    if destination == "stderr":
        return sys.stderr
    return Path(destination).open("a", buffering=1, encoding="utf-8")


def json_line(event: LogEvent) -> str:
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
        "level": getattr(event.get("log_level"), "name", "info"),
        "log_type": log_type(event),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for name in FIELDS:
        if name in event:
            line[name] = event[name]
    failure = event.get("log_failure")
    if failure is not None:
        line["traceback"] = failure.getTraceback()
    return json.dumps(line, default=str, ensure_ascii=False) + "\n"


@implementer(ILogObserver)
class Filtered:
    """Passes only events of some log types to another observer."""

    def __init__(self, types: Iterable[str], observer: Callable[[LogEvent], None]) -> None:
        self.types = frozenset(types)
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        if log_type(event) in self.types:
            self.observer(event)


def make_observer(
    log_format: str, destination: str, types: Iterable[str] = LOG_TYPES
) -> ILogObserver:
    """The observer of one destination: JSON or text lines of the given log types."""
    stream = open_stream(destination)
    inner: Callable[[LogEvent], None]
    if log_format == "text":
        inner = textFileLogObserver(stream)
    else:
        inner = FileLogObserver(stream, json_line)
    return Filtered(types, inner)


@implementer(ILogObserver)
class Fanout:
    def __init__(self, observers: list[ILogObserver]) -> None:
        self.observers = observers

    def __call__(self, event: LogEvent) -> None:
        for observer in self.observers:
            observer(event)


def daemon_observer(
    log_format: str,
    main: str,
    main_types: Iterable[str],
    access_log: str = "",
    audit_log: str = "",
) -> ILogObserver:
    """What twistd logs to: the main destination, plus access/audit destinations if set."""
    observers = [make_observer(log_format, main, main_types)]
    if access_log and access_log != "none":
        observers.append(make_observer(log_format, access_log, ["access"]))
    if audit_log and audit_log != "none":
        observers.append(make_observer(log_format, audit_log, ["audit"]))
    return Fanout(observers)


@dataclass(frozen=True)
class LogSettings:
    log_format: str = "json"
    main: str = "-"
    main_types: tuple[str, ...] = LOG_TYPES
    access_log: str = ""
    audit_log: str = ""


# Set by pulumid.config.Options when it runs under twistd; read by twistd_observer.
SETTINGS = LogSettings()


def twistd_observer() -> ILogObserver:
    """The factory twistd's `logger` option names: the observer of SETTINGS."""
    s = SETTINGS
    return daemon_observer(s.log_format, s.main, s.main_types, s.access_log, s.audit_log)
