"""What only the PostgreSQL store has to get right: the shared SQL's `?` placeholders."""

from __future__ import annotations

from pulumid.storage.postgres import _Qmark, connect
from tests.postgres import PostgresServer


def test_placeholders_become_psycopgs_and_a_literal_percent_stays(
    postgres_server: PostgresServer,
) -> None:
    with connect(postgres_server.dsn) as conn:
        sql = _Qmark(conn)
        row = sql.execute("SELECT '100%' || ?, ? + 1, '%s'", ("!", 41)).fetchone()
        assert row == ("100%!", 42, "%s")
        assert sql.execute("SELECT '5%'").fetchone() == ("5%",)
        sql.execute("CREATE TEMPORARY TABLE t (a INT, b TEXT)")
        sql.executemany("INSERT INTO t (a, b) VALUES (?, ?)", [])
        sql.executemany("INSERT INTO t (a, b) VALUES (?, ?)", [(1, "x%"), (2, "?")])
        assert sql.execute("SELECT a, b FROM t ORDER BY a").fetchall() == [(1, "x%"), (2, "?")]
