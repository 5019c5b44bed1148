"""``postvern logs search``: find a client's lines of one day within the retention window."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from postvern import config
from postvern.abuse.network import AddressError, parse_ip
from postvern.ops import retention


def cmd_logs_search(args: argparse.Namespace) -> int:
    try:
        return _search(args)
    except retention.RetentionError as e:
        print(f"postvern: {e}", file=sys.stderr)
        return 1


def _search(args: argparse.Namespace) -> int:
    if not args.ip and not args.account:
        raise retention.RetentionError("say whom to look for: --ip ADDR and/or --account ADDR")
    for ip in args.ip:
        try:
            parse_ip(ip)
        except AddressError:
            raise retention.RetentionError(f"{ip!r} is not an IP address") from None
    settings = config.load(Path(args.data))
    lines = sys.stdin if args.stdin else None
    found = retention.search(
        settings, retention.parse_day(args.day), ips=args.ip, accounts=args.account, lines=lines
    )
    count = 0
    for line in found:
        print(line)
        count += 1
    if not count:
        print(f"no lines about them on {args.day}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("logs", help="the server's pseudonymised log").add_subparsers(
        dest="logs_command", required=True
    )
    p = group.add_parser("search", help="one day's lines about an address or an account")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR", help="client address")
    p.add_argument("--account", action="append", default=[], metavar="ADDR", help="account")
    p.add_argument("--day", required=True, metavar="YYYY-MM-DD", help="the UTC day")
    p.add_argument(
        "--stdin", action="store_true", help="read the lines from stdin (journalctl -o cat)"
    )
    p.set_defaults(func=cmd_logs_search)
