"""TLS from certificate files: the real CLI over https (trusting a test CA), HSTS, TLS 1.2 as
the floor, and a new certificate served after the files change, without a restart."""

from __future__ import annotations

import datetime
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.helpers import Daemon, PulumiCLI, wait_until
from tests.ops.test_management import sample

pytestmark = [pytest.mark.e2e, pytest.mark.storages("sqlite")]


class LoopbackCA:
    """A CA that issues loopback certificates."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pulumid test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.name = name
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cert_path: Path, key_path: Path) -> int:
        """A server certificate for 127.0.0.1 into the two files; returns its serial."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return serial


def served_serial(port: int, ca_file: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_cli_over_tls_and_a_reloaded_certificate(
    make_cli: Callable[[str, Daemon], PulumiCLI],
    cli_versions: list[str],
    make_project: Callable[..., Path],
    tmp_path: Path,
) -> None:
    ca = LoopbackCA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.pem())
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    first = ca.issue(cert, key)
    daemon = Daemon(
        workdir=tmp_path / "daemon",
        flags={"tls_cert": cert, "tls_key": key, "tls_reload_interval": 0.5},
        ca_file=ca_file,
    )
    daemon.start()
    try:
        assert daemon.url.startswith("https://")
        cli = make_cli(cli_versions[0], daemon)
        cli.env["SSL_CERT_FILE"] = str(ca_file)
        work = make_project(cli, daemon, "tls", items=3)
        cli.run("stack", "init", "acme/dev", cwd=work)
        cli.run("up", "--yes", "--skip-preview", cwd=work)

        response = daemon.api("GET", "/api/user")
        assert response.status == 200
        hsts = {k.lower(): v for k, v in response.headers.items()}["strict-transport-security"]
        assert hsts.startswith("max-age=")

        # TLS 1.1 is not offered.
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cafile=str(ca_file))
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError):
                old.wrap_socket(raw, server_hostname="127.0.0.1")

        with urllib.request.urlopen(daemon.management_url + "/metrics", timeout=10) as page:
            metrics = page.read().decode()
        expiry = sample(metrics, "pulumid_tls_certificate_expiry_timestamp_seconds")
        assert 3600 < expiry - time.time() < 3 * 3600  # issued for two hours

        # New files: served to new connections within the reload interval, no restart.
        assert served_serial(daemon.port, ca_file) == first
        second = ca.issue(cert, key)
        wait_until(lambda: served_serial(daemon.port, ca_file) == second, 15, "the new certificate")
        cli.run("up", "--yes", "--skip-preview", cwd=work)  # the CLI goes on, over the new one
    finally:
        daemon.stop()


def test_a_bad_pair_stops_the_start(tmp_path: Path) -> None:
    ca = LoopbackCA()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key)
    ca.issue(tmp_path / "other.pem", tmp_path / "other.key")
    daemon = Daemon(
        workdir=tmp_path / "daemon", flags={"tls_cert": cert, "tls_key": tmp_path / "other.key"}
    )
    with pytest.raises(pytest.fail.Exception) as failed:
        daemon.start(timeout=20)
    assert "does not match" in str(failed.value)
