"""Microsoft Autodiscover in its "plain old XML" form, as Outlook and many mobile clients ask.

The client POSTs a small XML document naming the user's address to
``/autodiscover/autodiscover.xml`` on ``autodiscover.<domain>``, ``<domain>``, or the host an
``_autodiscover._tcp`` SRV record names, and reads back one ``Protocol`` element per server:
type, host, port, how TLS starts, the login name. Microsoft's [MS-OXDSCLI] specifies both
documents; its sections are cited below by element name, the one stable handle it offers.

The request is untrusted XML, so it is read with expat directly and refused outright if it
carries a document type declaration: no DTD means no entity can be declared, so there is
nothing to expand (the "billion laughs") and nothing external to fetch (XXE). The body is
bounded by the listener before it is parsed at all.

We answer for any address in a domain we host, whether or not the user exists, so the
document reveals nothing a DNS lookup would not; a domain we do not host gets error 500.
"""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from xml.parsers import expat

from postvern.directory.addresses import AddressError, normalise_address
from postvern.web.clientservers import ClientServer, Protocol, Security

PATHS = ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml")
REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_RESPONSE_NS = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
)
CONTENT_TYPE = "application/xml"

# Outlook's request is about 350 bytes; 4 KiB leaves room for any client's whitespace and
# comments while keeping what we parse small.
MAX_REQUEST_BYTES = 4096
# The request is three elements deep; anything much deeper is not a request.
MAX_DEPTH = 8

_NS_SEP = " "
_ROOT = (f"{REQUEST_NS}{_NS_SEP}Autodiscover",)
_REQUEST = (*_ROOT, f"{REQUEST_NS}{_NS_SEP}Request")
_EMAIL = (*_REQUEST, f"{REQUEST_NS}{_NS_SEP}EMailAddress")
_SCHEMA = (*_REQUEST, f"{REQUEST_NS}{_NS_SEP}AcceptableResponseSchema")

_TYPES = {Protocol.IMAP: "IMAP", Protocol.POP3: "POP3", Protocol.SMTP: "SMTP"}
# [MS-OXDSCLI], Encryption element: it overrides SSL when present; "SSL" is TLS from the
# first byte, "TLS" is STARTTLS. SSL stays "on" for both, since clients that know only that
# element (Thunderbird's reader among them) should still insist on TLS; implicit-TLS servers
# come first, so such a client takes the one where "on" means what it thinks.
_ENCRYPTION = {Security.IMPLICIT_TLS: "SSL", Security.STARTTLS: "TLS"}


class ErrorCode(enum.IntEnum):
    """The POX error codes we use ([MS-OXDSCLI], ErrorCode element)."""

    ADDRESS_NOT_FOUND = 500  # we cannot configure this address (not a domain we host)
    INVALID_REQUEST = 600  # the request XML is malformed
    SCHEMA_NOT_OFFERED = 601  # the client wants a response schema we do not serve


ERROR_MESSAGES = {
    ErrorCode.ADDRESS_NOT_FOUND: "The email address cannot be found.",
    ErrorCode.INVALID_REQUEST: "Invalid Request",
    ErrorCode.SCHEMA_NOT_OFFERED: "The requested response schema is not available.",
}


class RequestError(Exception):
    def __init__(self, code: ErrorCode) -> None:
        super().__init__(ERROR_MESSAGES[code])
        self.code = code


class _Refused(Exception):
    """Raised inside an expat handler to stop the parse."""


def parse_request(body: bytes) -> str:
    """The normalised EMailAddress of a POX request, or RequestError.

    [MS-OXDSCLI], Request element: ``<Autodiscover><Request><EMailAddress>`` in the outlook
    requestschema/2006 namespace, with an optional ``AcceptableResponseSchema``.
    """
    stack: list[str] = []
    found: dict[tuple[str, ...], list[str]] = {}

    def refuse(*_: object) -> None:
        raise _Refused

    def refuse_external(*_: object) -> int:
        raise _Refused

    def start(name: str, _attrs: dict[str, str]) -> None:
        stack.append(name)
        path = tuple(stack)
        if len(stack) > MAX_DEPTH or (len(stack) == 1 and path != _ROOT):
            raise _Refused
        if path in (_EMAIL, _SCHEMA):
            if path in found:  # two addresses: which one would the client mean?
                raise _Refused
            found[path] = []

    def end(_name: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        path = tuple(stack)
        if path in found:
            found[path].append(data)

    parser = expat.ParserCreate(namespace_separator=_NS_SEP)
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse_external
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(body, True)
    except (expat.ExpatError, _Refused, RecursionError):
        raise RequestError(ErrorCode.INVALID_REQUEST) from None

    schema = "".join(found.get(_SCHEMA, [])).strip()
    if schema and schema != OUTLOOK_RESPONSE_NS:  # e.g. ActiveSync's mobilesync schema
        raise RequestError(ErrorCode.SCHEMA_NOT_OFFERED)
    if _EMAIL not in found:
        raise RequestError(ErrorCode.INVALID_REQUEST)
    try:
        return normalise_address("".join(found[_EMAIL]))
    except AddressError:
        raise RequestError(ErrorCode.INVALID_REQUEST) from None


def _add(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = text


def settings_xml(servers: list[ClientServer], address: str) -> bytes:
    """The Outlook response ([MS-OXDSCLI], Account element): one Protocol per server, best
    first."""
    root = ET.Element("Autodiscover", xmlns=RESPONSE_NS)
    response = ET.SubElement(root, "Response", xmlns=OUTLOOK_RESPONSE_NS)
    account = ET.SubElement(response, "Account")
    _add(account, "AccountType", "email")
    _add(account, "Action", "settings")
    for server in servers:
        protocol = ET.SubElement(account, "Protocol")
        _add(protocol, "Type", _TYPES[server.protocol])
        _add(protocol, "Server", server.host)
        _add(protocol, "Port", str(server.port))
        _add(protocol, "LoginName", address)
        _add(protocol, "DomainRequired", "off")
        # SPA is Microsoft's NTLM login, on by default: we take a password over TLS.
        _add(protocol, "SPA", "off")
        _add(protocol, "SSL", "on")
        _add(protocol, "Encryption", _ENCRYPTION[server.security])
        _add(protocol, "AuthRequired", "on")
        if server.protocol is Protocol.SMTP:
            _add(protocol, "UsePOPAuth", "off")  # submission has its own AUTH
            _add(protocol, "SMTPLast", "off")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def error_xml(code: ErrorCode) -> bytes:
    """An Error response ([MS-OXDSCLI], Error element): ErrorCode, Message, DebugData."""
    root = ET.Element("Autodiscover", xmlns=RESPONSE_NS)
    error = ET.SubElement(ET.SubElement(root, "Response"), "Error")
    _add(error, "ErrorCode", str(int(code)))
    _add(error, "Message", ERROR_MESSAGES[code])
    ET.SubElement(error, "DebugData")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
