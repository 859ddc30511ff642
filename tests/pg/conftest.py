"""Fixtures for the PostgreSQL tests: the session server from tests/postgres.py."""

from tests.postgres import postgres_server

__all__ = ["postgres_server"]
