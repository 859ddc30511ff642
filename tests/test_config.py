"""Configuration (flags > PULUMID_* environment > defaults) and the twistd plugin."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IServiceMaker, MultiService
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError

from pulumid.config import Config, Options, env_name
from pulumid.tap import make_backend, makeService

KEY_A = "a" * 64
KEY_B = "B" * 64
TOKEN = "test-token-123"

FLAGS = [
    "listen",
    "database",
    "token",
    "token-file",
    "master-key",
    "master-key-file",
    "organization",
    "user",
    "lease-ttl",
    "event-retention-days",
    "state-versions",
    "max-body-size",
    "page-size",
    "sync-commits",
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PULUMID_"):
            monkeypatch.delenv(name)


def parse(*args: str) -> Config:
    options = Options()
    options.parseOptions(list(args))
    config: Config = options.config
    return config


def close(top: MultiService) -> None:
    top.getServiceNamed("storage").store.close()


def test_plugin_is_found() -> None:
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "pulumid" in makers
    assert makers["pulumid"].options is Options


def test_usage_mentions_every_flag_and_its_variable() -> None:
    usage = " ".join(Options().getUsage().split())
    for flag in FLAGS:
        assert f"--{flag}" in usage, flag
        assert env_name(flag) in usage, flag
    assert env_name("lease-ttl") == "PULUMID_LEASE_TTL"


def test_defaults() -> None:
    config = parse("--token", TOKEN)
    assert config == Config(token=TOKEN)
    assert config.listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.database == "pulumid.db"
    assert config.sqlite_path == Path("pulumid.db")
    assert not config.postgres
    assert config.blob_store == "inline"
    assert config.master_key is None
    assert config.lease_ttl == 300.0


def test_flag_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse("--token", TOKEN).lease_ttl == 300.0
    monkeypatch.setenv("PULUMID_LEASE_TTL", "10")
    monkeypatch.setenv("PULUMID_TOKEN", "env-token-456")
    monkeypatch.setenv("PULUMID_ORGANIZATION", "env-org")
    monkeypatch.setenv("PULUMID_MAX_BODY_SIZE", "4096")
    from_env = parse()
    assert (from_env.lease_ttl, from_env.token) == (10.0, "env-token-456")
    assert (from_env.organization, from_env.max_body_size) == ("env-org", 4096)
    from_flags = parse("--lease-ttl", "20", "--token", TOKEN, "--organization", "flag-org")
    assert (from_flags.lease_ttl, from_flags.token) == (20.0, TOKEN)
    assert from_flags.organization == "flag-org"
    assert from_flags.max_body_size == 4096


def test_listen_and_sync_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULUMID_LISTEN", "tcp:1:interface=127.0.0.1, unix:/tmp/s ")
    monkeypatch.setenv("PULUMID_SYNC_COMMITS", "yes")
    config = parse("--token", TOKEN)
    assert config.listen == ("tcp:1:interface=127.0.0.1", "unix:/tmp/s")
    assert config.sync_commits is True
    config = parse("--token", TOKEN, "--listen", "tcp:2", "--listen", "tcp:3", "--insecure-http")
    assert config.listen == ("tcp:2", "tcp:3")
    monkeypatch.setenv("PULUMID_SYNC_COMMITS", "0")
    assert parse("--token", TOKEN).sync_commits is False
    assert parse("--token", TOKEN, "--sync-commits").sync_commits is True
    monkeypatch.setenv("PULUMID_SYNC_COMMITS", "maybe")
    with pytest.raises(UsageError, match="PULUMID_SYNC_COMMITS"):
        Options()


def test_missing_token_says_how_to_set_it() -> None:
    with pytest.raises(UsageError) as raised:
        parse()
    assert "PULUMID_TOKEN" in str(raised.value)
    assert "--token" in str(raised.value)


def test_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text("file-token-789\n")
    assert parse("--token-file", str(path)).token == "file-token-789"
    with pytest.raises(UsageError):
        parse("--token", "short")
    monkeypatch.setenv("PULUMID_TOKEN_FILE", str(path))
    assert parse().token == "file-token-789"


def test_flag_beats_a_file_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-789\n")
    key_file = tmp_path / "key"
    key_file.write_text(KEY_A + "\n")
    monkeypatch.setenv("PULUMID_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("PULUMID_MASTER_KEY_FILE", str(key_file))
    config = parse("--token", TOKEN, "--master-key", "b" * 64)
    assert (config.token, config.master_key) == (TOKEN, "b" * 64)


def test_master_key(tmp_path: Path) -> None:
    assert parse("--token", TOKEN, "--master-key", KEY_B).master_key == "b" * 64
    path = tmp_path / "key"
    path.write_text(KEY_A + "\n")
    assert parse("--token", TOKEN, "--master-key-file", str(path)).master_key == KEY_A
    for bad in ("abc", "g" * 64, "a" * 63, "a" * 65):
        with pytest.raises(UsageError, match="master key"):
            parse("--token", TOKEN, "--master-key", bad)


@pytest.mark.parametrize(
    ("args", "variable"),
    [
        (["--lease-ttl", "0"], None),
        (["--lease-ttl", "abc"], None),
        (["--page-size", "-1"], None),
        (["--organization", "a b"], None),
        (["--user", "x"], None),
        ([], ("PULUMID_STATE_VERSIONS", "-1")),
        ([], ("PULUMID_EVENT_RETENTION_DAYS", "soon")),
    ],
)
def test_invalid_values(
    monkeypatch: pytest.MonkeyPatch, args: list[str], variable: tuple[str, str] | None
) -> None:
    if variable:
        monkeypatch.setenv(*variable)
    with pytest.raises(UsageError):
        parse("--token", TOKEN, *args)


def test_make_service(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(
        [
            "--token",
            TOKEN,
            "--database",
            str(tmp_path / "db.sqlite"),
            "--master-key",
            KEY_A,
            "--listen",
            "tcp:0:interface=127.0.0.1",
        ]
    )
    top = makeService(options)
    assert isinstance(top, MultiService)
    try:
        names = {child.name for child in top}
        assert {"storage", "retention", "lease-expiry"} <= names
        assert "api:tcp:0:interface=127.0.0.1" in names
    finally:
        close(top)


def _config(tmp_path: Path, **overrides: Any) -> Config:
    return Config(token=TOKEN, database=str(tmp_path / "data" / "db.sqlite"), **overrides)


def test_wrong_master_key_on_an_existing_database(tmp_path: Path) -> None:
    from twisted.internet import reactor

    top, _backend = make_backend(_config(tmp_path, master_key=KEY_A), reactor)
    close(top)
    with pytest.raises(UsageError, match="master key"):
        make_backend(_config(tmp_path, master_key="c" * 64), reactor)
    # The right key still works, in either case.
    top, _backend = make_backend(_config(tmp_path, master_key=KEY_A.upper().lower()), reactor)
    close(top)


def test_absent_master_key_is_generated_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from twisted.internet import reactor

    config = _config(tmp_path)
    top, _backend = make_backend(config, reactor)
    close(top)
    key_file = config.sqlite_path.with_name("db.sqlite.master-key")
    assert key_file.exists()
    key = key_file.read_text().strip()
    assert re.fullmatch("[0-9a-f]{64}", key)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    told = capsys.readouterr().err
    assert str(key_file) in told
    assert key not in told  # the log says where the key is, never the key itself
    top, _backend = make_backend(config, reactor)
    close(top)
    assert key_file.read_text().strip() == key
    assert key not in capsys.readouterr().err
    # The generated key is the database's key: passing it explicitly works too.
    top, _backend = make_backend(_config(tmp_path, master_key=key), reactor)
    close(top)
    with pytest.raises(UsageError):
        make_backend(_config(tmp_path, master_key=KEY_A), reactor)


@pytest.mark.parametrize("flag", ["--token-file", "--master-key-file"])
def test_missing_secret_file_is_a_usage_error(tmp_path: Path, flag: str) -> None:
    with pytest.raises(UsageError):
        parse("--token", TOKEN, flag, str(tmp_path / "absent"))


def test_storage_options() -> None:
    url = "postgresql://pulumid:pw@127.0.0.1:5432/pulumid"
    config = parse("--token", TOKEN, "--database", url, "--master-key", "a" * 64)
    assert config.postgres and config.database == url
    assert config.blob_store == "inline" and config.db_pool_size == 4
    assert parse(
        "--token", TOKEN, "--database", "host=db dbname=p", "--master-key", "a" * 64
    ).postgres
    s3 = "s3://pulumid-state/prod?endpoint=http://127.0.0.1:9000&path_style=true"
    assert parse("--token", TOKEN, "--blob-store", s3, "--db-pool-size", "8").blob_store == s3
    # Nodes on one database must share the master key: a generated one would differ.
    with pytest.raises(UsageError, match="same secrets master key"):
        parse("--token", TOKEN, "--database", url)
    for bad, message in (
        ("s3://x", "not a valid S3 bucket name"),
        ("s3://bucket/../up", "bad prefix"),
        ("s3://user:pw@bucket", "takes no user"),
        ("gs://bucket", "must start with s3://"),
        ("s3://bucket?colour=red", "unknown option"),
    ):
        with pytest.raises(UsageError, match=f"--blob-store: .*{message}"):
            parse("--token", TOKEN, "--blob-store", bad)
    for size in ("0", "-1", "many"):
        with pytest.raises(UsageError):
            parse("--token", TOKEN, "--db-pool-size", size)
    with pytest.raises(UsageError, match="--database"):
        parse("--token", TOKEN, "--database", "  ")


# -- who may sign in ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_the_example_rbac_file_is_valid() -> None:
    from pulumid.auth.rbac import load_policy

    policy = load_policy(REPO / "conf" / "rbac.yaml")
    assert set(policy.organizations) == {"acme", "research"}
    assert policy.issuers[0].issuer == "https://token.actions.githubusercontent.com"


def test_multi_user_modes_fail_closed(tmp_path: Path) -> None:
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text("organizations: {acme: {default_role: read}}\n")
    with pytest.raises(UsageError, match="needs --rbac-config"):
        parse("--auth-mode", "jwt", "--jwt-jwks-url", "http://127.0.0.1:1/jwks")
    with pytest.raises(UsageError, match="has no shared token"):
        parse(
            "--auth-mode",
            "jwt",
            "--rbac-config",
            str(rbac),
            "--jwt-jwks-url",
            "http://x",
            "--token",
            TOKEN,
        )
    with pytest.raises(UsageError, match="exactly one of"):
        parse("--auth-mode", "jwt", "--rbac-config", str(rbac))
    with pytest.raises(UsageError, match="at least 32"):
        parse("--auth-mode", "jwt", "--rbac-config", str(rbac), "--jwt-secret", "short")
    with pytest.raises(UsageError, match="--oidc-issuer, --oidc-client-id"):
        parse("--auth-mode", "oidc", "--rbac-config", str(rbac), "--public-url", "https://x")
    with pytest.raises(UsageError, match="--google-hosted-domains"):
        parse(
            "--auth-mode",
            "google",
            "--rbac-config",
            str(rbac),
            "--oidc-client-id",
            "c",
            "--oidc-client-secret",
            "s",
            "--public-url",
            "https://pulumi.example.com",
        )
    with pytest.raises(UsageError, match="must be one of"):
        parse("--auth-mode", "ldap", "--token", TOKEN)
    rbac.write_text("organizations: {acme: {default_role: root}}\n")
    with pytest.raises(UsageError, match=r"organizations\.acme\.default_role"):
        parse("--auth-mode", "jwt", "--rbac-config", str(rbac), "--jwt-jwks-url", "http://x")
    with pytest.raises(UsageError, match="trusted-proxies"):
        parse("--token", TOKEN, "--trusted-proxies", "10.0.0.0/8,nonsense")


def test_jwt_mode_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text("organizations: {acme: {default_role: read}}\n")
    monkeypatch.setenv("PULUMID_AUTH_MODE", "jwt")
    monkeypatch.setenv("PULUMID_RBAC_CONFIG", str(rbac))
    monkeypatch.setenv("PULUMID_JWT_SECRET", "s" * 32)
    monkeypatch.setenv("PULUMID_TRUSTED_PROXIES", "10.0.0.0/8")
    config = parse()
    assert config.token == ""
    assert config.auth.mode == "jwt" and config.auth.multi_user
    assert config.auth.jwt_secret == "s" * 32
    assert config.auth.trusted_proxies == "10.0.0.0/8"


def test_the_environment_file_lists_every_variable_and_parses_back() -> None:
    from pulumid.config import _BOOLEANS, _PARAMETERS, env_file, env_name

    text = env_file({"PULUMID_DATABASE": "/var/lib/pulumid/pulumid.db"})
    names = [name for name, *_ in _PARAMETERS] + [name for name, *_ in _BOOLEANS] + ["listen"]
    for name in names:
        var = env_name(name)
        assert f"\n#{var}=" in text or f"\n{var}=" in text, var
    assert "\nPULUMID_DATABASE=/var/lib/pulumid/pulumid.db\n" in text
    set_lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert set_lines == ["PULUMID_DATABASE=/var/lib/pulumid/pulumid.db"]
    with pytest.raises(ValueError, match="PULUMID_NOPE"):
        env_file({"PULUMID_NOPE": "1"})
