"""Dangerous attachments, recognised by what the bytes are rather than what the name says.

A file name is the sender's claim; the first bytes are the truth. This module sniffs
executables (PE, ELF, Mach-O including universal binaries, Java classes), Windows
shortcuts, scripts for shells and the Windows Script Host, and Office documents with
macros (olevba, in a resource-limited subprocess: see :mod:`postvern.filters.macros`). It
looks inside zip archives within fixed bounds, so a zip bomb is recognised, not expanded.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from postvern.filters.extract import Attachment
from postvern.filters.macros import MacroReport, check_macros

# Archives inside archives followed this deep; malware nests two levels at most, a zip
# quine nests forever.
MAX_ARCHIVE_DEPTH = 3
# Members examined across all archives of one message; the central directory is checked
# against this *before* zipfile reads it, so a directory of a million entries costs nothing.
MAX_ARCHIVE_MEMBERS = 1000
# Declared uncompressed bytes read across all archives of one message. zipfile stops every
# member at its declared size, so this bounds the work even when sizes lie.
MAX_TOTAL_UNCOMPRESSED = 100 * 1024 * 1024
# A member needed whole (a nested archive, an Office document) is read up to this size.
MAX_MEMBER_BYTES = 20 * 1024 * 1024
# Bytes read of any other member: enough for every magic number and script heuristic.
SNIFF_BYTES = 64 * 1024
# Deflate reaches about 1000:1 at best on real data; a higher declared ratio on a large
# member is a bomb (42.zip's members are ~ 1,000,000:1).
MAX_COMPRESSION_RATIO = 200
BOMB_MIN_BYTES = 1024 * 1024
# One central directory entry is at least 46 bytes plus its name (APPNOTE 4.3.12).
_MIN_CD_ENTRY = 46

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_LNK_HEADER = b"\x4c\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"
_MACHO_MAGICS = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")
_FAT_MAGICS = (b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf")
# A universal binary lists a handful of architectures; a Java class file has the same
# magic followed by its version (major >= 45), which reads as a large count.
_MAX_FAT_ARCHS = 20
# Extensions Windows executes (or hands to an interpreter) on a double click.
DANGEROUS_EXTENSIONS = frozenset(
    "exe scr com pif cpl msi msp mst dll sys drv ocx bat cmd ps1 psm1 psd1 vbs vbe js jse "
    "wsf wsh wsc hta lnk inf reg jar msc application gadget scf url iqy slk appx "
    "appxbundle msix msixbundle vhd vhdx".split()
)

_POWERSHELL = re.compile(
    r"(?i)\b(?:invoke-expression|iex\s*\(|invoke-webrequest|invoke-restmethod|downloadstring|"
    r"downloadfile|net\.webclient|start-process|-encodedcommand|frombase64string|"
    r"set-executionpolicy|-executionpolicy\s+bypass|add-type|\$env:\w+|-windowstyle\s+hidden)"
)
_VBSCRIPT = re.compile(
    r"(?i)(?:\bcreateobject\s*\(|\bwscript\.(?:shell|createobject|sleep|echo|quit)|"
    r"shell\.application|\bon\s+error\s+resume\s+next|\bexecute(?:global)?\s*\(|"
    r"\bgetobject\s*\(|\bend\s+(?:sub|function)\b|\bdim\s+\w+)"
)
_WSH_JSCRIPT = re.compile(r"(?i)(?:new\s+activexobject\s*\(|\bwscript\.\w+)")
_JSCRIPT = re.compile(
    r"(?i)(?:\beval\s*\(|string\.fromcharcode|\bfunction\s*\w*\s*\(|\bvar\s+\w+\s*=|"
    r"\.run\s*\(|unescape\s*\(|\bnew\s+\w+\s*\()"
)
_BATCH = re.compile(
    r"(?im)(?:^\s*@?echo\s+off\b|%~dp0|^\s*set\s+/?\w*\s*\w+=|\bcmd(?:\.exe)?\s+/[ck]\b|"
    r"^\s*goto\s+:?\w+|^\s*start\s+(?:/\w+\s+)*\S|\bbitsadmin\b|\bcertutil\s+-|"
    r"\breg\s+add\b|\bschtasks\b|^\s*:\w+\s*$)"
)
_HTA = re.compile(rb"(?i)<hta:application")
_WSF = re.compile(rb"(?is)<job\b.*<script\s+language\s*=")
# ISO 32000-1 §7.6.1: an encrypted PDF names its security handler in the trailer (or the
# cross-reference stream's dictionary) under /Encrypt, as a dictionary or a reference.
_PDF_ENCRYPT = re.compile(rb"/Encrypt\s*(?:<<|\d+\s+\d+\s+R)")
# MS-OFFCRYPTO §2.3.4.4: a password-protected OOXML document is an OLE file holding the
# encrypted package in a stream of that name (UTF-16 in the directory).
_OLE_ENCRYPTED_PACKAGE = "EncryptedPackage".encode("utf-16-le")
# A password handed over with the file: a word for "password" in the languages phishing
# is written in, up to 30 characters of the same line ("Senha do PDF", "password for the
# attachment"), a colon, and a value with a digit in it ("123", "2020", "Inv2024"). A hint
# ("password: your date of birth") gives no value and is not counted.
_PASSWORD_GIVEN = re.compile(
    r"(?i)\b(?:password|passwort|kennwort|passcode|pass|pwd|senha|contrase[ñn]a|clave|"
    r"mot de passe|wachtwoord|parola|has[łl]o|пароль)\b[^\n:：]{0,30}[:：][ \t]*"
    r"(?=\S{0,31}\d)\S{3,32}"
)


@dataclass(frozen=True, slots=True)
class Finding:
    """Something found in an attachment, and where (``"a.zip > b/c.exe"``)."""

    kind: str
    where: str
    dangerous: bool  # blocks delivery per the attachment policy; else only adds points
    detail: str = ""
    encrypted: bool = False  # no scanner can read it without the password

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.where}: {self.kind}{detail}"


MacroChecker = Callable[[bytes], MacroReport]


def inspect_attachments(
    attachments: list[Attachment], macro_checker: MacroChecker | None = check_macros
) -> list[Finding]:
    """Findings for every attachment of a message, nested archives included."""
    walk = _Walk(macro_checker)
    for index, att in enumerate(attachments):
        where = att.filename or f"part {index + 1} ({att.content_type})"
        walk.file(att.data, where, att.filename, depth=0)
    return walk.findings


class _Walk:
    """One message's inspection, carrying the shared budgets of the bounds above."""

    def __init__(self, macro_checker: MacroChecker | None) -> None:
        self.findings: list[Finding] = []
        self.members = 0
        self.uncompressed = 0
        self.macro_checker = macro_checker

    def add(
        self,
        kind: str,
        where: str,
        dangerous: bool = True,
        detail: str = "",
        *,
        encrypted: bool = False,
    ) -> None:
        self.findings.append(Finding(kind, where, dangerous, detail, encrypted))

    def file(self, data: bytes, where: str, name: str, depth: int) -> None:
        extension = name.rpartition(".")[2].lower() if "." in name else ""
        kind = sniff_executable(data)
        if kind:
            self.add(kind, where)
        elif extension in DANGEROUS_EXTENSIONS:
            self.add(f"dangerous file type .{extension}", where)
        if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            self.archive(data, where, depth)
        elif data.startswith(_OLE_MAGIC):
            if _OLE_ENCRYPTED_PACKAGE in data:
                self.add("encrypted Office document", where, dangerous=False, encrypted=True)
            self.office(data, where, ooxml_macros=False)
        elif data.startswith(b"%PDF-") and _PDF_ENCRYPT.search(data):
            self.add("encrypted PDF", where, dangerous=False, encrypted=True)
        elif data[0x8001:0x8006] == b"CD001":
            self.add("disk image (ISO 9660)", where, dangerous=False)

    def archive(self, data: bytes, where: str, depth: int) -> None:
        if depth >= MAX_ARCHIVE_DEPTH:
            self.add("archive nested too deep to inspect", where, dangerous=False)
            return
        entries = _central_directory_entries(data)
        if entries is None or self.members + entries > MAX_ARCHIVE_MEMBERS:
            self.add("archive too large to inspect", where, dangerous=False)
            return
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
            self.add("damaged archive", where, dangerous=False)
            return
        names = {info.filename.lower() for info in infos}
        if "[content_types].xml" in names:
            # Office Open XML: VBA lives in vbaProject.bin, Excel 4 macros in macrosheets,
            # and embedded OLE objects may carry either.
            has_macros = any(
                n.endswith("vbaproject.bin") or n.startswith("xl/macrosheets/") for n in names
            )
            if has_macros or any("oleobject" in n for n in names):
                self.office(data, where, ooxml_macros=has_macros)
            return
        for info in infos:
            self.member(archive, info, where, depth)

    def member(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, depth: int
    ) -> None:
        self.members += 1
        inner = f"{where} > {info.filename}"
        if info.is_dir():
            return
        if info.flag_bits & 0x1:
            extension = info.filename.rpartition(".")[2].lower()
            dangerous = extension in DANGEROUS_EXTENSIONS
            detail = f".{extension} inside" if dangerous else ""
            self.add("encrypted archive member", inner, dangerous, detail, encrypted=True)
            return
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > BOMB_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            self.add("zip bomb (compression ratio)", inner, dangerous=True,
                     detail=f"{int(ratio)}:1")  # fmt: skip
            return
        whole = info.file_size <= MAX_MEMBER_BYTES
        budget = MAX_TOTAL_UNCOMPRESSED - self.uncompressed
        size = min(info.file_size, budget) if whole else min(SNIFF_BYTES, budget)
        if size <= 0:
            self.add("archive too large to inspect", inner, dangerous=False)
            return
        try:
            with archive.open(info) as stream:
                data = stream.read(size)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
                RuntimeError, zlib.error):  # fmt: skip
            self.add("damaged archive member", inner, dangerous=False)
            return
        self.uncompressed += len(data)
        self.file(data, inner, info.filename, depth + 1)

    def office(self, data: bytes, where: str, *, ooxml_macros: bool) -> None:
        report = self.macro_checker(data) if self.macro_checker else None
        if report is not None and report.has_macros:
            detail = ", ".join([*report.autoexec[:3], *report.suspicious[:3]])
            self.add("Office document with macros", where, detail=detail)
        elif ooxml_macros:
            # The VBA project is there even if olevba could not read it.
            why = report.error if report and report.error else "vbaProject.bin"
            self.add("Office document with macros", where, detail=why)
        elif report is not None and report.error:
            self.add("Office document could not be analysed", where, dangerous=False,
                     detail=report.error)  # fmt: skip
        if report is not None and report.msi:
            self.add("Windows Installer package", where)


