"""The pieces every entry point needs, opened in one place: settings, keys, directory, accounts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from postvern import config
from postvern.crypto.keyslots import KDFParams
from postvern.crypto.serverkey import ServerKey
from postvern.directory.accounts import Accounts
from postvern.directory.addresses import AddressError, normalise_address
from postvern.directory.db import Directory, DirectoryError
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
        directory = open_directory(settings, server_key, postmaster)
        kdf = KDFParams(settings.kdf.time_cost, settings.kdf.memory_kib, settings.kdf.parallelism)
        return cls(settings, server_key, directory, Accounts(data_dir, directory, server_key, kdf))

    def close(self) -> None:
        self.directory.close()


def open_directory(
    settings: config.Settings, server_key: ServerKey, postmaster: str | None
) -> Directory:
    """The SQLite directory in the data directory, or PostgreSQL when [directory] url is set."""
    forwarding = ForwardingPolicy(settings.accounts.forwarding, settings.accounts.max_forwards)
    key = server_key.derive("directory database")
    db = settings.directory
    if not db.url:
        return Directory.open(settings.data_dir, key, postmaster=postmaster, forwarding=forwarding)
    # Imported here: psycopg is loaded only by a server whose directory is in PostgreSQL.
    from psycopg import OperationalError

    from postvern.directory.pg import InsecureDirectory, target_from_settings

    target = target_from_settings(settings)
    assert target is not None
    try:
        return Directory.open_postgres(target, key, postmaster=postmaster, forwarding=forwarding)
    except InsecureDirectory as e:
        raise config.ConfigError(f"[directory] {e}") from None
    except OperationalError as e:  # libpq's message names host and cause, never a password
        raise DirectoryError(f"cannot open the directory at {target.describe()}: {e}") from None
