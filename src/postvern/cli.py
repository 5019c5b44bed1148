"""``postvern …``: set up a data directory, run the server, administer domains and users.

Every command has ``--help`` and takes ``--data`` before or after its name. Errors print one
line on stderr and exit non-zero. Every list prints one line per item on stdout; an empty
list prints nothing there, says so in one line on stderr and exits 0, while a list of
something that does not exist (``dkim list unknown.example``) is an error. Secrets are read
from a terminal prompt or, with ``--password-stdin``, one per line from standard input; they
are never taken from the command line, where any local user could read them in the process
list. Everything a command writes is private to the server's user (umask 077).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import os
import shlex
import stat
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from postvern import config
from postvern.abuse import Abuse, BanError, parse_duration, utc_text
from postvern.abuse import admin as abuse_admin
from postvern.app import App, open_directory
from postvern.backup import commands as backup_commands
from postvern.cluster import commands as cluster_commands
from postvern.cluster import portal as cluster_portal
from postvern.crypto.keyslots import BadSlot
from postvern.crypto.serverkey import KEY_FILE, ServerKey, ServerKeyError
from postvern.crypto.tls import (
    EXPIRY_WARNING_DAYS,
    TLSConfigError,
    make_self_signed,
    read_certificate,
)
from postvern.directory import commands as directory_commands
from postvern.directory.accounts import AuthFailed
from postvern.directory.addresses import AddressError, normalise_address, normalise_domain
from postvern.directory.db import AliasChange, Directory, DirectoryError
from postvern.e2e import admin as e2e_admin
from postvern.emailauth import signing
from postvern.encdb import SchemaTooNew, WrongKey
from postvern.filters import FilterSettings, ScanContext, trial
from postvern.filters.clamd import ClamdClient, ClamdError
from postvern.hardening import no_core_dumps
from postvern.mta import QUEUE_FILE, EntryNotFound, QueueError, QueueStore
from postvern.mta import admin as mta_admin
from postvern.mta import wake as mta_wake
from postvern.ops import commands as ops_commands
from postvern.ops import dnsrecords
from postvern.web import clientservers, mtasts

DEFAULT_DATA = "postvern-data"
DEMO_DATA = "demo-data"
DEMO_DOMAIN = "postvern.test"
DEMO_USER = f"demo@{DEMO_DOMAIN}"
# Printed on every start and in the README: the demo is for trying clients, not for real mail.
DEMO_PASSWORD = "postvern-demo-password"  # noqa: S105
# Files 0600 and folders 0700 whatever the caller's umask: the data directory holds keys,
# sealed mail and databases that are nobody else's business, even inside a 0700 folder.
PRIVATE_UMASK = 0o077
# Where Debian's clamav-daemon listens; init and the demo look there (or at the path in
# CLAMD_SOCKET_ENV, for tests and other layouts) for a clamd to scan mail with.
CLAMD_SOCKET = "/run/clamav/clamd.ctl"
CLAMD_SOCKET_ENV = "POSTVERN_CLAMD_SOCKET"
# A clamd that is up answers PING in milliseconds.
CLAMD_PROBE_SECONDS = 2.0

STANDARD_PORTS = {
    "smtp": "0.0.0.0:25",
    "submission": "0.0.0.0:587",
    "submissions": "0.0.0.0:465",
    "imap": "0.0.0.0:143",
    "imaps": "0.0.0.0:993",
    "pop3": "0.0.0.0:110",
    "pop3s": "0.0.0.0:995",
    "https": "0.0.0.0:443",
}
HIGH_PORTS = {
    "smtp": "127.0.0.1:2525",
    "submission": "127.0.0.1:2587",
    "submissions": "127.0.0.1:2465",
    "imap": "127.0.0.1:2143",
    "imaps": "127.0.0.1:2993",
    "pop3": "127.0.0.1:2110",
    "pop3s": "127.0.0.1:2995",
    "https": "127.0.0.1:8443",
}

EXPECTED = (
    DirectoryError,
    AddressError,
    AuthFailed,
    config.ConfigError,
    ServerKeyError,
    TLSConfigError,
    WrongKey,
    SchemaTooNew,
    BadSlot,
    EntryNotFound,
    QueueError,
    BanError,
    trial.TrialError,
    ClamdError,
    FileNotFoundError,
    PermissionError,
)


class CLIError(Exception):
    """A command-line mistake or refusal, reported as one line."""


# -- reading secrets -----------------------------------------------------------------------


class Secrets:
    """Reads secrets from stdin lines (``--password-stdin``) or from the terminal."""

    def __init__(self, from_stdin: bool) -> None:
        self.from_stdin = from_stdin

    def read(self, prompt: str, *, confirm: bool = False) -> str:
        if self.from_stdin:
            line = sys.stdin.readline()
            if not line:
                raise CLIError(f"expected a line on standard input for: {prompt}")
            return line.rstrip("\r\n")
        value = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} (again): ") != value:
            raise CLIError("the two entries differ")
        return value


# -- commands ------------------------------------------------------------------------------


def _hint(args: argparse.Namespace, *words: str) -> str:
    """The whole command to type next, with ``--data`` when this one was given it."""
    data = ["--data", str(args.data)] if args.data_given else []
    return shlex.join(["postvern", *data, *words])


def cmd_init(args: argparse.Namespace) -> int:
    data: Path = args.data
    ports = HIGH_PORTS if args.ports == "high" else STANDARD_PORTS
    clamd = _init_clamd(args.clamd)
    postmaster = _postmaster(args.postmaster, args.domain)
    init_data_dir(
        data,
        args.hostname,
        args.domain,
        ports,
        clamd=clamd,
        postmaster=postmaster,
        directory=_init_directory(args),
    )
    print(f"Created {data} for {args.hostname}, domain {args.domain}.")
    if args.directory_url:
        print("Its directory is in PostgreSQL (TLS verify-full); directory.sqlite is not used.")
    if clamd is None:
        print(
            "Mail will NOT be scanned for viruses: no clamd found at"
            f" {_clamd_socket()}. Install clamav-daemon and set [filters] clamd."
        )
    else:
        problem = _clamd_problem(clamd)
        late = (
            f" It does not answer yet ({problem}): mail is deferred until it does."
            if problem
            else ""
        )
        print(f"Mail will be scanned for viruses by clamd at {clamd}.{late}")
    if postmaster:
        print(f"postmaster@ and abuse@ of every domain go to {postmaster}: create that user next.")
        user = _hint(args, "user", "add", postmaster)
    else:
        print("postmaster@ and abuse@ of every domain go to the first user you create.")
        user = _hint(args, "user", "add", f"USER@{args.domain}")
    dns, serve = _hint(args, "dns", args.domain), _hint(args, "serve")
    print(f"Next: `{user}`, then `{dns}` and `{serve}`.")
    return 0


def _init_directory(args: argparse.Namespace) -> dict[str, str] | None:
    """[directory] from init's --directory-* options (absolute paths: the data directory
    does not exist yet), or None for the SQLite file."""
    if not args.directory_url:
        return None
    found = {
        "url": args.directory_url,
        "ca": args.directory_ca,
        "password_file": args.directory_password_file,
        "client_cert": args.directory_client_cert,
        "client_key": args.directory_client_key,
    }
    return {
        k: v if k == "url" or v == "system" else str(Path(v).resolve())
        for k, v in found.items()
        if v is not None
    }


# -- the virus scanner ---------------------------------------------------------------------


def _clamd_socket() -> str:
    return os.environ.get(CLAMD_SOCKET_ENV) or CLAMD_SOCKET


def _clamd_problem(address: str) -> str | None:
    """None when clamd at *address* answers PING; otherwise why not."""
    client = ClamdClient(address, timeout=CLAMD_PROBE_SECONDS, connect_timeout=CLAMD_PROBE_SECONDS)
    try:
        asyncio.run(client.ping())
    except ClamdError as e:
        return str(e)
    return None


def local_clamd(*, answering: bool) -> str | None:
    """``unix:<socket>`` of the local clamd (CLAMD_SOCKET or $POSTVERN_CLAMD_SOCKET), if its
    socket exists and, with *answering*, it answers PING; None otherwise."""
    path = _clamd_socket()
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    address = f"unix:{path}"
    if answering and _clamd_problem(address) is not None:
        return None
    return address


def _init_clamd(option: str | None) -> str | None:
    """The [filters] clamd that init writes: the --clamd given, or the local one found.

    A socket that exists is taken even if clamd does not answer yet: it may still be
    loading its signatures, or wait to be started by its socket unit (Debian).
    """
    if option is None:
        return local_clamd(answering=False)
    if option.lower() == "none":
        return None
    address = f"unix:{option}" if option.startswith("/") else option
    ClamdClient(address)  # raises ClamdError when the address cannot be one
    return address


def _postmaster(address: str | None, domain: str) -> str:
    """The admin address given at init, normalised; it must be in a domain we host."""
    if not address:
        return ""
    try:
        address = normalise_address(address)
    except AddressError as e:
        raise CLIError(f"--postmaster: {e}") from None
    if address.rpartition("@")[2] != normalise_domain(domain):
        raise CLIError(f"--postmaster must be an address at {domain} (the only domain so far)")
    return address


def init_data_dir(
    data: Path,
    hostname: str,
    domain: str,
    ports: dict[str, str],
    *,
    clamd: str | None = None,
    postmaster: str = "",
    directory: dict[str, Any] | None = None,
) -> None:
    """A new data directory; ``directory`` ([directory] settings: url, ca, password_file,
    client_cert, client_key) puts its directory in that empty PostgreSQL database instead
    of directory.sqlite, reached and checked before any file is written."""
    if data.exists() and any(data.iterdir()):
        raise CLIError(f"{data} already exists and is not empty; refusing to overwrite it")
    settings = config.Settings(data_dir=data, hostname=hostname, primary_domain=domain)
    settings.listen = config.Listen(**ports)
    settings.filters.clamd = clamd
    settings.postmaster = postmaster
    settings.directory = config.DirectoryDB(**(directory or {}))
    key = ServerKey.generate()
    shared: Directory | None = None
    try:
        if settings.directory.url:
            shared = open_directory(settings, key, None)  # TLS verified, schema made
            if shared.domains() or shared.users():
                raise CLIError(
                    "the PostgreSQL directory already holds domains or users, sealed under"
                    " another server key: give init an empty database (a node joining a"
                    " cluster takes the cluster's data: docs/cluster.md)"
                )
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(data, 0o700)
        (data / config.CONFIG_NAME).write_text(config.render(settings))
        key.write(data / KEY_FILE)
        (data / "tls").mkdir(mode=0o700)
        cert, tls_key = settings.path(settings.tls.cert), settings.path(settings.tls.key)
        make_self_signed(hostname, cert, tls_key)
        if shared is None:
            shared = Directory.open(data, key.derive("directory database"), create=True)
        signing.new_key_pair(shared, shared.add_domain(domain))
    finally:
        if shared is not None:
            shared.close()


def _require_data_dir(args: argparse.Namespace) -> Path:
    """The data directory, or an error naming the command that creates it."""
    data: Path = args.data
    if not (data / config.CONFIG_NAME).exists():
        init = _hint(args, "init", "--hostname", "HOST", "--domain", "DOMAIN")
        raise CLIError(f"no data directory at {data} (create one with `{init}`)")
    return data


def with_app(fn: Callable[[App, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        app = App.open(_require_data_dir(args))
        try:
            return fn(app, args)
        finally:
            app.close()

    return run


@with_app
def cmd_domain_add(app: App, args: argparse.Namespace) -> int:
    domain = app.directory.add_domain(args.domain)
    keys = signing.new_key_pair(app.directory, domain)
    print(f"added domain {domain} with DKIM selectors {', '.join(k.selector for k in keys)}")
    print(f"publish its DNS records: {_hint(args, 'dns', domain)}")
    return 0


def print_list(lines: Iterable[str], nothing: str) -> int:
    """How every list command answers: one line per item on stdout; when there is none,
    nothing on stdout and *nothing* (e.g. "no aliases") as one line on stderr. Either way
    the exit status is 0: an empty list is an answer. A list of something that does not
    exist (an unknown domain or user) is an error, raised before this is reached."""
    empty = True
    for line in lines:
        print(line)
        empty = False
    if empty:
        print(nothing, file=sys.stderr)
    return 0


def _known_domain(app: App, domain: str) -> str:
    if not app.directory.has_domain(domain):
        raise CLIError(f"no such domain: {domain}")
    return domain


@with_app
def cmd_domain_list(app: App, args: argparse.Namespace) -> int:
    return print_list(app.directory.domains(), "no domains")


@with_app
def cmd_domain_policy(app: App, args: argparse.Namespace) -> int:
    policy = None if args.attachments == "default" else args.attachments
    app.directory.set_attachment_policy(args.domain, policy)
    shown = policy or f"default ({app.settings.filters.attachment_policy})"
    print(f"dangerous attachments for {args.domain}: {shown}")
    return 0


@with_app
def cmd_domain_remove(app: App, args: argparse.Namespace) -> int:
    app.directory.remove_domain(args.domain)
    print(f"removed domain {args.domain}")
    return 0


@with_app
def cmd_dkim_list(app: App, args: argparse.Namespace) -> int:
    keys = app.directory.dkim_keys(_known_domain(app, args.domain))
    return print_list(
        (
            f"{key.selector}\t{key.algorithm}\t{'signing' if key.active else 'retired'}"
            f"\tcreated {_date(key.created)}"
            for key in keys
        ),
        f"no DKIM selectors for {args.domain}",
    )


@with_app
def cmd_dkim_rotate(app: App, args: argparse.Namespace) -> int:
    keys = signing.new_key_pair(app.directory, _known_domain(app, args.domain))
    print(f"new selectors {', '.join(k.selector for k in keys)} now sign for {args.domain}")
    print(f"Publish them (`{_hint(args, 'dns', args.domain)}`), keep the old ones published")
    print("for a few days, then remove each old one with")
    print(f"`{_hint(args, 'dkim', 'remove', args.domain, 'SELECTOR')}`.")
    return 0


@with_app
def cmd_dkim_remove(app: App, args: argparse.Namespace) -> int:
    app.directory.remove_dkim_key(args.domain, args.selector)
    print(f"removed selector {args.selector} of {args.domain}")
    return 0


@with_app
def cmd_dns(app: App, args: argparse.Namespace) -> int:
    keys = app.directory.dkim_keys(_known_domain(app, args.domain))
    s = app.settings
    policy = mtasts.policy_text([s.hostname], s.mta.sts_mode)
    servers = clientservers.client_servers(s)
    domain = args.domain.lower()
    print(dnsrecords.records(domain, s.hostname, keys, mtasts.policy_id(policy), servers), end="")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the live installation (ops/doctor.py); non-zero when any check fails."""
    from postvern.ops import doctor

    unknown = set(args.skip) - set(doctor.CHECKS)
    if unknown:
        raise CLIError(f"no such check: {sorted(unknown)[0]} (checks: {' '.join(doctor.CHECKS)})")
    data = _require_data_dir(args)
    try:
        app = App.open(data)
    except Exception:
        settings = config.load(data)
        if not settings.directory.url:
            raise
        # Without its directory nothing else can be checked: say exactly what is wrong with it.
        from postvern.ops.doctor_directory import check_directory

        results = check_directory(settings)
        if not doctor.failed(results):
            raise  # not the directory's fault after all
    else:
        try:
            host = doctor.Host(args.root)
            results = asyncio.run(doctor.run(app, host=host, skip=frozenset(args.skip)))
        finally:
            app.close()
    if args.json:
        import json

        print(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        for result in results:
            print(result.line())
    return 1 if doctor.failed(results) else 0


def _filter_context(args: argparse.Namespace) -> ScanContext:
    """The filter as the server runs it: the data directory's [filters] settings when there
    is one, the defaults otherwise."""
    data: Path = args.data
    filters = FilterSettings()
    if (data / config.CONFIG_NAME).exists():
        filters = FilterSettings.from_config(config.load(data))
    return ScanContext(settings=filters)


def cmd_filter_check(args: argparse.Namespace) -> int:
    ctx = _filter_context(args)
    for path in args.paths:
        for message in trial.read_messages(path):
            if not message.raw:
                print(f"{message.name}: skipped (over {trial.MAX_MESSAGE_BYTES >> 20} MiB)")
                continue
            verdict, _ = trial.judge(message.raw, ctx)
            print(f"{message.name}: {verdict.header()}")
    return 0


def cmd_filter_test(args: argparse.Namespace) -> int:
    paths = {kind: getattr(args, kind) for kind in trial.KINDS if getattr(args, kind)}
    if not paths:
        raise CLIError("give at least one of --ham, --spam, --phish")
    tallies = trial.run_trial(paths, _filter_context(args), shown=args.show)
    if not any(t.messages for t in tallies.values()):
        raise CLIError("no messages found")
    print("\n".join(trial.report(tallies)))
    return 0


def _queue_store(app: App) -> QueueStore:
    s = app.settings
    return QueueStore.open(s.path(QUEUE_FILE), app.server_key.derive("queue"))


@with_app
def cmd_queue_list(app: App, args: argparse.Namespace) -> int:
    with _queue_store(app) as store:
        entries = mta_admin.list_entries(store)
    return print_list(mta_admin.format_list(entries).splitlines(), "no queued messages")


@with_app
def cmd_queue_show(app: App, args: argparse.Namespace) -> int:
    with _queue_store(app) as store:
        print(mta_admin.format_detail(mta_admin.show_entry(store, args.id)), end="")
    return 0


@with_app
def cmd_queue_retry(app: App, args: argparse.Namespace) -> int:
    with _queue_store(app) as store:
        count = mta_admin.retry_entries(store, args.id)
    # The running server's MTA is told through the FIFO in the data directory (mta.wake).
    woken = mta_wake.wake(app.settings.path(mta_wake.WAKE_FILE))
    print(f"{count} entr{'y' if count == 1 else 'ies'} scheduled for delivery now")
    if not woken:
        print("no running server was reached; delivery starts when it runs")
    return 0


@with_app
def cmd_queue_delete(app: App, args: argparse.Namespace) -> int:
    s = app.settings
    shared = False
    if s.cluster.role == "front" and s.cluster.queue_store:
        # A front's shared queue: the object and its progress first, so that neither this
        # front's next start nor another's takeover brings the entry back (sharedq.py).
        from postvern.cluster import sharedq

        key = app.server_key.derive("cluster queue")
        try:
            shared = sharedq.delete_everywhere(s, key, args.id)
        except Exception as e:
            problem = f"the shared queue did not answer ({type(e).__name__})"
            raise CLIError(f"{problem}; nothing was deleted here, run it again") from None
    with _queue_store(app) as store:
        try:
            mta_admin.delete_entry(store, args.id)
        except EntryNotFound:
            if not shared:  # held in the shared store only (this front was restarted bare)
                raise
    print(f"deleted {args.id}")
    return 0


def _abuse_command(app: App, action: Callable[[Abuse], Awaitable[int]]) -> int:
    async def run() -> int:
        key = app.server_key.derive("abuse")
        async with abuse_admin.opened(app.settings, app.settings.data_dir, key) as abuse:
            return await action(abuse)

    return asyncio.run(run())


@with_app
def cmd_ban_list(app: App, args: argparse.Namespace) -> int:
    async def action(abuse: Abuse) -> int:
        bans = abuse.bans(include_expired=args.all)
        return print_list(abuse_admin.ban_table(bans), "no bans" if args.all else "no active bans")

    return _abuse_command(app, action)


@with_app
def cmd_ban_add(app: App, args: argparse.Namespace) -> int:
    try:
        seconds = parse_duration(args.duration)
    except ValueError as e:
        raise CLIError(str(e)) from None

    async def action(abuse: Abuse) -> int:
        ban = await abuse.ban(args.address, seconds, args.reason)
        print(f"banned {ban.network} until {utc_text(ban.until)}")
        return 0

    return _abuse_command(app, action)


@with_app
def cmd_ban_remove(app: App, args: argparse.Namespace) -> int:
    async def action(abuse: Abuse) -> int:
        if await abuse.unban(args.address) is None:
            raise CLIError(f"{args.address} is not banned")
        print(f"unbanned {args.address}")
        return 0

    return _abuse_command(app, action)


def _quota(text: str | None) -> int:
    if text is None:
        return 0
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise CLIError(f"not a size: {text!r} (use e.g. 500M or 2G)") from None
    if value < 0:
        raise CLIError("quota must not be negative")
    return value


@with_app
def cmd_user_add(app: App, args: argparse.Namespace) -> int:
    app.accounts.check_new_address(args.address)  # before asking for a password
    password = None
    if args.password_stdin or not args.generate:
        if args.password_stdin or sys.stdin.isatty():
            password = Secrets(args.password_stdin).read("New password", confirm=True)
    quota = _quota(args.quota) if args.quota else app.settings.limits.default_quota
    if app.settings.cluster.role:  # made on (and placed on) a mailbox node
        new = cluster_portal.create_user(app, args.address, password, quota)
    else:
        new = app.accounts.create_user(args.address, password, quota)
    print(f"created {new.user.address}")
    if new.generated_password:
        print(f"password: {new.password}")
    print(f"recovery key: {new.recovery_key}")
    print(
        "Keep the recovery key somewhere safe and offline. It is shown only now. Without the"
        " password or this key the mail cannot be read by anyone, including the administrator."
    )
    return 0


@with_app
def cmd_user_list(app: App, args: argparse.Namespace) -> int:
    if args.domain is not None:
        _known_domain(app, args.domain)
    return print_list(
        (
            f"{user.address}\tquota {f'{user.quota} bytes' if user.quota else 'unlimited'}"
            for user in app.directory.users(args.domain)
        ),
        "no users" if args.domain is None else f"no users in {args.domain}",
    )


@with_app
def cmd_user_passwd(app: App, args: argparse.Namespace) -> int:
    secrets = Secrets(args.password_stdin)
    current = secrets.read("Current password (or an app password)")
    new = secrets.read("New password", confirm=True)
    if app.settings.cluster.role == "front":  # done on the user's mailbox node
        cluster_portal.change_password(app, args.address, current, new)
    else:
        app.accounts.change_password(args.address, current, new)
    print(f"password changed for {args.address}; no mail was re-encrypted")
    return 0


@with_app
def cmd_user_recover(app: App, args: argparse.Namespace) -> int:
    secrets = Secrets(args.password_stdin)
    recovery = secrets.read("Recovery key")
    new = secrets.read("New password", confirm=True)
    try:
        if app.settings.cluster.role == "front":  # done on the user's mailbox node
            fresh = cluster_portal.recover(app, args.address, recovery, new)
        else:
            fresh = app.accounts.recover(args.address, recovery, new)
    except AuthFailed:
        raise CLIError("the recovery key does not open this account") from None
    print(f"password reset for {args.address}")
    print(f"new recovery key: {fresh}  (the old one no longer works)")
    return 0


@with_app
def cmd_user_remove(app: App, args: argparse.Namespace) -> int:
    if not args.yes:
        raise CLIError("removing a user deletes their mail for good; repeat with --yes")
    if app.settings.cluster.role == "front":  # the mailbox node removes it (and the row)
        removed = cluster_portal.remove_user(app, args.address)
        print(f"removed {args.address} and their mailbox on {removed.node}")
        _print_alias_changes(removed.aliases)
        for item in removed.left:
            print(f"left on {removed.node}, remove it there by hand: {item}", file=sys.stderr)
        return 1 if removed.left else 0
    if app.settings.cluster.role == "mailbox":
        cluster_portal.check_removable_here(app, args.address)
    changes = app.accounts.remove_user(args.address)
    print(f"removed {args.address} and their mailbox")
    _print_alias_changes(changes)
    return 0


def _print_alias_changes(changes: list[AliasChange]) -> None:
    for change in changes:
        dropped = ", ".join(change.dropped)
        if change.removed:
            print(f"removed alias {change.alias}: its only target(s) {dropped} no longer exist")
        else:
            print(f"removed {dropped} from alias {change.alias}")


@with_app
def cmd_alias_add(app: App, args: argparse.Namespace) -> int:
    alias = app.directory.add_alias(args.address, args.targets)
    print(f"{alias.address} -> {', '.join(alias.targets)}")
    return 0


@with_app
def cmd_alias_list(app: App, args: argparse.Namespace) -> int:
    problems = 0

    def lines() -> Iterator[str]:
        nonlocal problems
        for alias in app.directory.aliases():
            yield f"{alias.address}\t{', '.join(alias.targets)}"
            for problem in app.directory.alias_problems(alias):
                problems += 1
                yield f"  problem: {problem}"

    print_list(lines(), "no aliases")
    if problems:
        # Listing worked, so the exit status is 0; the warning goes where an operator sees it.
        print(f"warning: {problems} alias problem(s), see above", file=sys.stderr)
    return 0


@with_app
def cmd_alias_remove(app: App, args: argparse.Namespace) -> int:
    changes = app.directory.remove_alias(args.address)
    print(f"removed alias {args.address}")
    _print_alias_changes(changes)
    return 0


@with_app
def cmd_app_password_add(app: App, args: argparse.Namespace) -> int:
    password = Secrets(args.password_stdin).read(f"Password of {args.address}")
    try:
        secret = app.accounts.add_app_password(args.address, password, args.label)
    except AuthFailed:
        raise CLIError("wrong password") from None
    print(f"app password {args.label!r} for {args.address}: {secret}")
    print("Use it in the mail client instead of the account password. It is shown only now.")
    return 0


@with_app
def cmd_app_password_list(app: App, args: argparse.Namespace) -> int:
    return print_list(
        (
            f"{slot.label}\tcreated {_date(slot.created)}"
            f"\tlast used {_date(slot.last_used) if slot.last_used else 'never'}"
            for slot in app.accounts.app_passwords(args.address)
        ),
        f"no app passwords for {args.address}",
    )


@with_app
def cmd_app_password_revoke(app: App, args: argparse.Namespace) -> int:
    app.accounts.revoke_app_password(args.address, args.label)
    print(f"revoked app password {args.label!r} of {args.address}")
    return 0


def _date(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def cmd_tls_status(args: argparse.Namespace) -> int:
    """The certificate's names and days left; an error when under EXPIRY_WARNING_DAYS."""
    settings = config.load(_require_data_dir(args))
    cert = read_certificate(settings.path(settings.tls.cert))
    days = cert.days_left()
    print(f"certificate  {cert.path}")
    print(f"names        {', '.join(cert.names)}")
    print(f"expires      {cert.expires} ({f'{days} days left' if days >= 0 else 'expired'})")
    problem = cert.expiry_problem()
    if problem is not None:
        raise CLIError(problem)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from postvern.server import run

    return run(_require_data_dir(args))


def cmd_demo(args: argparse.Namespace) -> int:
    """Create (once) and run the demo: a domain, a user, high ports on 127.0.0.1."""
    data: Path = args.data
    if not (data / config.CONFIG_NAME).exists():
        # Scan the demo's mail when clamd is installed and up; a clamd that does not answer
        # would only defer every message.
        clamd = local_clamd(answering=True)
        init_data_dir(data, "localhost", DEMO_DOMAIN, HIGH_PORTS, clamd=clamd)
        app = App.open(data)
        try:
            new = app.accounts.create_user(DEMO_USER, DEMO_PASSWORD)
        finally:
            app.close()
        print(f"Created the demo in {data}. Demo recovery key: {new.recovery_key}")
    from postvern.server import run

    return run(data, banner=demo_banner)


DEMO_LISTENERS = (
    ("imaps", "IMAP, TLS"),
    ("imap", "IMAP, STARTTLS"),
    ("pop3s", "POP3, TLS"),
    ("pop3", "POP3, STARTTLS"),
    ("submissions", "SMTP submission, TLS"),
    ("submission", "SMTP submission, STARTTLS"),
    ("smtp", "SMTP (MX, inbound)"),
    ("https", "HTTPS (autoconfig, MTA-STS)"),
)


def demo_banner(settings: config.Settings) -> str:
    """How to connect: the certificate's name (clients check it) with each listener's port."""
    lines = [
        "",
        "Postvern demo is running. Connect a mail client with:",
        f"  user      {DEMO_USER}",
        f"  password  {DEMO_PASSWORD}   (demo only: anyone reading this README knows it)",
    ]
    width = max(len(label) for _, label in DEMO_LISTENERS)
    for name, label in DEMO_LISTENERS:
        addr = getattr(settings.listen, name)
        if addr:
            port = config.parse_hostport(addr)[1]
            lines.append(f"  {label:<{width}}  {settings.hostname}:{port}")
    clamd = settings.filters.clamd
    lines.append(
        f"Virus scanning: clamd at {clamd}."
        if clamd
        else f"Virus scanning: off (no clamd answering at {_clamd_socket()})."
    )
    cert = settings.path(settings.tls.cert)
    lines.append(
        f"The certificate is self-signed for {settings.hostname}: accept it in the client,"
    )
    lines.append(f"or trust {cert} (mbsync CertificateFile). Stop with Ctrl-C.")
    return "\n".join(lines)


# -- argument parsing ----------------------------------------------------------------------


def _data_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--data",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"data directory (default: $POSTVERN_DATA or ./{DEFAULT_DATA})",
    )
    return parent


class _Parser(argparse.ArgumentParser):
    """Every parser of the command tree (subparsers are made of the same class) takes
    ``--data`` as a parent, so it may stand before or after the subcommand. Its default is
    SUPPRESS: a parser that was not given it sets nothing, so it does not overwrite the one
    given earlier; given twice, the later wins."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**{**kw, "parents": [*kw.get("parents", ()), _data_option()]})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="postvern", description="A self-hosted mail server with zero-access storage."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="create a data directory")
    p.add_argument("--hostname", required=True, help="this server's public host name")
    p.add_argument("--domain", required=True, help="the first mail domain")
    p.add_argument(
        "--ports",
        choices=("standard", "high"),
        default="standard",
        help="listen on the standard ports on all addresses, or high ports on 127.0.0.1",
    )
    p.add_argument(
        "--clamd",
        metavar="SOCKET",
        help=f"the clamd that scans mail: a unix socket path or host:port (default: {CLAMD_SOCKET}"
        f" or ${CLAMD_SOCKET_ENV}, if that socket exists); 'none' scans nothing",
    )
    p.add_argument(
        "--postmaster",
        metavar="ADDRESS",
        help="the administrator's address, which postmaster@ and abuse@ of every domain reach"
        " (default: the first user created)",
    )
    p.add_argument(
        "--directory-url",
        metavar="URL",
        help="keep the directory in this empty PostgreSQL database (postgresql://USER@HOST/DB;"
        " TLS verify-full) instead of directory.sqlite: a cluster's directory",
    )
    p.add_argument("--directory-ca", metavar="FILE", help="root CA of PostgreSQL's certificate")
    p.add_argument("--directory-password-file", metavar="FILE", help="the password (mode 0600)")
    p.add_argument("--directory-client-cert", metavar="FILE", help="or a client certificate")
    p.add_argument("--directory-client-key", metavar="FILE", help="and its key")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run every configured listener until SIGTERM/SIGINT")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="create and run a demo server on high ports")
    p.set_defaults(func=cmd_demo, demo=True)

    _domain_commands(sub)
    _user_commands(sub)
    _alias_commands(sub)
    _app_password_commands(sub)
    _dkim_commands(sub)
    _queue_commands(sub)
    _ban_commands(sub)
    _filter_commands(sub)
    backup_commands.register(sub)
    cluster_commands.register(sub)  # cluster/commands.py
    g = _group(sub, "tls", "the TLS certificate")
    p = g.add_parser(
        "status",
        help=f"its names and days left; fails when under {EXPIRY_WARNING_DAYS} days or expired",
    )
    p.set_defaults(func=cmd_tls_status)
    p = sub.add_parser("dns", help="print every DNS record a domain needs")
    p.add_argument("domain")
    p.set_defaults(func=cmd_dns)
    p = sub.add_parser("doctor", help="check the live installation; non-zero on any failure")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--skip", action="append", default=[], metavar="CHECK", help="leave a check out")
    p.add_argument("--root", type=Path, default=Path("/"), help="read kernel state under ROOT")
    p.set_defaults(func=cmd_doctor)
    ops_commands.register(sub)
    directory_commands.register(sub)
    return parser


def _group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    p = sub.add_parser(name, help=help)
    return p.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)


def _domain_commands(sub: argparse._SubParsersAction) -> None:
    g = _group(sub, "domain", "manage mail domains")
    p = g.add_parser("add", help="add a domain")
    p.add_argument("domain")
    p.set_defaults(func=cmd_domain_add)
    p = g.add_parser("list", help="list domains")
    p.set_defaults(func=cmd_domain_list)
    p = g.add_parser("remove", help="remove a domain without users")
    p.add_argument("domain")
    p.set_defaults(func=cmd_domain_remove)
    p = g.add_parser("policy", help="set a domain's policy for dangerous attachments")
    p.add_argument("domain")
    p.add_argument(
        "--attachments",
        choices=("reject", "quarantine", "default"),
        required=True,
        help="refuse at SMTP time (554 5.7.1), file as junk, or follow [filters]",
    )
    p.set_defaults(func=cmd_domain_policy)


def _stdin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read secrets from standard input, one per line, instead of prompting",
    )


def _user_commands(sub: argparse._SubParsersAction) -> None:
    g = _group(sub, "user", "manage users")
    p = g.add_parser("add", help="create a user; prints the recovery key once")
    p.add_argument("address")
    p.add_argument("--quota", help="storage quota, e.g. 2G (default: config limits.default_quota)")
    p.add_argument("--generate", action="store_true", help="generate the password and print it")
    _stdin_flag(p)
    p.set_defaults(func=cmd_user_add)
    p = g.add_parser("list", help="list users")
    p.add_argument("--domain")
    p.set_defaults(func=cmd_user_list)
    p = g.add_parser("passwd", help="change a password (needs the current one)")
    p.add_argument("address")
    _stdin_flag(p)
    p.set_defaults(func=cmd_user_passwd)
    p = g.add_parser("recover", help="reset a forgotten password with the recovery key")
    p.add_argument("address")
    _stdin_flag(p)
    p.set_defaults(func=cmd_user_recover)
    p = g.add_parser("remove", help="delete a user and their mail")
    p.add_argument("address")
    p.add_argument("--yes", action="store_true", help="confirm deletion")
    p.set_defaults(func=cmd_user_remove)
    e2e_admin.add_key_commands(g)


def _alias_commands(sub: argparse._SubParsersAction) -> None:
    g = _group(sub, "alias", "manage aliases (name@domain, or @domain as catch-all)")
    p = g.add_parser("add", help="add an alias to local users and/or outside addresses")
    p.add_argument("address")
    p.add_argument("targets", nargs="+")
    p.set_defaults(func=cmd_alias_add)
    p = g.add_parser("list", help="list aliases")
    p.set_defaults(func=cmd_alias_list)
    p = g.add_parser("remove", help="remove an alias")
    p.add_argument("address")
    p.set_defaults(func=cmd_alias_remove)


def _app_password_commands(sub: argparse._SubParsersAction) -> None:
    g = _group(sub, "app-password", "manage app passwords for mail clients")
    p = g.add_parser("add", help="create an app password (asks for the account password)")
    p.add_argument("address")
    p.add_argument("label", help="a name for the client, e.g. 'phone'")
    _stdin_flag(p)
    p.set_defaults(func=cmd_app_password_add)
    p = g.add_parser("list", help="list app passwords")
    p.add_argument("address")
    p.set_defaults(func=cmd_app_password_list)
    p = g.add_parser("revoke", help="revoke an app password")
    p.add_argument("address")
    p.add_argument("label")
    p.set_defaults(func=cmd_app_password_revoke)


def _dkim_commands(sub: argparse._SubParsersAction) -> None:
    g = _group(sub, "dkim", "manage DKIM signing keys")
    p = g.add_parser("list", help="list a domain's selectors")
    p.add_argument("domain")
    p.set_defaults(func=cmd_dkim_list)
    p = g.add_parser("rotate", help="add a new Ed25519 + RSA pair; old selectors stay published")
    p.add_argument("domain")
    p.set_defaults(func=cmd_dkim_rotate)
    p = g.add_parser("remove", help="remove a retired selector")
    p.add_argument("domain")
    p.add_argument("selector")
    p.set_defaults(func=cmd_dkim_remove)


def _queue_commands(sub: argparse._SubParsersAction) -> None:
    g = _group(sub, "queue", "inspect and manage the outbound queue")
    p = g.add_parser("list", help="list queued messages (no message text)")
    p.set_defaults(func=cmd_queue_list)
    p = g.add_parser("show", help="show one entry and its headers")
    p.add_argument("id")
    p.set_defaults(func=cmd_queue_show)
    p = g.add_parser("retry", help="retry one entry, or all, now")
    p.add_argument("id", nargs="?")
    p.set_defaults(func=cmd_queue_retry)
    p = g.add_parser("delete", help="delete an entry without delivering it")
    p.add_argument("id")
    p.set_defaults(func=cmd_queue_delete)


def _ban_commands(sub: argparse._SubParsersAction) -> None:
    g = _group(sub, "ban", "list, add and remove bans of client addresses")
    p = g.add_parser("list", help="list active bans")
    p.add_argument("--all", action="store_true", help="include expired bans")
    p.set_defaults(func=cmd_ban_list)
    p = g.add_parser("add", help="ban an address or network (CIDR)")
    p.add_argument("address")
    p.add_argument("--duration", default="1d", help="e.g. 30m, 12h, 7d (default 1d)")
    p.add_argument("--reason", default="banned by the administrator")
    p.set_defaults(func=cmd_ban_add)
    p = g.add_parser("remove", help="lift a ban")
    p.add_argument("address")
    p.set_defaults(func=cmd_ban_remove)


def _filter_commands(sub: argparse._SubParsersAction) -> None:
    g = _group(sub, "filter", "try the content filter on stored mail")
    p = g.add_parser("check", help="print the verdict on each message of files or directories")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="message, mbox or directory")
    p.set_defaults(func=cmd_filter_check)
    p = g.add_parser("test", help="measure the filter on mail known to be ham, spam or phishing")
    for kind in trial.KINDS:
        p.add_argument(
            f"--{kind}", type=Path, action="append", default=[], metavar="PATH",
            help=f"{trial.KIND_NAMES[kind]}: a message, an mbox or a directory (repeatable)",
        )  # fmt: skip
    p.add_argument(
        "--show", type=int, default=trial.DEFAULT_SHOWN, metavar="N",
        help="list at most N misjudged messages of each kind, with their verdicts",
    )  # fmt: skip
    p.set_defaults(func=cmd_filter_test)


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)
    no_core_dumps()  # passwords and mailbox keys pass through admin commands too
    parser = build_parser()
    args = parser.parse_args(argv)
    args.data_given = hasattr(args, "data")
    if not args.data_given:
        default = DEMO_DATA if getattr(args, "demo", False) else DEFAULT_DATA
        args.data = Path(os.environ.get("POSTVERN_DATA", default))
    try:
        return int(args.func(args))
    except CLIError as e:
        print(f"postvern: {e}", file=sys.stderr)
    except AuthFailed:
        print("postvern: wrong address or password", file=sys.stderr)
    except EntryNotFound:
        print(f"postvern: no queue entry {getattr(args, 'id', '')}", file=sys.stderr)
    except EXPECTED as e:
        print(f"postvern: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("postvern: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
