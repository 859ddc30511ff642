"""`pulumid-admin`: offline maintenance of a pulumid database (the daemon stopped).

`databases` opens a database of either engine, raw and through the Store seam; `port` copies
a whole database to another engine (SQLite, PostgreSQL; blobs inline or in S3) and verifies
the copy stack by stack. Later commands (backup, restore, verify) sit beside it in
`pulumid.admin.__main__`.
"""
