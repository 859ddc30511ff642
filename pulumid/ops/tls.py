"""TLS for the API listeners from certificate and key files, reloaded when they change.

The files are read at start (a bad pair stops the start with a clear message) and checked
on a timer: when either changes, the new pair is loaded and new connections get it; open
connections keep theirs. A pair that does not load leaves the old one in service (logged).
TLS 1.2 is the oldest version offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

log = Logger()


class TLSFilesError(ValueError):
    """The certificate or key file cannot be used; the message says which and why."""


@dataclass(frozen=True)
class _Stamp:
    cert: tuple[float, int]
    key: tuple[float, int]


def _stamp(path: Path) -> tuple[float, int]:
    info = path.stat()
    return info.st_mtime, info.st_size


def load_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """CertificateOptions for the PEM files (the certificate file may hold the chain)."""
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except OSError as e:
        raise TLSFilesError(f"cannot read {e.filename}: {e.strerror}") from None
    return options_of(cert_pem, key_pem, str(cert_path), str(key_path))


def options_of(
    cert_pem: bytes, key_pem: bytes, cert_path: str = "the certificate", key_path: str = "key"
) -> ssl.CertificateOptions:
    try:
        chain = ssl.Certificate.loadPEM(cert_pem)  # the first certificate
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
        extra = _chain(cert_pem)[1:]
    except Exception as e:
        raise TLSFilesError(f"{cert_path} / {key_path} do not hold a PEM pair: {e}") from None
    options = ssl.CertificateOptions(
        privateKey=key.original,
        certificate=chain.original,
        extraCertChain=[c.original for c in extra],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    try:
        options.getContext().check_privatekey()
    except SSL.Error:
        raise TLSFilesError(f"the key in {key_path} does not match {cert_path}") from None
    return options


def _not_after(cert_path: Path) -> float:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc.timestamp()


def _chain(pem: bytes) -> list[ssl.Certificate]:
    marker = b"-----END CERTIFICATE-----"
    parts = [p + marker for p in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in p]
    return [ssl.Certificate.loadPEM(p.strip()) for p in parts]


@implementer(IOpenSSLContextFactory)
class SwappableTLS:
    """A context factory whose certificate can be replaced while it serves (new connections
    get the new one). Until the first pair, a throwaway self-signed one stands in."""

    def __init__(self) -> None:
        cert_pem, key_pem = _placeholder()
        self._options = options_of(cert_pem, key_pem)
        self.not_after = 0.0  # epoch seconds of the served certificate: the expiry metric

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def use(self, cert_pem: bytes, key_pem: bytes) -> None:
        from cryptography import x509

        self._options = options_of(cert_pem, key_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.not_after = cert.not_valid_after_utc.timestamp()

    def wrap(self, factory: Any) -> TLSMemoryBIOFactory:
        return TLSMemoryBIOFactory(self, False, factory)


class ReloadingTLS(SwappableTLS):
    """A context factory whose context follows the files."""

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._options = load_options(cert_path, key_path)
        self._stamp = _Stamp(_stamp(cert_path), _stamp(key_path))
        self.not_after = _not_after(cert_path)
        self.loaded = 1

    async def check(self) -> bool:
        """Load the files again if they changed; True when a new pair is in service."""
        try:
            stamp = _Stamp(_stamp(self.cert_path), _stamp(self.key_path))
        except OSError as e:
            log.warn("TLS files not readable, the current pair stays: {error}", error=e)
            return False
        if stamp == self._stamp:
            return False
        try:
            options = load_options(self.cert_path, self.key_path)
        except TLSFilesError as e:
            log.error("new TLS files not used, the current pair stays: {error}", error=e)
            return False
        self._options, self._stamp = options, stamp
        self.not_after = _not_after(self.cert_path)
        self.loaded += 1
        log.info("TLS certificate reloaded from {path}", path=self.cert_path)
        return True


def _placeholder() -> tuple[bytes, bytes]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pulumid (no certificate yet)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
