"""Keys that cannot serve are refused at upload, each with its reason (issue #17).

Keys and certificates are made the way users make them (gpg; X.509 with ``cryptography``),
uploaded with ``postvern user key import`` as an administrator would, and the refusal is the
one line the command prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_kit import Gpg, postvern, smime_identity
from harness import DataDir, make_data_dir

ALICE = "alice@example.test"
# gpg's --faked-system-time: a key made "in 2020" with a one-day life is long expired.
LONG_AGO = "20200101T000000"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DataDir, Gpg, Path]]:
    tmp = tmp_path_factory.mktemp("keys")
    gpg = Gpg(tmp / "gnupg")
    data = make_data_dir(tmp / "data", listeners=())
    try:
        yield data, gpg, tmp
    finally:
        gpg.stop()


def _import(data: DataDir, path: Path, *extra: str) -> tuple[int, str]:
    result = postvern(data.path, "user", "key", "import", ALICE, str(path), *extra)
    return result.returncode, result.stdout + result.stderr


def _key_file(gpg: Gpg, tmp: Path, uid: str, name: str) -> Path:
    path = tmp / f"{name}.pgp"
    path.write_bytes(gpg.export(uid))
    return path


def test_expired_openpgp_key(setup: tuple[DataDir, Gpg, Path]) -> None:
    data, gpg, tmp = setup
    gpg.run("--faked-system-time", LONG_AGO, "--quick-gen-key", "Old <old@example.test>",
            "ed25519", "sign,cert", "1d")  # fmt: skip
    fpr = gpg.fingerprint("old@example.test")
    gpg.run("--faked-system-time", LONG_AGO, "--quick-add-key", fpr, "cv25519", "encr", "1d")
    code, out = _import(data, _key_file(gpg, tmp, "old@example.test", "old"))
    assert code == 1 and "key refused: the key expired on 2020-01-02" in out


def test_revoked_openpgp_key(setup: tuple[DataDir, Gpg, Path]) -> None:
    data, gpg, tmp = setup
    fpr = gpg.new_key("Gone <gone@example.test>", "ed25519", "cv25519")
    revocation = gpg.home / "openpgp-revocs.d" / f"{fpr}.rev"
    # gpg stores the certificate with its armor line defused by a leading colon.
    text = revocation.read_text().replace(":-----BEGIN", "-----BEGIN")
    gpg.run("--import", input=text.encode())
    code, out = _import(data, _key_file(gpg, tmp, fpr, "gone"))
    assert code == 1 and "key refused: the key is revoked" in out


def test_openpgp_key_without_encryption_subkey(setup: tuple[DataDir, Gpg, Path]) -> None:
    data, gpg, tmp = setup
    gpg.new_key("Signer <signer@example.test>", "ed25519", None)
    code, out = _import(data, _key_file(gpg, tmp, "signer@example.test", "signer"))
    assert code == 1 and "key refused: the key has no valid encryption subkey" in out


def test_small_rsa_openpgp_key(setup: tuple[DataDir, Gpg, Path]) -> None:
    data, gpg, tmp = setup
    gpg.new_key("Small <small@example.test>", "rsa1024", "rsa1024")
    code, out = _import(data, _key_file(gpg, tmp, "small@example.test", "small"))
    assert code == 1 and "key refused: RSA key of 1024 bits: at least 2048 are needed" in out


def test_private_key_is_never_taken(setup: tuple[DataDir, Gpg, Path]) -> None:
    data, gpg, tmp = setup
    gpg.new_key(f"Alice <{ALICE}>", "ed25519", "cv25519")
    secret = tmp / "alice.sec"
    secret.write_bytes(gpg.run("--export-secret-keys", ALICE))
    code, out = _import(data, secret)
    assert code == 1 and "this is a private key: upload only the public key" in out


def test_publishing_needs_the_users_address_on_the_key(setup: tuple[DataDir, Gpg, Path]) -> None:
    data, gpg, tmp = setup
    gpg.new_key("Other <other@example.test>", "ed25519", "cv25519")
    code, out = _import(data, _key_file(gpg, tmp, "other@example.test", "other"), "--publish")
    assert code == 1 and f"the key has no user ID for {ALICE}" in out


@pytest.mark.parametrize(
    ("kind", "usage", "reason"),
    [
        ("rsa", "digitalSignature", "does not allow keyEncipherment"),
        ("rsa1024", "keyEncipherment", "RSA key of 1024 bits"),
        ("ec", "digitalSignature", "does not allow keyAgreement"),
        ("ec-k256", "keyAgreement", "elliptic curve secp256k1: S/MIME encryption needs P-256"),
    ],
)
def test_smime_certificate_refusals(
    setup: tuple[DataDir, Gpg, Path], kind: str, usage: str, reason: str
) -> None:
    data, _, tmp = setup
    cert, key = smime_identity(tmp, ALICE, kind=kind, key_usage=usage)
    code, out = _import(data, cert)
    assert code == 1 and f"key refused: {reason}" in out.replace("the certificate ", "")
    code, out = _import(data, key)
    assert code == 1 and "holds a private key" in out


def test_good_keys_are_taken_and_shown(setup: tuple[DataDir, Gpg, Path]) -> None:
    data, gpg, tmp = setup
    if not gpg.run("--list-keys", ALICE, check=False):
        gpg.new_key(f"Alice <{ALICE}>", "ed25519", "cv25519")
    code, out = _import(data, _key_file(gpg, tmp, ALICE, "alice"), "--publish")
    assert code == 0, out
    cert, _ = smime_identity(tmp, ALICE)
    assert _import(data, cert)[0] == 0
    # encryption can only be turned on to a key that is there
    assert postvern(data.path, "user", "key", "remove", ALICE, "smime").returncode == 0
    refused = postvern(data.path, "user", "key", "encrypt", "on", ALICE, "--format", "smime")
    assert refused.returncode == 1 and "has no S/MIME certificate" in refused.stderr
    shown = postvern(data.path, "user", "key", "show", ALICE).stdout
    assert gpg.fingerprint(ALICE) in shown and "published (WKD, Autocrypt): yes" in shown
    assert "encrypt incoming mail: off" in shown
