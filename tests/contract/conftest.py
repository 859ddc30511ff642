"""Fixtures for the contract tests: the session PostgreSQL server from tests/postgres.py, started
only when a test runs against the PostgreSQL store."""

from tests.postgres import postgres_server

__all__ = ["postgres_server"]
