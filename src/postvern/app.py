"""The pieces every entry point needs, opened in one place: settings, keys, directory, accounts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from postvern import config
from postvern.crypto.keyslots import KDFParams
from postvern.crypto.serverkey import ServerKey
from postvern.directory.accounts import Accounts
from postvern.directory.addresses import AddressError, normalise_address
from postvern.directory.db import Directory
from postvern.directory.forwarding import ForwardingPolicy


@dataclass
class App:
    settings: config.Settings
    server_key: ServerKey
    directory: Directory
    accounts: Accounts

    @classmethod
    def open(cls, data_dir: Path) -> App:
        settings = config.load(data_dir)
        postmaster = None
        if settings.postmaster:
            try:
                postmaster = normalise_address(settings.postmaster)
            except AddressError as e:
                raise config.ConfigError(f"postmaster: {e}") from None
        server_key = ServerKey.load(data_dir)
        directory = Directory.open(
            data_dir,
            server_key.derive("directory database"),
            postmaster=postmaster,
            forwarding=ForwardingPolicy(
                settings.accounts.forwarding, settings.accounts.max_forwards
            ),
        )
        kdf = KDFParams(settings.kdf.time_cost, settings.kdf.memory_kib, settings.kdf.parallelism)
        return cls(settings, server_key, directory, Accounts(data_dir, directory, server_key, kdf))

    def close(self) -> None:
        self.directory.close()
