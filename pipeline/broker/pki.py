"""The fleet's PKI: a certificate authority that issues the broker's server certificate and one client certificate
per identity (the host, every device); the certificate's common name becomes the MQTT username.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.storage import atomic_write_bytes



@dataclass(frozen=True)
class Identity:
    name: str
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    atomic_write_bytes(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write_bytes(path, cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)  # certificates are public; keys stay 0600


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


class CertificateAuthority:
    def __init__(self, directory: Path, days: int = 3650) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert_path, key_path = directory / "ca.crt", directory / "ca.key"
        if self.cert_path.exists() and key_path.exists():  # idempotent: keep the CA devices already trust
            self.key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        self.key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet fleet CA")])
        self.cert = (_builder("edgefleet fleet CA", name, self.key.public_key(), days)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        _write_key(key_path, self.key)
        _write_cert(self.cert_path, self.cert)

    def issue(self, name: str, server_hosts: list[str] | None = None, days: int = 825) -> Identity:
        key = _key()
        b = _builder(name, self.cert.subject, key.public_key(), days)
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if server_hosts:
            sans: list[x509.GeneralName] = []
            for h in server_hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        folder = self.dir / name
        folder.mkdir(exist_ok=True)
        ident = Identity(name, folder / f"{name}.crt", folder / f"{name}.key")
        _write_key(ident.key, key)
        _write_cert(ident.cert, cert)
        return ident
