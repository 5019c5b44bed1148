"""Client configuration over the HTTPS listener: Microsoft Autodiscover (POX) and Apple's
configuration profile, checked against the autoconfig document and `postvern dns`.

Every document is fetched from the running server; the signed profile is verified with
`openssl cms` against a CA made here, as a device would verify it against its trust store.
"""

from __future__ import annotations

import datetime
import http.client
import os
import plistlib
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness import DataDir, ServerProcess, client_tls_context, make_data_dir, set_config

REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_NS = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
OUTLOOK_NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
PROFILE_TYPE = "application/x-apple-aspen-config"
ADDRESS = "alice@example.test"
# Every listener a client can use except plain POP3, so one service is absent everywhere.
LISTENERS = ("https", "imaps", "imap", "pop3s", "submissions", "submission")

# What each SRV service name means (RFC 6186 §3, RFC 8314 §5.1), written out independently
# of the server's own table.
SRV_MEANING = {
    "_imaps": ("imap", "implicit"),
    "_imap": ("imap", "starttls"),
    "_pop3s": ("pop3", "implicit"),
    "_pop3": ("pop3", "starttls"),
    "_submissions": ("smtp", "implicit"),
    "_submission": ("smtp", "starttls"),
}
AUTOCONFIG_SECURITY = {"SSL": "implicit", "STARTTLS": "starttls"}
AUTODISCOVER_SECURITY = {"SSL": "implicit", "TLS": "starttls"}  # [MS-OXDSCLI] Encryption


@dataclass(frozen=True)
class Server:
    protocol: str
    security: str
    host: str
    port: int


