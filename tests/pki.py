"""A private test PKI, as the seed's TLS chapter lays it out: a CA, server and client certificates.

Made with ``cryptography`` (a test dependency). Besides the good certificates it makes the
bad ones the security tests need: a server certificate from an unknown CA, one naming
another host, expired ones. Run as a script (``python tests/pki.py DIR``) it writes the set
into DIR for scripts/test, which gives RabbitMQ its TLS listener from it.

Files (PEM): ``ca.pem``; ``<name>.pem`` and ``<name>-key.pem`` for each of
server (localhost, 127.0.0.1), server-otherhost (broker.invalid only), server-expired,
server-unknown-ca (signed by another CA), broker (localhost only: reached as 127.0.0.1 its
name does not match), client-<cn> for the clients in CLIENTS, client-expired,
client-unknown-ca.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENTS = ("reader", "writer", "nobody")
ORG = "busagent test"
_NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - dt.timedelta(days=1)).not_valid_after(_NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, *, server: bool,
          names: tuple[str, ...] = (), expired: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    start, end = (_NOW - dt.timedelta(days=30), _NOW - dt.timedelta(days=1)) if expired else \
        (_NOW - dt.timedelta(days=1), _NOW + dt.timedelta(days=365))
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca[0].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if names:
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def _write(directory: Path, name: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = pair
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{name}-key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)


def make(directory: str | os.PathLike[str]) -> Path:
    """Write the whole test PKI into ``directory`` (made if missing); returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, other = _ca("busagent test CA"), _ca("unknown CA")
    (d / "ca.pem").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    (d / "unknown-ca.pem").write_bytes(other[0].public_bytes(serialization.Encoding.PEM))
    _write(d, "server", _leaf(ca, "localhost", server=True, names=("localhost", "127.0.0.1")))
    _write(d, "server-otherhost", _leaf(ca, "broker.invalid", server=True, names=("broker.invalid",)))
    _write(d, "server-expired", _leaf(ca, "localhost", server=True, names=("localhost", "127.0.0.1"), expired=True))
    _write(d, "server-unknown-ca", _leaf(other, "localhost", server=True, names=("localhost", "127.0.0.1")))
    _write(d, "broker", _leaf(ca, "localhost", server=True, names=("localhost",)))
    for cn in CLIENTS:
        _write(d, f"client-{cn}", _leaf(ca, cn, server=False))
    _write(d, "client-expired", _leaf(ca, "writer", server=False, expired=True))
    _write(d, "client-unknown-ca", _leaf(other, "writer", server=False))
    return d


if __name__ == "__main__":
    print(make(sys.argv[1]))
