"""When ACME renews: 30 days before expiry, or two-thirds into a short lifetime."""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pulumid.ops.acme import DAY, Issued

START = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def issued(lifetime: datetime.timedelta, names: list[str]) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternatives: list[x509.GeneralName] = []
    for n in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alternatives.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(START)
        .not_valid_after(START + lifetime)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def test_long_lifetimes_renew_thirty_days_before_expiry() -> None:
    cert = issued(datetime.timedelta(days=90), ["pulumi.example.com"])
    start = START.timestamp()
    assert not cert.due(start + 59 * DAY, renew_days=30)
    assert cert.due(start + 60 * DAY, renew_days=30)


def test_short_lifetimes_renew_two_thirds_in() -> None:
    cert = issued(datetime.timedelta(hours=6), ["127.0.0.1"])
    start = START.timestamp()
    assert not cert.due(start + 3.9 * 3600, renew_days=0)
    assert cert.due(start + 4 * 3600, renew_days=0)  # two-thirds of six hours
    assert cert.due(start, renew_days=30)  # also: already within 30 days of its end


def test_a_certificate_for_other_names_is_not_used() -> None:
    cert = issued(datetime.timedelta(days=90), ["127.0.0.1", "pulumi.example.com"])
    assert cert.covers(["127.0.0.1"])
    assert cert.covers(["pulumi.example.com", "127.0.0.1"])
    assert not cert.covers(["other.example.com"])
    again = Issued.load(cert.dump())
    assert again == cert
