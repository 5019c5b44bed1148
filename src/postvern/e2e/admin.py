"""``postvern user key import|show|remove|encrypt|publish``: a user's public keys from the CLI.

Until the account portal exists, the administrator uploads the key a user hands over (a
public key or certificate only: the private key stays in the user's mail client) and turns
encryption of their incoming mail on or off. Refusals are one line with the reason, and a
non-zero exit, as every other command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from postvern.app import App
from postvern.directory.db import DirectoryError, User
from postvern.e2e import openpgp, smime
from postvern.e2e.keys import Format, KeyStore
from postvern.e2e.protect import SubjectPolicy

SEARCH_NOTE = (
    "note: IMAP SEARCH on encrypted messages sees only their outer header fields"
    " (From, To, Cc, Date, Message-ID and the Subject when kept), not their text"
)


def _user(app: App, address: str) -> User:
    user = app.directory.user(address)
    if user is None:
        raise DirectoryError(f"no user {address}")
    return user


def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _detect(data: bytes) -> Format:
    """X.509 (PEM, or DER's SEQUENCE tag) is S/MIME, and so is a PEM private key (to be
    refused as such); anything else is taken for OpenPGP."""
    pem = b"-----BEGIN CERTIFICATE-----" in data or b"PRIVATE KEY-----" in data
    if pem or data[:1] == b"\x30":
        return Format.SMIME
    return Format.OPENPGP


def _run(args: argparse.Namespace) -> int:
    app = App.open(args.data)
    try:
        return int(args.key_action(app, KeyStore(app.directory), args))
    except (openpgp.KeyRefused, smime.CertificateRefused) as e:
        raise DirectoryError(f"key refused: {e}") from None
    finally:
        app.close()


def cmd_import(app: App, store: KeyStore, args: argparse.Namespace) -> int:
    user = _user(app, args.address)
    data = _read(args.file)
    fmt = Format(args.format) if args.format else _detect(data)
    if fmt is Format.OPENPGP:
        pgp = store.import_openpgp(user, data, publish=args.publish)
        print(f"OpenPGP key {pgp.fingerprint} stored for {user.address}")
        if args.publish:
            print("published: WKD serves it, and outgoing mail carries it (Autocrypt)")
    else:
        if args.publish:
            raise DirectoryError("--publish is for OpenPGP keys (WKD, Autocrypt)")
        cert = store.import_smime(user, data)
        print(f"S/MIME certificate {cert.fingerprint} ({cert.subject}) stored for {user.address}")
    print(f"to encrypt incoming mail to it: postvern user key encrypt on {user.address}")
    return 0


def cmd_show(app: App, store: KeyStore, args: argparse.Namespace) -> int:
    user = _user(app, args.address)
    keys = store.get(user.id)
    if keys is None or (keys.openpgp is None and keys.smime is None):
        print(f"{user.address}: no keys", file=sys.stderr)
        return 0
    if keys.openpgp is not None:
        if args.export:
            print(openpgp.armored(keys.openpgp), end="")
            return 0
        try:
            info = openpgp.check_key(keys.openpgp)
            state = f"expires {info.expires:%Y-%m-%d}" if info.expires else "does not expire"
            print(f"openpgp {info.fingerprint} {state} {'; '.join(info.user_ids)}")
        except openpgp.KeyRefused as e:
            print(f"openpgp UNUSABLE: {e}")
    if keys.smime is not None:
        try:
            cert = smime.check_certificate(keys.smime)
            print(f"smime {cert.fingerprint} expires {cert.expires:%Y-%m-%d} {cert.subject}")
        except smime.CertificateRefused as e:
            print(f"smime UNUSABLE: {e}")
    encrypt = keys.encrypt.value if keys.encrypt else "off"
    print(f"encrypt incoming mail: {encrypt}; subject outside: {keys.subject.value}")
    print(f"published (WKD, Autocrypt): {'yes' if keys.publish else 'no'}")
    if keys.encrypt:
        print(SEARCH_NOTE)
    return 0


def cmd_remove(app: App, store: KeyStore, args: argparse.Namespace) -> int:
    user = _user(app, args.address)
    if not store.remove(user, Format(args.format)):
        raise DirectoryError(f"{user.address} has no {args.format} key")
    print(f"removed the {args.format} key of {user.address}")
    return 0


def cmd_encrypt(app: App, store: KeyStore, args: argparse.Namespace) -> int:
    user = _user(app, args.address)
    if args.state == "off":
        store.set_encrypt(user, None)
        print(f"incoming mail of {user.address} is stored as it arrives")
        return 0
    keys = store.get(user.id)
    fmt = Format(args.format) if args.format else None
    if fmt is None:
        fmt = Format.SMIME if keys is not None and keys.openpgp is None else Format.OPENPGP
    subject = SubjectPolicy(args.subject) if args.subject else None
    store.set_encrypt(user, fmt, subject)
    print(f"incoming mail of {user.address} is encrypted to their {fmt.value} key from now on")
    print(SEARCH_NOTE)
    return 0


def cmd_publish(app: App, store: KeyStore, args: argparse.Namespace) -> int:
    user = _user(app, args.address)
    store.set_publish(user, args.state == "on")
    print(f"OpenPGP key of {user.address}: {'published' if args.state == 'on' else 'unpublished'}")
    return 0


def add_key_commands(user_group: argparse._SubParsersAction) -> None:
    """``user key …`` under the CLI's ``user`` group."""
    p = user_group.add_parser("key", help="the user's OpenPGP key / S/MIME certificate (e2e)")
    g = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    formats = [f.value for f in Format]

    p = g.add_parser("import", help="store a public key or certificate (refused if unusable)")
    p.add_argument("address")
    p.add_argument("file", help="the key file (armored or binary OpenPGP, PEM or DER X.509); -")
    p.add_argument("--format", choices=formats, help="default: recognised from the file")
    p.add_argument("--publish", action="store_true", help="serve it by WKD and Autocrypt")
    p.set_defaults(func=_run, key_action=cmd_import)

    p = g.add_parser("show", help="the stored keys and settings")
    p.add_argument("address")
    p.add_argument("--export", action="store_true", help="print the armored OpenPGP key")
    p.set_defaults(func=_run, key_action=cmd_show)

    p = g.add_parser("remove", help="forget a key (encryption to it stops)")
    p.add_argument("address")
    p.add_argument("format", choices=formats)
    p.set_defaults(func=_run, key_action=cmd_remove)

    p = g.add_parser("encrypt", help="turn encryption of incoming mail on or off")
    p.add_argument("state", choices=("on", "off"))
    p.add_argument("address")
    p.add_argument("--format", choices=formats, help="which key (default: OpenPGP if stored)")
    p.add_argument(
        "--subject",
        choices=[s.value for s in SubjectPolicy],
        help='the Subject outside: kept readable, or hidden as "[...]" (RFC 9788)',
    )
    p.set_defaults(func=_run, key_action=cmd_encrypt)

    p = g.add_parser("publish", help="publish the OpenPGP key (WKD, Autocrypt) or stop")
    p.add_argument("state", choices=("on", "off"))
    p.add_argument("address")
    p.set_defaults(func=_run, key_action=cmd_publish)
