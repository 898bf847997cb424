"""A local certificate authority and a server certificate for NGINX's HTTPS port.

For a machine without a real certificate: the bring-up makes a CA (`ca.pem`, which clients
trust: `curl --cacert .cluster/tls/ca.pem`) and a server certificate it signs for localhost,
127.0.0.1 and this host's name. Real certificates are settings (INFER_TLS_CERT_FILE and
INFER_TLS_KEY_FILE); then nothing is made here.
"""

from __future__ import annotations

import ipaddress
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster.secrets import write_private
from cluster.settings import ClusterSettings

VALID_DAYS = 365
RENEW_BEFORE = timedelta(days=30)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _still_good(path: Path, names: set[str]) -> bool:
    if not path.exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    if cert.not_valid_after_utc - RENEW_BEFORE < datetime.now(UTC):
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    have |= {str(n) for n in san.get_values_for_type(x509.IPAddress)}
    return names <= have


def ensure_local_certificate(settings: ClusterSettings) -> bool:
    """Make the local CA and server certificate if missing, expiring or lacking a name; True if made."""
    if settings.nginx_tls_port is None or settings.tls_cert_file or settings.tls_key_file:
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise ValueError("set both INFER_TLS_CERT_FILE and INFER_TLS_KEY_FILE, or neither")
        return False  # the operator's certificate: never made or overwritten here
    names = {"localhost", "127.0.0.1", socket.gethostname()}
    if settings.nginx_host not in ("0.0.0.0", "::"):
        names.add(settings.nginx_host)
    if _still_good(settings.tls_certificate, names) and settings.tls_ca_file.exists():
        return False
    settings.tls_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC) - timedelta(minutes=5)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inference-cluster local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for name in sorted(names):
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    write_private(settings.tls_private_key, _key_pem(server_key))
    settings.tls_certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    settings.tls_ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    # The CA's key is not kept: nothing else is ever signed with it.
    return True