def gives_password(text: str) -> bool:
    """Whether *text* hands over a password (a value, not a hint about one)."""
    return _PASSWORD_GIVEN.search(text) is not None


def sniff_executable(data: bytes) -> str | None:
    """The kind of executable or script *data* is, or None."""
    head = data[:64]
    if head.startswith(b"MZ"):
        return _pe_kind(data)
    if head.startswith(b"\x7fELF"):
        return "ELF executable"
    if head[:4] in _MACHO_MAGICS:
        return "Mach-O executable"
    if head[:4] in _FAT_MAGICS and len(head) >= 8:
        count = struct.unpack(">I", head[4:8])[0]
        if 0 < count <= _MAX_FAT_ARCHS:
            return "Mach-O universal binary"
        return "Java class file"
    if head.startswith(_LNK_HEADER):
        return "Windows shortcut (.lnk)"
    return sniff_script(data[:SNIFF_BYTES])


def _pe_kind(data: bytes) -> str:
    # The DOS header's e_lfanew (offset 0x3C) points at the "PE\0\0" signature.
    if len(data) >= 0x40:
        offset = struct.unpack("<I", data[0x3C:0x40])[0]
        if data[offset : offset + 4] == b"PE\x00\x00":
            return "PE executable (Windows)"
    return "MZ executable (DOS/Windows)"


