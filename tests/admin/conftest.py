"""Fixtures for the admin tool tests: the session PostgreSQL server (tests/postgres.py) and
MinIO (tests/minio.py), each started only when a test needs it."""

from tests.minio import aws_env, minio_endpoint
from tests.postgres import postgres_server

__all__ = ["aws_env", "minio_endpoint", "postgres_server"]
