"""SIGHUP: read ``postvern.toml`` and the TLS certificate again without dropping a connection.

The new configuration and certificate are both loaded and checked before anything changes;
if either is broken, the reload is refused with one log line and the running ones stay.

**The certificate** is switched, not edited: every listener keeps the ``SSLContext`` it was
started with, whose SNI callback (called for every ClientHello, with or without a server
name) hands the handshake to the newest loaded context. New handshakes see the new
certificate; open connections have finished theirs and are untouched. Loading into the live
context instead would add a certificate of another key type beside the old one rather than
replace it.

**Settings** that are read where they are used are applied by copying the new values into
the running ``Settings`` sections (new sessions see them); the few components that copied
theirs at start are told (abuse limits, filter thresholds, the log level). Anything else
that changed — listener addresses, the host name, the DNS resolver, Redis… — is logged as
taking effect only after a restart (``systemctl restart`` or SIGUSR2; see handoff.py).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import TYPE_CHECKING

from postvern import config, filters
from postvern.crypto import tls

if TYPE_CHECKING:
    from postvern.server import Server

log = logging.getLogger(__name__)

# Per section, the settings a reload applies. [limits]: sessions read these from the shared
# section when they start; the connection caps, the login service and the mailbox registry
# copied theirs at start. [abuse], [filters], [log]: see apply(). [tls]: the certificate.
LIVE: dict[str, frozenset[str]] = {
    "limits": frozenset(f.name for f in dataclasses.fields(config.Limits)).difference(
        {
            "connections",
            "connections_per_ip",
            "login_cache_seconds",
            "mailbox_linger_seconds",
        }
    ),
    "abuse": frozenset(
        {
            "allowlist",
            "greylisting",
            "ban_seconds",
            "ban_max_seconds",
            "greylist_delay",
            "greylist_window",
            "greylist_pass_period",
            "connections_per_ip_per_minute",
            "messages_per_ip_per_hour",
            "recipients_per_ip_per_hour",
            "messages_per_sender_per_day",
            "submissions_per_user_per_day",
            "auth_failures_per_ip",
            "auth_failures_per_account",
            "unknown_rcpt_per_ip",
        }
    ),
    "filters": frozenset(
        {
            "clamd",
            "clamd_timeout",
            "on_scanner_failure",
            "spam_junk_score",
            "spam_reject_score",
            "url_blocklist",
            "attachment_policy",
        }
    ),
    "log": frozenset({"level"}),
    "tls": frozenset({"cert", "key", "ca_bundle"}),
}


class CertificateSwitch:
    """Hands each new TLS handshake of the listeners' context to the newest certificate."""

    def __init__(self, listening: ssl.SSLContext) -> None:
        self.listening = listening
        self.current = listening
        listening.sni_callback = self._choose

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> None:
        current = self.current
        if current is not self.listening:
            connection.context = current
        return None

    def use(self, context: ssl.SSLContext) -> None:
        # One assignment: a handshake sees the old context or the new, never a mixture.
        self.current = context


def changes(old: config.Settings, new: config.Settings) -> list[str]:
    """``section.setting`` (or a top-level name) of every value that differs."""
    out: list[str] = []
    for f in dataclasses.fields(config.Settings):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(before) and not isinstance(before, type):
            for g in dataclasses.fields(before):
                if getattr(before, g.name) != getattr(after, g.name):
                    out.append(f"{f.name}.{g.name}")
        elif before != after:
            out.append(f.name)
    return out


def is_live(change: str) -> bool:
    section, _, name = change.partition(".")
    return name in LIVE.get(section, frozenset())


class Reloader:
    """What SIGHUP runs (``Server``'s handler): :meth:`reload`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.certificates = CertificateSwitch(server.tls_context)

    def reload(self) -> bool:
        """Load, check, apply; False (and the running configuration stays) on any error."""
        running = self.server.settings
        try:
            new = config.load(running.data_dir)
            if new.log.level.upper() not in logging.getLevelNamesMapping():
                raise config.ConfigError(f"[log] level {new.log.level!r} is unknown")
            context = tls.server_context(new.path(new.tls.cert), new.path(new.tls.key))
        except (config.ConfigError, tls.TLSConfigError) as e:
            log.error("reload refused: %s; the running configuration stays", e)
            return False
        changed = changes(running, new)
        live = [c for c in changed if is_live(c)]
        for change in live:
            section, _, name = change.partition(".")
            setattr(getattr(running, section), name, getattr(getattr(new, section), name))
        self.apply(running)
        self.certificates.use(context)
        self.server.certificate_reloaded()
        log.info(
            "configuration and certificate reloaded%s",
            f" ({', '.join(live)} changed)" if live else "",
        )
        for change in changed:
            if not is_live(change):
                log.warning("%s changed: it takes effect after a restart", change)
        return True

    def apply(self, settings: config.Settings) -> None:
        """Tell the components that copied their settings at start."""
        self.server.abuse.apply_settings(settings)
        stage = self.server.pipeline.content_filter
        if stage is not None and hasattr(stage, "settings"):
            stage.settings = filters.FilterSettings.from_config(settings)
        logging.getLogger().setLevel(settings.log.level.upper())