def postvern_dns(data: DataDir) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
    r = subprocess.run(
        [sys.executable, "-m", "postvern.cli", "--data", str(data.path), "dns", data.domain],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@dataclass
class Running:
    data: DataDir
    dns: str


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data = make_data_dir(
        tmp_path_factory.mktemp("clientconfig") / "data", passwords={}, listeners=LISTENERS
    )
    dns = postvern_dns(data)
    with ServerProcess(data):
        yield Running(data, dns)


def request(
    data: DataDir,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPResponse, bytes]:
    h, port = data.addr("https")
    conn = http.client.HTTPSConnection(h, port, context=client_tls_context(), timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": "example.test", **(headers or {})})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def autodiscover_request(address: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<Autodiscover xmlns="{REQUEST_NS}">\n'
        "  <Request>\n"
        f"    <EMailAddress>{address}</EMailAddress>\n"
        "    <AcceptableResponseSchema>"
        "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
        "</AcceptableResponseSchema>\n"
        "  </Request>\n"
        "</Autodiscover>\n"
    ).encode()


def post_autodiscover(
    data: DataDir, body: bytes, path: str = "/autodiscover/autodiscover.xml"
) -> tuple[http.client.HTTPResponse, ET.Element]:
    response, raw = request(data, "POST", path, body, {"Content-Type": "text/xml"})
    return response, ET.fromstring(raw)


def error_code(root: ET.Element) -> str | None:
    assert root.tag == f"{RESPONSE_NS}Autodiscover"
    return root.findtext(f"{RESPONSE_NS}Response/{RESPONSE_NS}Error/{RESPONSE_NS}ErrorCode")


def autoconfig_servers(data: DataDir) -> list[Server]:
    response, raw = request(data, "GET", f"/mail/config-v1.1.xml?emailaddress={ADDRESS}")
    assert response.status == 200
    return [
        Server(
            e.get("type") or "",
            AUTOCONFIG_SECURITY[e.findtext("socketType") or ""],
            e.findtext("hostname") or "",
            int(e.findtext("port") or 0),
        )
        for e in ET.fromstring(raw).iter()
        if e.tag in ("incomingServer", "outgoingServer")
    ]


def dns_servers(dns: str) -> tuple[set[Server], set[str]]:
    """(the SRV records naming a server, the services published as not available)."""
    offered, absent = set(), set()
    for line in dns.splitlines():
        name, _, record = line.partition("\tIN SRV ")
        if not record:
            continue
        service = name.split(".")[0]
        _priority, _weight, port, target = record.split()
        if target == ".":
            absent.add(service)
        else:
            protocol, security = SRV_MEANING[service]
            offered.add(Server(protocol, security, target.rstrip("."), int(port)))
    return offered, absent


# -- the same servers in every document ----------------------------------------------------


def test_autodiscover_autoconfig_and_dns_agree(web: Running) -> None:
    response, root = post_autodiscover(web.data, autodiscover_request("Alice@Example.TEST"))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/xml")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert error_code(root) is None
    account = root.find(f"{OUTLOOK_NS}Response/{OUTLOOK_NS}Account")
    assert account is not None
    assert account.findtext(f"{OUTLOOK_NS}AccountType") == "email"
    assert account.findtext(f"{OUTLOOK_NS}Action") == "settings"
    discovered = []
    for p in account.iterfind(f"{OUTLOOK_NS}Protocol"):
        field = {child.tag.removeprefix(OUTLOOK_NS): child.text for child in p}
        assert field["LoginName"] == ADDRESS
        assert field["SPA"] == "off"
        assert field["SSL"] == "on"
        assert field["AuthRequired"] == "on"
        discovered.append(
            Server(
                (field["Type"] or "").lower(),
                AUTODISCOVER_SECURITY[field["Encryption"] or ""],
                field["Server"] or "",
                int(field["Port"] or 0),
            )
        )

    autoconfig = autoconfig_servers(web.data)
    assert discovered == autoconfig  # same servers, same order of preference
    offered, absent = dns_servers(web.dns)
    assert offered == set(autoconfig)
    assert absent == {"_pop3"}
    # And all of them are what the configuration says.
    expected = {
        Server(*SRV_MEANING[f"_{name}"], "mx.example.test", web.data.addr(name)[1])
        for name in LISTENERS
        if name != "https"
    }
    assert set(autoconfig) == expected


def test_capitalised_path_as_outlook_sends_it(web: Running) -> None:
    body = autodiscover_request(ADDRESS)
    lower = request(web.data, "POST", "/autodiscover/autodiscover.xml", body)[1]
    response, upper = request(web.data, "POST", "/Autodiscover/Autodiscover.xml", body)
    assert response.status == 200 and upper == lower


def test_apple_profile_unsigned_with_a_self_signed_certificate(web: Running) -> None:
    path = f"/apple/mail.mobileconfig?email={ADDRESS}"
    response, raw = request(web.data, "GET", path)
    assert response.status == 200
    assert response.headers["Content-Type"] == PROFILE_TYPE
    assert "attachment" in response.headers["Content-Disposition"]
    assert raw.startswith(b"<?xml")  # a plain plist: no CMS wrapper
    profile = plistlib.loads(raw)
    autoconfig = autoconfig_servers(web.data)
    check_profile(profile, autoconfig)
    # Where both are offered, the profile names the implicit-TLS ports (RFC 8314 §3).
    [mail] = profile["PayloadContent"]
    assert mail["IncomingMailServerPortNumber"] == web.data.addr("imaps")[1]
    assert mail["OutgoingMailServerPortNumber"] == web.data.addr("submissions")[1]
    # Stable: the same address gets the same identifiers, another address others.
    again = plistlib.loads(request(web.data, "GET", path.replace("alice", "ALICE"))[1])
    assert again == profile
    bob = plistlib.loads(request(web.data, "GET", path.replace("alice", "bob"))[1])
    assert bob["PayloadUUID"] != profile["PayloadUUID"]
    assert bob["PayloadIdentifier"] != profile["PayloadIdentifier"]
    assert bob["PayloadContent"][0]["PayloadUUID"] != profile["PayloadContent"][0]["PayloadUUID"]


def check_profile(profile: dict, autoconfig: list[Server]) -> None:
    assert profile["PayloadType"] == "Configuration"
    assert profile["PayloadVersion"] == 1
    [mail] = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert mail["EmailAccountType"] == "EmailTypeIMAP"
    assert mail["EmailAddress"] == ADDRESS
    first_imap = next(s for s in autoconfig if s.protocol == "imap")
    first_smtp = next(s for s in autoconfig if s.protocol == "smtp")
    for direction, server in (("Incoming", first_imap), ("Outgoing", first_smtp)):
        assert mail[f"{direction}MailServerHostName"] == server.host
        assert mail[f"{direction}MailServerPortNumber"] == server.port
        assert mail[f"{direction}MailServerUseSSL"] is True
        assert mail[f"{direction}MailServerUsername"] == ADDRESS
        assert mail[f"{direction}MailServerAuthentication"] == "EmailAuthPassword"
    # No password of any kind travels in the profile.
    keys = {k for k in mail if "Password" in k}
    assert keys == {"OutgoingPasswordSameAsIncomingPassword"}
    ids = {profile["PayloadUUID"], mail["PayloadUUID"]}
    assert len(ids) == 2
    assert profile["PayloadIdentifier"] != mail["PayloadIdentifier"]


# -- what is refused -----------------------------------------------------------------------


def test_unknown_domain(web: Running) -> None:
    response, root = post_autodiscover(web.data, autodiscover_request("alice@nowhere.test"))
    assert response.status == 200 and error_code(root) == "500"
    assert root.find(f".//{OUTLOOK_NS}Account") is None
    response, _ = request(web.data, "GET", "/apple/mail.mobileconfig?email=alice@nowhere.test")
    assert response.status == 404


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not xml at all",
        b"<Autodiscover><Request><EMailAddress>alice@example.test</EMailAddress>"
        b"</Request></Autodiscover>",  # no namespace
        f'<Autodiscover xmlns="{REQUEST_NS}"><Request></Request></Autodiscover>'.encode(),
        f'<Autodiscover xmlns="{REQUEST_NS}"><Request><EMailAddress>nobody'
        "</EMailAddress></Request></Autodiscover>".encode(),
        f'<Autodiscover xmlns="{REQUEST_NS}"><Request><EMailAddress>alice@example.test'
        "</EMailAddress><EMailAddress>bob@example.test</EMailAddress></Request>"
        "</Autodiscover>".encode(),
        autodiscover_request(ADDRESS)[:-20],  # cut short
    ],
    ids=["empty", "text", "no-namespace", "no-address", "bad-address", "two", "truncated"],
)
def test_malformed_autodiscover_requests(web: Running, body: bytes) -> None:
    response, root = post_autodiscover(web.data, body)
    assert response.status == 400 and error_code(root) == "600"


