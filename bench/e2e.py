"""Delivery with encryption to the user's key against plain delivery, in the same run.

One server, users whose incoming mail is stored as it came (the reference) and users whose
mail is encrypted to their key (OpenPGP Curve25519, OpenPGP RSA-3072, S/MIME RSA-2048). The
same load generator (bench/common.py) sends the same 10 KB messages through the MX to each
kind in turn, rounds interleaved so drift hits both alike; the figure is messages per second
and its ratio to plain delivery (issue #17's goal: ≥ 0.5× for 10 KB). A second table times
the encryption step alone, in-process, per message.

    .venv/bin/python bench/e2e.py [--messages 300] [--size 10240] [--connections 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import pysequoia

from common import Job, Target, send_all, text_message
from dnsserver import DNSTestServer
from e2e_kit import smime_identity
from harness import ServerProcess, make_data_dir, set_config
from postvern.e2e import openpgp, smime
from postvern.e2e.keys import Format, KeyStore
from postvern.e2e.protect import SubjectPolicy

DOMAIN = "example.test"
KINDS = ("plain", "openpgp-cv25519", "openpgp-rsa3072", "smime-rsa2048", "smime-p256")
# Rounds the messages are split into, each kind taking its turn per round.
ROUNDS = 4
# Passes of the in-process timing; the best is reported (bench/timing.py's practice).
PASSES = 3


def _address(kind: str) -> str:
    return f"{kind.replace('-', '.')}@{DOMAIN}"


def _keys(tmp: Path) -> dict[str, tuple[Format, bytes]]:
    """Public keys as the users' clients would hand them over (secrets stay here)."""

    def pgp(kind: str, suite: pysequoia.CipherSuite) -> bytes:
        tsk = pysequoia.Tsk.generate(_address(kind), cipher_suite=suite)
        return bytes(tsk.extract_certificate())

    cert, _ = smime_identity(tmp, _address("smime-rsa2048"))
    ec_cert, _ = smime_identity(tmp, _address("smime-p256"), kind="ec", key_usage="keyAgreement")
    return {
        "openpgp-cv25519": (Format.OPENPGP, pgp("openpgp-cv25519", pysequoia.CipherSuite.Cv25519)),
        "openpgp-rsa3072": (Format.OPENPGP, pgp("openpgp-rsa3072", pysequoia.CipherSuite.RSA3k)),
        "smime-rsa2048": (Format.SMIME, cert.read_bytes()),
        "smime-p256": (Format.SMIME, ec_cert.read_bytes()),
    }


def encryption_step(size: int, keys: dict[str, tuple[Format, bytes]]) -> None:
    rng = random.Random(7)
    raw = text_message(rng, "step", "sender@far.test", _address("plain"), size)
    print(f"\nencryption step alone, {len(raw)} bytes, best of {PASSES} passes of 200:")
    for kind, (fmt, data) in keys.items():
        if fmt is Format.OPENPGP:
            stored = openpgp.check_key(data).data
            best = min(_time(lambda s=stored: openpgp.encrypt_message(raw, s, SubjectPolicy.KEPT)))
        else:
            der = smime.check_certificate(data).data
            best = min(_time(lambda d=der: smime.encrypt_message(raw, d, SubjectPolicy.KEPT)))
        print(f"  {kind:18} {best * 1e6:8.0f} µs/message")


def _time(fn: object) -> list[float]:
    out = []
    for _ in range(PASSES):
        start = time.perf_counter()
        for _ in range(200):
            fn()  # type: ignore[operator]
        out.append((time.perf_counter() - start) / 200)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300, help="per kind (default 300)")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes")
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as t, DNSTestServer() as dns:
        tmp = Path(t)
        passwords = {_address(k): f"{k}-password-1" for k in KINDS}
        data = make_data_dir(tmp / "data", passwords=passwords, listeners=("smtp",))
        set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
        set_config(data.path, "limits", {"default_quota": 0})
        keys = _keys(tmp)
        app = data.app()
        try:
            store = KeyStore(app.directory)
            for kind, (fmt, key) in keys.items():
                user = app.directory.user(_address(kind))
                assert user is not None
                if fmt is Format.OPENPGP:
                    store.import_openpgp(user, key)
                else:
                    store.import_smime(user, key)
                store.set_encrypt(user, fmt)
        finally:
            app.close()
        rng = random.Random(1)
        per_round = args.messages // ROUNDS
        seconds = dict.fromkeys(KINDS, 0.0)
        sent = dict.fromkeys(KINDS, 0)
        refused = dict.fromkeys(KINDS, 0)
        host, port = data.addr("smtp")
        with ServerProcess(data):
            # One unmeasured message per kind first: connections, caches and the filter warm.
            for kind in KINDS:
                to = _address(kind)
                warm = [Job("sender@far.test", [to], text_message(rng, "w", "s@far.test", to, 99))]
                asyncio.run(send_all(Target(host, port), warm, 1))
            for r in range(ROUNDS):
                # Each round starts with another kind, so no kind always goes first.
                for kind in KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]:
                    to = _address(kind)
                    jobs = [
                        Job("sender@far.test", [to], text_message(rng, f"{kind}{r}{i}",
                            "sender@far.test", to, args.size))
                        for i in range(per_round)
                    ]  # fmt: skip
                    result = asyncio.run(send_all(Target(host, port), jobs, args.connections))
                    seconds[kind] += result.seconds
                    sent[kind] += result.accepted
                    refused[kind] += sum(result.refused.values())
        print(
            f"delivery through the MX, {args.size} B messages, {args.connections} connections,"
            f" {ROUNDS} interleaved rounds:"
        )
        base = sent["plain"] / seconds["plain"]
        for kind in KINDS:
            rate = sent[kind] / seconds[kind]
            print(
                f"  {kind:18} {rate:7.1f} msg/s  {rate / base:5.2f}× plain"
                f"  ({sent[kind]} delivered, {refused[kind]} refused)"
            )
        encryption_step(args.size, keys)


if __name__ == "__main__":
    main()
