"""The cluster's internal CA, node certificates, and the mutual-TLS contexts built on them.

Nothing internal crosses a network in the clear: every front ↔ mailbox connection is TLS 1.3
with a certificate on both sides, verified against this CA only. A node certificate names the
node (CN and a DNS subjectAltName) and its role (OU), so a server can tell a front from a
mailbox node, and a client pins the name of the node it meant to reach.
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postvern.cluster.nodes import ClusterError, check_name

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
NODES_SUBDIR = "nodes"
NODE_KEY = "node.key"
NODE_CERT = "node.crt"
# The internal CA outlives its node certificates; renewing it means re-issuing every node.
CA_DAYS = 3650
# A node certificate is re-issued by running add-node again; a year bounds what a stolen
# node key is worth without making renewal a monthly chore.
CERT_DAYS = 365
CLOCK_SKEW = datetime.timedelta(minutes=5)  # backdated, for a node whose clock runs slow


def _write_private(path: Path, data: bytes) -> None:
    """A key file: created 0600, never readable by anyone else even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(cluster_dir: Path, name: str = "Postvern internal CA") -> Path:
    """Create the CA (ECDSA P-256) in ``cluster_dir``; refuses to replace one."""
    cluster_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (cluster_dir / CA_KEY).exists() or (cluster_dir / CA_CERT).exists():
        raise ClusterError(f"{cluster_dir} already holds a CA; nodes trust it, so it stays")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime.now(datetime.UTC) - CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=CA_DAYS))
        # It signs node certificates and nothing else: no intermediate CAs below it.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(cluster_dir / CA_KEY, _pem_key(key))
    (cluster_dir / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cluster_dir / CA_CERT


def _load_ca(cluster_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((cluster_dir / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((cluster_dir / CA_CERT).read_bytes())
    except FileNotFoundError:
        raise ClusterError(f"no CA in {cluster_dir}: run `postvern cluster init` first") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ClusterError("the CA key is not an ECDSA key")
    return key, cert


def issue_node(cluster_dir: Path, name: str, role: str) -> Path:
    """A key and certificate for node ``name`` in ``cluster_dir/nodes/NAME/``; returns it."""
    check_name(name)
    ca_key, ca_cert = _load_ca(cluster_dir)
    folder = cluster_dir / NODES_SUBDIR / name
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in (NODE_KEY, NODE_CERT):
        (folder / old).unlink(missing_ok=True)  # re-issuing replaces the pair
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.UTC) - CLOCK_SKEW
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        # Both ends of mutual TLS: a node serves and connects with the same certificate.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(folder / NODE_KEY, _pem_key(key))
    (folder / NODE_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What a node presents: the CA it trusts, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, cluster_dir: Path) -> NodeIdentity:
        """A node's own ``cluster/``: ca.crt, node.crt, node.key side by side."""
        return cls(cluster_dir / CA_CERT, cluster_dir / NODE_CERT, cluster_dir / NODE_KEY)

    def _context(self, purpose: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # only our own nodes: no older peers
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
            ctx.load_verify_locations(cafile=str(self.ca))  # this CA only, never the system's
        except (OSError, ssl.SSLError) as e:
            raise ClusterError(f"cannot load the node certificate: {type(e).__name__}") from None
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        return ctx

    def server_context(self, alpn: list[str]) -> ssl.SSLContext:
        """Requires a client certificate from the CA; offers the internal services by ALPN."""
        ctx = self._context(ssl.PROTOCOL_TLS_SERVER)
        ctx.set_alpn_protocols(alpn)
        return ctx

    def client_context(self, alpn: str) -> ssl.SSLContext:
        """Checks the server's certificate against the CA and the name given at connect."""
        ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = True  # the node name is pinned: server_hostname=NAME
        ctx.set_alpn_protocols([alpn])
        return ctx


def peer_node(ssl_object: Any) -> tuple[str, str] | None:
    """(name, role) of the verified peer certificate of a TLS connection; None without one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    subject = x509.load_der_x509_certificate(der).subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    roles = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(names) != 1 or len(roles) != 1:
        return None
    return str(names[0].value), str(roles[0].value)