def sniff_script(data: bytes) -> str | None:
    """Heuristics for text that an interpreter runs (shell, PowerShell, WSH, batch)."""
    if b"\x00" in data[:4096]:
        return None
    if data.startswith(b"#!"):
        interpreter = data[2:80].split(b"\n", 1)[0].strip().decode("ascii", "replace")
        return f"script ({interpreter or 'shebang'})"
    if _HTA.search(data):
        return "HTML application (HTA)"
    if _WSF.search(data):
        return "Windows Script File"
    text = data.decode("utf-8", "replace")
    if _distinct(_POWERSHELL, text) >= 2:
        return "PowerShell script"
    if _looks_like_html(text):
        return None
    vbs = _distinct(_VBSCRIPT, text)
    if vbs >= 3 or (vbs >= 2 and re.search(r"(?i)createobject|wscript", text)):
        return "VBScript"
    if _WSH_JSCRIPT.search(text) and _distinct(_JSCRIPT, text) >= 1:
        return "JScript (Windows Script Host)"
    if _distinct(_BATCH, text) >= 3:
        return "batch script"
    return None


def _distinct(pattern: re.Pattern[str], text: str) -> int:
    return len({m.group(0).lower().split()[0] for m in pattern.finditer(text[:SNIFF_BYTES])})


def _looks_like_html(text: str) -> bool:
    head = text[:1024].lstrip().lower()
    return head.startswith(("<!doctype html", "<html", "<?xml")) or "<body" in head


def _central_directory_entries(data: bytes) -> int | None:
    """Entries the zip's end-of-central-directory record declares (APPNOTE 4.3.16), or
    None when the directory would not fit the member budget."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if end < 0 or end + 22 > len(data):
        return 0  # no directory: zipfile will call it damaged
    entries, cd_size = struct.unpack("<HI", data[end + 10 : end + 16])
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:
        return None  # ZIP64: more entries than any mail attachment needs
    if cd_size > MAX_ARCHIVE_MEMBERS * (_MIN_CD_ENTRY + 1024):
        return None
    return int(entries)
