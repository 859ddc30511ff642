"""Roles, ordered: each one can do what the ones below it can."""

from __future__ import annotations

from enum import IntEnum


class Role(IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, value: object, where: str) -> Role:
        if isinstance(value, str) and value.strip().upper() in cls.__members__:
            return cls[value.strip().upper()]
        raise ValueError(f"{where}: role must be one of none, read, write, admin, not {value!r}")

    @property
    def label(self) -> str:
        return self.name.lower()
