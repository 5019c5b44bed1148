"""Apple configuration profiles (``.mobileconfig``) that set up Mail on iOS, iPadOS and macOS.

Apple's Mail reads neither autoconfig nor Autodiscover; it installs a profile the user opens
from Safari. The profile is a property list: a ``Configuration`` payload holding one
``com.apple.mail.managed`` payload (Apple's Device Management reference, "Mail") with one
incoming and one outgoing server, taken from the same table as the other client documents.
It holds no password: Mail asks for it once, when the profile is installed.

When the server's certificate comes from a CA the profile is signed with it (CMS SignedData,
RFC 5652, with the plist inside), so the device shows it as verified for our host name.
"""

from __future__ import annotations

import plistlib
import uuid

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from postvern.web.clientservers import ClientServer, Protocol, preferred

PATH = "/apple/mail.mobileconfig"
QUERY_PARAMETER = "email"
CONTENT_TYPE = "application/x-apple-aspen-config"

PROFILE_TYPE = "Configuration"
MAIL_PAYLOAD_TYPE = "com.apple.mail.managed"
PAYLOAD_VERSION = 1
ACCOUNT_TYPES = {Protocol.IMAP: "EmailTypeIMAP", Protocol.POP3: "EmailTypePOP"}
# A password over TLS, as every listener takes it (the name of a method, not a secret).
AUTH_METHOD = "EmailAuthPassword"

# PayloadUUIDs are name-based (RFC 9562 §5.5) under this namespace of ours, so the same
# address always gets the same profile: installing it again replaces the old one instead of
# adding a second account. Changing it would orphan every installed profile.
UUID_NAMESPACE = uuid.UUID("60c95fa0-7677-4e59-ae65-6c6fc3a643e7")


def _uuid(kind: str, address: str) -> str:
    return str(uuid.uuid5(UUID_NAMESPACE, f"{kind}\n{address}")).upper()


def _identifier(kind: str, address: str) -> str:
    """A reverse-DNS PayloadIdentifier under the address's domain, unique per address."""
    domain = address.rpartition("@")[2]
    reverse = ".".join(reversed(domain.split(".")))
    return f"{reverse}.mail.{kind}.{_uuid(kind, address).lower()}"


def profile_plist(servers: list[ClientServer], address: str, hostname: str) -> bytes | None:
    """The unsigned profile for ``address``, or None without an incoming and an outgoing server.

    Apple's payload has one flag per server, UseSSL, and no way to say STARTTLS. We set it
    for every server, as each of ours requires TLS, and take implicit-TLS listeners first
    (``preferred`` follows the table's order), where the flag's meaning is not in doubt.
    """
    incoming = preferred(servers, Protocol.IMAP, Protocol.POP3)
    outgoing = preferred(servers, Protocol.SMTP)
    if incoming is None or outgoing is None:
        return None
    account = {
        "PayloadType": MAIL_PAYLOAD_TYPE,
        "PayloadVersion": PAYLOAD_VERSION,
        "PayloadIdentifier": _identifier("account", address),
        "PayloadUUID": _uuid("account", address),
        "PayloadDisplayName": f"Mail ({address})",
        "EmailAccountType": ACCOUNT_TYPES[incoming.protocol],
        "EmailAccountDescription": address,
        "EmailAddress": address,
        "IncomingMailServerHostName": incoming.host,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": address,
        "IncomingMailServerAuthentication": AUTH_METHOD,
        "OutgoingMailServerHostName": outgoing.host,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": address,
        "OutgoingMailServerAuthentication": AUTH_METHOD,
        # One password for both servers, asked for once: the profile carries none.
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadType": PROFILE_TYPE,
        "PayloadVersion": PAYLOAD_VERSION,
        "PayloadIdentifier": _identifier("profile", address),
        "PayloadUUID": _uuid("profile", address),
        "PayloadDisplayName": f"Mail for {address}",
        "PayloadDescription": f"Sets up {address} on {hostname}. You will be asked for the"
        " password; this profile does not contain it.",
        "PayloadOrganization": address.rpartition("@")[2],
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)


def is_self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def sign(profile: bytes, chain_pem: bytes, key_pem: bytes) -> bytes:
    """The profile as DER CMS SignedData with the plist inside, or unchanged when it cannot
    usefully be signed.

    A self-signed certificate is not used: the device can tie its signature to no one and
    shows the profile as "Not Verified", exactly as it shows an unsigned one, so signing
    would add bytes and no assurance. Nor is a key that CMS signing here does not handle
    (``cryptography`` signs PKCS#7 with RSA and ECDSA keys only).
    """
    certs = x509.load_pem_x509_certificates(chain_pem)
    leaf, intermediates = certs[0], certs[1:]
    if is_self_signed(leaf):
        return profile
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return profile
    builder = pkcs7.PKCS7SignatureBuilder().set_data(profile).add_signer(leaf, key, hashes.SHA256())
    # The chain up to (not including) the root, so the device can build the path to a CA it
    # trusts, as a TLS client would from the same file.
    for cert in intermediates:
        builder = builder.add_certificate(cert)
    # Binary: sign the plist's bytes as they are, not a MIME-canonicalised copy.
    return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
