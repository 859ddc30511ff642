"""`pulumid-admin COMMAND ...` (also `python -m pulumid.admin`): one subcommand per job.

Exit status: 0 done, 1 a verification found differences, 2 refused or failed (the message
says why; nothing was changed that a rerun would trip over).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from pulumid.admin import backups
from pulumid.admin.databases import AdminError
from pulumid.admin.port import PortOptions, port
from pulumid.ops.backups import BackupError
from pulumid.storage.blobs import parse_s3_url

PORT_HELP = """\
Copy a whole pulumid database into another one, then verify the copy: SQLite -> PostgreSQL
(+ S3) to move up, and back. SOURCE and DEST take the forms --database takes: a SQLite file
path, or a postgresql:// URL (or libpq "host=... dbname=..." string). Blob stores take the
forms --blob-store takes: 'inline' (default) or s3://bucket/prefix?endpoint=...; S3
credentials come from the AWS chain (AWS_ACCESS_KEY_ID, ...).

Stop the daemon(s) first: at the very least no update may run while porting. A SQLite file a
daemon has open is refused, and so is a source with running updates unless --allow-running
(they are then ported as running, and expire on the destination). The source is only read
(its schema is migrated to this version first, as the daemon would). DEST is created if it
is a new SQLite file; a PostgreSQL DEST must exist (createdb) and hold no stacks or updates.
The copy is one transaction on DEST: a failed port leaves it empty, to run again. Ids,
history, events, tags, aliases and the wrapped secrets keys are copied as they are: start the
daemon on DEST with the same master key.

Verification (always run after copying; alone with --verify-only) compares, for every stack,
each stored state version, the stack record, the history and the events of every update,
through the same store code the daemon uses. Any difference is listed and the exit status is 1.
"""


def _blob_store(value: str) -> str:
    value = value.strip()
    if value == "inline":
        return value
    try:
        parse_s3_url(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _database(value: str) -> str:
    value = value.strip()
    if not value:
        raise argparse.ArgumentTypeError("must name a SQLite file or a postgresql:// URL")
    return value


def _run_port(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    options = PortOptions(
        source=args.source,
        dest=args.dest,
        source_blobs=args.from_blob_store,
        dest_blobs=args.to_blob_store,
        allow_running=args.allow_running,
        verify_only=args.verify_only,
    )
    try:
        return port(options, out)
    except AdminError as e:
        out.flush()
        err.write(f"pulumid-admin port: {e}\n")
        err.flush()
        return 2


def _run_backups(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    try:
        if args.action == "list":
            return backups.list_backups(args.destination, out)
        keys = backups.load_keys(args.master_key_file or [])
        if args.action == "verify":
            return backups.verify(args.backup, keys, out)
        return backups.restore(args.backup, Path(args.to), keys, out)
    except (BackupError, ValueError, OSError) as e:
        out.flush()
        err.write(f"pulumid-admin backups {args.action}: {e}\n")
        err.flush()
        return 2


BACKUP_HELP = """\
Backups as the daemon takes them (--backup-to): NAME.db.gz (a gzip'd SQLite database) and
NAME.json (its manifest). BACKUP names either file: a path, or s3://bucket/prefix/NAME.json
(?endpoint=URL&region=R&path_style=true); S3 credentials come from the AWS chain.

  list DEST              the complete backups at a directory or s3:// prefix, newest first
  verify BACKUP          checksum, SQLite integrity, manifest; with --master-key-file, that
                         the key opens its canary in the backup
  restore BACKUP --to F  all of verify, then the database at F (a new path: never over a
                         database); says what it restored. Start pulumid on F with the same
                         master key; for PostgreSQL, port F into it (pulumid-admin port)
"""

Command = Callable[[argparse.Namespace, IO[str], IO[str]], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pulumid-admin",
        description="Offline maintenance of a pulumid database.",
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True)

    port_parser = commands.add_parser(
        "port",
        help="copy a whole database to another engine (SQLite <-> PostgreSQL, blobs inline "
        "or in S3) and verify it",
        description=PORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    port_parser.add_argument(
        "--from", dest="source", required=True, type=_database, metavar="SOURCE",
        help="the database to copy: SQLite path or postgresql:// URL",
    )  # fmt: skip
    port_parser.add_argument(
        "--to", dest="dest", required=True, type=_database, metavar="DEST",
        help="the database to fill: SQLite path or postgresql:// URL; must hold no stacks",
    )  # fmt: skip
    port_parser.add_argument(
        "--from-blob-store", default="inline", type=_blob_store, metavar="URL",
        help="where SOURCE keeps its blobs: 'inline' (default) or s3://...",
    )  # fmt: skip
    port_parser.add_argument(
        "--to-blob-store", default="inline", type=_blob_store, metavar="URL",
        help="where DEST keeps its blobs: 'inline' (default) or s3://... (its own prefix)",
    )  # fmt: skip
    port_parser.add_argument(
        "--allow-running", action="store_true",
        help="port running updates as running (they expire on the destination) instead of "
        "refusing",
    )  # fmt: skip
    port_parser.add_argument(
        "--verify-only", action="store_true",
        help="copy nothing: only compare SOURCE and DEST",
    )  # fmt: skip
    port_parser.set_defaults(run=_run_port)

    backup_parser = commands.add_parser(
        "backups",
        help="list, verify and restore backups",
        description=BACKUP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = backup_parser.add_subparsers(title="actions", dest="action", required=True)
    listing = actions.add_parser("list", help="the backups at a destination")
    listing.add_argument("destination", metavar="DEST", help="a directory or s3:// URL")
    for action in ("verify", "restore"):
        sub = actions.add_parser(action, help=f"{action} one backup")
        sub.add_argument("backup", metavar="BACKUP", help="NAME.json or NAME.db.gz, or s3://...")
        sub.add_argument(
            "--master-key-file", action="append", metavar="FILE",
            help="a local key (64 hex characters) that must open its canary; may be repeated",
        )  # fmt: skip
        if action == "restore":
            sub.add_argument("--to", required=True, metavar="FILE", help="the new database")
    backup_parser.set_defaults(run=_run_backups)
    return parser


def main(
    argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    return run(args, out or sys.stdout, err or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
