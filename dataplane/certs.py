"""Certificates for a fleet: one CA, the controllers, the agents, the admins.

mTLS is on by default between agents and controllers. The role of a
certificate is its organizational unit (OU): `controller`, `agent` or
`admin`; an agent's common name (CN) is its host name and must match the
host it claims. An agent certificate can therefore never call the admin
API, whatever it asks.

    dataplane certs init --dir DIR --controller localhost,127.0.0.1 --agent h1,h2 --admin ops
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loader.errors import DataplaneError

ROLES = ("controller", "agent", "admin")


def _name(cn: str, role: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zt-dataplane"),
             x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if role:
        attrs.insert(1, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    return x509.Name(attrs)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Authority:
    def __init__(self, key, cert):
        self.key, self.cert = key, cert

    @classmethod
    def create(cls, days: int = 3650) -> "Authority":
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        name = _name("zt-dataplane fleet CA", None)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> "Authority":
        d = Path(directory)
        try:
            key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        except FileNotFoundError as e:
            raise DataplaneError(f"{e.filename}: no CA here (run `dataplane certs init`)") from None
        return cls(key, cert)

    def save(self, directory: Path) -> None:
        d = Path(directory)
        _write(d / "ca.key", _key_pem(self.key), private=True)
        _write(d / "ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, role: str, sans: list[str] = (), days: int = 825,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for cn in role."""
        if role not in ROLES:
            raise DataplaneError(f"role must be one of {', '.join(ROLES)}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        alt = []
        for s in sans or [cn]:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if role != "admin" else [])
        cert = (x509.CertificateBuilder().subject_name(_name(cn, role)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before or now - dt.timedelta(minutes=5))
                .not_valid_after(not_after or now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def issue_to(self, directory: Path, stem: str, cn: str, role: str, sans: list[str] = (), **kw) -> None:
        cert, key = self.issue(cn, role, sans, **kw)
        _write(Path(directory) / f"{stem}.pem", cert)
        _write(Path(directory) / f"{stem}.key", key, private=True)


def init(directory: str | Path, controllers: list[str], agents: list[str], admins: list[str]) -> list[str]:
    """A CA (created if absent) and certificates; returns the files written."""
    d = Path(directory)
    if (d / "ca.key").exists():
        ca = Authority.load(d)
    else:
        ca = Authority.create()
        ca.save(d)
    written = ["ca.pem", "ca.key"]
    ca.issue_to(d, "controller", controllers[0] if controllers else "localhost", "controller",
                controllers or ["localhost", "127.0.0.1", "::1"])
    written += ["controller.pem", "controller.key"]
    for host in agents:
        ca.issue_to(d, f"agent-{host}", host, "agent", [host])
        written += [f"agent-{host}.pem", f"agent-{host}.key"]
    for name in admins:
        ca.issue_to(d, f"admin-{name}", name, "admin", [name])
        written += [f"admin-{name}.pem", f"admin-{name}.key"]
    return written


def peer_identity(pem: bytes) -> tuple[str, str]:
    """(role, common name) of a client certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (ou[0].value if ou else ""), (cn[0].value if cn else "")


class Credentials:
    """The files one party needs: the CA, and its own certificate and key."""

    def __init__(self, directory: str | Path, stem: str):
        d = Path(directory)
        try:
            self.ca = (d / "ca.pem").read_bytes()
            self.cert = (d / f"{stem}.pem").read_bytes()
            self.key = (d / f"{stem}.key").read_bytes()
        except FileNotFoundError as e:
            raise DataplaneError(f"{e.filename}: missing (run `dataplane certs init --dir {d}`)") from None
        except PermissionError as e:
            raise DataplaneError(f"{e.filename}: not readable") from None
