"""The accounts database: domains, users, aliases, key slots, and the operations on them."""

from postvern.directory.addresses import AddressError, normalise_address, split_address
from postvern.directory.db import Directory, DirectoryError, KeySlot, User

__all__ = [
    "AddressError",
    "Directory",
    "DirectoryError",
    "KeySlot",
    "User",
    "normalise_address",
    "split_address",
]