def test_a_schema_we_do_not_serve(web: Running) -> None:
    """ActiveSync clients ask for the mobilesync schema: error 601, not Outlook settings."""
    body = autodiscover_request(ADDRESS).replace(
        b"outlook/responseschema/2006a", b"mobilesync/responseschema/2006"
    )
    response, root = post_autodiscover(web.data, body)
    assert response.status == 200 and error_code(root) == "601"


BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE Autodiscover [\n <!ENTITY a "aaaaaaaaaa">\n'
    + "".join(f' <!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">\n' for i in range(8))
    + f']>\n<Autodiscover xmlns="{REQUEST_NS}"><Request>'
    "<EMailAddress>&i;@example.test</EMailAddress></Request></Autodiscover>"
).encode()
# Harmless if expanded, and then a valid request: refused all the same, for its DTD.
INTERNAL_ENTITY = (
    '<?xml version="1.0"?>\n<!DOCTYPE Autodiscover [<!ENTITY d "example.test">]>'
    f'<Autodiscover xmlns="{REQUEST_NS}"><Request>'
    "<EMailAddress>alice@&d;</EMailAddress></Request></Autodiscover>"
).encode()
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?>\n<!DOCTYPE Autodiscover [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
    f'<Autodiscover xmlns="{REQUEST_NS}"><Request>'
    "<EMailAddress>alice@example.test&x;</EMailAddress></Request></Autodiscover>"
).encode()


@pytest.mark.parametrize(
    "body",
    [BILLION_LAUGHS, INTERNAL_ENTITY, EXTERNAL_ENTITY],
    ids=["laughs", "internal", "external"],
)
def test_entities_are_refused(web: Running, body: bytes) -> None:
    assert len(body) < 4096  # refused for what it is, not for its size
    response, root = post_autodiscover(web.data, body)
    assert response.status == 400 and error_code(root) == "600"


