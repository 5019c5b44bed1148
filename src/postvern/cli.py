"""``postvern …``: set up a data directory, run the server, administer domains and users.

Every command has ``--help``. Errors print one line on stderr and exit non-zero. Secrets
are read from a terminal prompt or, with ``--password-stdin``, one per line from standard
input; they are never taken from the command line, where any local user could read them
in the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from postvern import config
from postvern.abuse import Abuse, BanError, parse_duration, utc_text
from postvern.abuse import admin as abuse_admin
from postvern.app import App
from postvern.crypto.keyslots import BadSlot
from postvern.crypto.serverkey import KEY_FILE, ServerKey, ServerKeyError
from postvern.crypto.tls import TLSConfigError, make_self_signed
from postvern.directory.accounts import AuthFailed
from postvern.directory.addresses import AddressError
from postvern.directory.db import Directory, DirectoryError
from postvern.e2e import admin as e2e_admin
from postvern.emailauth import signing
from postvern.encdb import SchemaTooNew, WrongKey
from postvern.filters import FilterSettings, ScanContext, trial
from postvern.mta import QUEUE_FILE, EntryNotFound, QueueError, QueueStore
from postvern.mta import admin as mta_admin
from postvern.mta import wake as mta_wake
from postvern.ops import dnsrecords
from postvern.web import clientservers, mtasts

DEFAULT_DATA = "postvern-data"
DEMO_DATA = "demo-data"
DEMO_DOMAIN = "postvern.test"
DEMO_USER = f"demo@{DEMO_DOMAIN}"
# Printed on every start and in the README: the demo is for trying clients, not for real mail.
DEMO_PASSWORD = "postvern-demo-password"  # noqa: S105

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


def cmd_init(args: argparse.Namespace) -> int:
    data: Path = args.data
    ports = HIGH_PORTS if args.ports == "high" else STANDARD_PORTS
    init_data_dir(data, args.hostname, args.domain, ports)
    print(f"Created {data} for {args.hostname}, domain {args.domain}.")
    print("Next: `postvern user add USER@DOMAIN`, then `postvern dns DOMAIN` and `postvern serve`.")
    return 0


def init_data_dir(data: Path, hostname: str, domain: str, ports: dict[str, str]) -> None:
    if data.exists() and any(data.iterdir()):
        raise CLIError(f"{data} already exists and is not empty; refusing to overwrite it")
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data, 0o700)
    settings = config.Settings(data_dir=data, hostname=hostname, primary_domain=domain)
    settings.listen = config.Listen(**ports)
    (data / config.CONFIG_NAME).write_text(config.render(settings))
    key = ServerKey.generate()
    key.write(data / KEY_FILE)
    tls_dir = data / "tls"
    tls_dir.mkdir(mode=0o700)
    make_self_signed(hostname, settings.path(settings.tls.cert), settings.path(settings.tls.key))
    directory = Directory.open(data, key.derive("directory database"), create=True)
    try:
        signing.new_key_pair(directory, directory.add_domain(domain))
    finally:
        directory.close()


def with_app(fn: Callable[[App, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        app = App.open(args.data)
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
    print(f"publish its DNS records: postvern dns {domain}")
    return 0


@with_app
def cmd_domain_list(app: App, args: argparse.Namespace) -> int:
    for name in app.directory.domains():
        print(name)
    return 0


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
    for key in app.directory.dkim_keys(args.domain):
        state = "signing" if key.active else "retired"
        print(f"{key.selector}\t{key.algorithm}\t{state}\tcreated {_date(key.created)}")
    return 0


@with_app
def cmd_dkim_rotate(app: App, args: argparse.Namespace) -> int:
    if not app.directory.has_domain(args.domain):
        raise CLIError(f"no such domain: {args.domain}")
    keys = signing.new_key_pair(app.directory, args.domain)
    print(f"new selectors {', '.join(k.selector for k in keys)} now sign for {args.domain}")
    print("Publish them (postvern dns), keep the old ones published for a few days, then")
    print("remove them with `postvern dkim remove DOMAIN SELECTOR`.")
    return 0


@with_app
def cmd_dkim_remove(app: App, args: argparse.Namespace) -> int:
    app.directory.remove_dkim_key(args.domain, args.selector)
    print(f"removed selector {args.selector} of {args.domain}")
    return 0


@with_app
def cmd_dns(app: App, args: argparse.Namespace) -> int:
    if not app.directory.has_domain(args.domain):
        raise CLIError(f"no such domain: {args.domain}")
    keys = app.directory.dkim_keys(args.domain)
    s = app.settings
    policy = mtasts.policy_text([s.hostname], s.mta.sts_mode)
    servers = clientservers.client_servers(s)
    domain = args.domain.lower()
    print(dnsrecords.records(domain, s.hostname, keys, mtasts.policy_id(policy), servers), end="")
    return 0


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
        print(mta_admin.format_list(mta_admin.list_entries(store)), end="")
    return 0


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
    with _queue_store(app) as store:
        mta_admin.delete_entry(store, args.id)
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
        if not bans:
            print("No bans.")
        for line in abuse_admin.ban_table(bans):
            print(line)
        return 0

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
    password = None
    if args.password_stdin or not args.generate:
        if args.password_stdin or sys.stdin.isatty():
            password = Secrets(args.password_stdin).read("New password", confirm=True)
    quota = _quota(args.quota) if args.quota else app.settings.limits.default_quota
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
    for user in app.directory.users(args.domain):
        quota = "unlimited" if not user.quota else f"{user.quota} bytes"
        print(f"{user.address}\tquota {quota}")
    return 0


@with_app
def cmd_user_passwd(app: App, args: argparse.Namespace) -> int:
    secrets = Secrets(args.password_stdin)
    current = secrets.read("Current password (or an app password)")
    new = secrets.read("New password", confirm=True)
    app.accounts.change_password(args.address, current, new)
    print(f"password changed for {args.address}; no mail was re-encrypted")
    return 0


@with_app
def cmd_user_recover(app: App, args: argparse.Namespace) -> int:
    secrets = Secrets(args.password_stdin)
    recovery = secrets.read("Recovery key")
    new = secrets.read("New password", confirm=True)
    try:
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
    app.accounts.remove_user(args.address)
    print(f"removed {args.address} and their mailbox")
    return 0


@with_app
def cmd_alias_add(app: App, args: argparse.Namespace) -> int:
    alias = app.directory.add_alias(args.address, args.targets)
    print(f"{alias.address} -> {', '.join(alias.targets)}")
    return 0


@with_app
def cmd_alias_list(app: App, args: argparse.Namespace) -> int:
    for alias in app.directory.aliases():
        print(f"{alias.address}\t{', '.join(alias.targets)}")
    return 0


@with_app
def cmd_alias_remove(app: App, args: argparse.Namespace) -> int:
    app.directory.remove_alias(args.address)
    print(f"removed alias {args.address}")
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
    for slot in app.accounts.app_passwords(args.address):
        created = _date(slot.created)
        used = _date(slot.last_used) if slot.last_used else "never"
        print(f"{slot.label}\tcreated {created}\tlast used {used}")
    return 0


@with_app
def cmd_app_password_revoke(app: App, args: argparse.Namespace) -> int:
    app.accounts.revoke_app_password(args.address, args.label)
    print(f"revoked app password {args.label!r} of {args.address}")
    return 0


def _date(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def cmd_serve(args: argparse.Namespace) -> int:
    from postvern.server import run

    return run(args.data)


def cmd_demo(args: argparse.Namespace) -> int:
    """Create (once) and run the demo: a domain, a user, high ports on 127.0.0.1."""
    data: Path = args.data
    if not (data / config.CONFIG_NAME).exists():
        init_data_dir(data, "localhost", DEMO_DOMAIN, HIGH_PORTS)
        app = App.open(data)
        try:
            new = app.accounts.create_user(DEMO_USER, DEMO_PASSWORD)
        finally:
            app.close()
        print(f"Created the demo in {data}. Demo recovery key: {new.recovery_key}")
    from postvern.server import run

    return run(data, banner=demo_banner)


def demo_banner(settings: config.Settings) -> str:
    listen = settings.listen
    lines = [
        "",
        "Postvern demo is running. Connect a mail client with:",
        f"  user      {DEMO_USER}",
        f"  password  {DEMO_PASSWORD}   (demo only: anyone reading this README knows it)",
    ]
    for name, label in (
        ("imaps", "IMAP, TLS"),
        ("imap", "IMAP, STARTTLS"),
        ("pop3s", "POP3, TLS"),
        ("submissions", "SMTP submission, TLS"),
        ("submission", "SMTP submission, STARTTLS"),
        ("smtp", "SMTP (MX, inbound)"),
    ):
        addr = getattr(listen, name)
        if addr:
            lines.append(f"  {label:<27} {addr}")
    lines.append("The certificate is self-signed: accept it in the client. Stop with Ctrl-C.")
    return "\n".join(lines)


# -- argument parsing ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postvern", description="A self-hosted mail server with zero-access storage."
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"data directory (default: $POSTVERN_DATA or ./{DEFAULT_DATA})",
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
    p = sub.add_parser("dns", help="print every DNS record a domain needs")
    p.add_argument("domain")
    p.set_defaults(func=cmd_dns)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is None:
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
