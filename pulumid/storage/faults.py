"""Fault points at the storage seam, for reliability tests; inert unless configured.

A spec is a comma-separated list of `ACTION@POINT:N`: at the N-th time the store reaches
POINT, do ACTION. Points: `commit` (just before COMMIT), `committed` (just after it),
`rollback` (just before ROLLBACK), `rewrapped` (after each batch of key rotation). Actions:
`kill` (SIGKILL the process: a crash at that instant) and `ioerror` (fail as a disk I/O
error would, once). Set with PULUMID_TEST_FAULTS.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from dataclasses import dataclass, field

ACTIONS = ("kill", "ioerror")
POINTS = ("commit", "committed", "rollback", "rewrapped")


@dataclass
class Faults:
    rules: dict[str, tuple[str, int]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        rules: dict[str, tuple[str, int]] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            action, _, rest = part.partition("@")
            point, _, count = rest.partition(":")
            if action not in ACTIONS or point not in POINTS or not count.isdecimal():
                raise ValueError(f"bad fault {part!r}: want ACTION@POINT:N, e.g. kill@commit:40")
            rules[point] = (action, int(count))
        return cls(rules)

    def arm(self, action: str, point: str, after: int = 0) -> None:
        """Fire `action` the next time (or the `after`+1-th time from now) `point` is hit."""
        self.rules[point] = (action, self.seen.get(point, 0) + after + 1)

    def hit(self, point: str) -> None:
        rule = self.rules.get(point)
        if rule is None:
            return
        count = self.seen[point] = self.seen.get(point, 0) + 1
        action, at = rule
        if count != at:
            return
        del self.rules[point]
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise sqlite3.OperationalError("disk I/O error (injected)")