def test_oversized_requests_are_refused_before_reading(web: Running) -> None:
    padding = b"<!--" + b"x" * 5000 + b"-->"
    response, _ = request(
        web.data, "POST", "/autodiscover/autodiscover.xml", padding + autodiscover_request(ADDRESS)
    )
    assert response.status == 413
    # A chunked body has no length to check first: refused once it passes the limit.
    chunks = iter([padding[:1000]] * 6)
    h, port = web.data.addr("https")
    conn = http.client.HTTPSConnection(h, port, context=client_tls_context(), timeout=10)
    conn.request("POST", "/autodiscover/autodiscover.xml", body=chunks, encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    # A declared length over the limit is answered at once: the server does not wait for a
    # body that never comes (the connection would time out if it did).
    conn = http.client.HTTPSConnection(h, port, context=client_tls_context(), timeout=10)
    conn.putrequest("POST", "/autodiscover/autodiscover.xml")
    conn.putheader("Content-Length", str(100 * 1024 * 1024))
    conn.endheaders(b"<Autodiscover")
    assert conn.getresponse().status == 413
    conn.close()


def test_wrong_method_and_bad_profile_queries(web: Running) -> None:
    assert request(web.data, "GET", "/autodiscover/autodiscover.xml")[0].status == 405
    assert request(web.data, "GET", "/apple/mail.mobileconfig")[0].status == 400
    assert request(web.data, "GET", "/apple/mail.mobileconfig?email=nobody")[0].status == 400


# -- a certificate from a CA: the profile is signed ----------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:  # a TLS server certificate, as a CA would issue it
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DataDir, Path]]:
    """A server whose certificate chains, through an intermediate, to a CA made here."""
    root = tmp_path_factory.mktemp("clientconfig-ca")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_cert = _issue("Test Root CA", root_key, "Test Root CA", root_key, ca=True)
    mid_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    mid_cert = _issue("Test Intermediate", mid_key, "Test Root CA", root_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = _issue("mx.example.test", leaf_key, "Test Intermediate", mid_key, ca=False)
    (root / "ca.pem").write_bytes(_pem(root_cert))
    (root / "chain.pem").write_bytes(_pem(leaf_cert) + _pem(mid_cert))
    (root / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    data = make_data_dir(
        root / "data", passwords={}, listeners=("https", "imaps", "submission", "pop3s")
    )
    set_config(data.path, "tls", {"cert": str(root / "chain.pem"), "key": str(root / "leaf.key")})
    with ServerProcess(data):
        yield data, root


def openssl_verify(der: Path, ca: Path, out: Path) -> subprocess.CompletedProcess[str]:
    # TLS server certificates carry serverAuth, not emailProtection: Apple's devices accept
    # them for profiles, and "-purpose any" makes OpenSSL check the chain the same way.
    command = ["openssl", "cms", "-verify", "-inform", "DER", "-in", str(der)]
    command += ["-CAfile", str(ca), "-purpose", "any", "-out", str(out)]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_apple_profile_signed_with_a_ca_certificate(
    signed: tuple[DataDir, Path], tmp_path: Path
) -> None:
    data, ca_dir = signed
    response, raw = request(data, "GET", f"/apple/mail.mobileconfig?email={ADDRESS}")
    assert response.status == 200
    assert response.headers["Content-Type"] == PROFILE_TYPE
    assert not raw.startswith(b"<?xml")  # DER CMS, the plist inside
    der, plist = tmp_path / "profile.der", tmp_path / "profile.plist"
    der.write_bytes(raw)
    r = openssl_verify(der, ca_dir / "ca.pem", plist)
    assert r.returncode == 0, r.stderr
    assert "Verification successful" in r.stderr
    profile = plistlib.loads(plist.read_bytes())
    check_profile(profile, autoconfig_servers(data))
    # This server has only STARTTLS submission: the profile names it, still requiring TLS.
    [mail] = profile["PayloadContent"]
    assert mail["OutgoingMailServerPortNumber"] == data.addr("submission")[1]
    assert mail["IncomingMailServerPortNumber"] == data.addr("imaps")[1]

    # The signature covers the plist: change one byte of it and verification fails.
    at = raw.index(b"<plist")
    tampered = tmp_path / "tampered.der"
    tampered.write_bytes(raw[:at] + b"<PLIST" + raw[at + 6 :])
    assert openssl_verify(tampered, ca_dir / "ca.pem", tmp_path / "t.plist").returncode != 0
    # And a device that does not trust our CA does not verify it either.
    other_ca = tmp_path / "other-ca.pem"
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca.write_bytes(_pem(_issue("Other CA", other_key, "Other CA", other_key, ca=True)))
    assert openssl_verify(der, other_ca, tmp_path / "o.plist").returncode != 0
