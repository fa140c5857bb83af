"""A torchrefit file as a zip archive whose every member is checked once, before it is used.

`save` writes members uncompressed plus `checksums.json`, the SHA-256 of every other member.
`Archive` refuses a file that is not a regular file, whose members repeat a name, are
compressed or claim more bytes than the file holds, or whose `checksums.json` is missing or
does not list exactly its members; `read` reads a member once, bounded by its recorded size,
and checks it against its checksum (which detects corruption, not tampering: the hash sits in
the same file). Reading is linear in the file: each member is read and hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any, BinaryIO

from .errors import SerializationError
from .fileio import open_regular

CHECKSUMS = "checksums.json"
MAX_CHECKSUMS_BYTES = 1 << 20
MAX_MEMBERS = 100_000


class Archive:
    """The members of one file, checked as they are read; close() when done."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO = _open(path)
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            self.zip = zipfile.ZipFile(self._file)
            self.members = _members(self.zip, path, self.size)
            self.sums = self._checksums()
        except BaseException:
            self.close()
            raise
        self.digests: dict[str, str] = {}  # member -> SHA-256 of what was read

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if hasattr(self, "zip"):
            self.zip.close()
        self._file.close()

    def names(self) -> set[str]:
        """Every member but checksums.json."""
        return set(self.members) - {CHECKSUMS}

    def read(self, name: str, limit: int | None = None) -> bytes:
        """A member's bytes, read once and checked against checksums.json."""
        if name in self.digests:
            raise SerializationError(f"{self.path!r}: member {name!r} is used twice.")
        info = self.members.get(name)
        if info is None:
            raise SerializationError(f"{self.path!r} lacks member {name!r}.")
        if limit is not None and info.file_size > limit:
            raise SerializationError(
                f"{self.path!r}: member {name!r} is {info.file_size} bytes, over {limit}."
            )
        data = self.zip.read(info)
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sums[name]:
            raise SerializationError(
                f"{self.path!r}: {name!r} does not match its SHA-256; the file was changed or "
                "corrupted. Save the module again."
            )
        self.digests[name] = digest
        return data

    def _checksums(self) -> dict[str, str]:
        info = self.members.get(CHECKSUMS)
        if info is None:
            raise SerializationError(
                f"{self.path!r} has no {CHECKSUMS}, which every file torchrefit writes holds: "
                "it cannot be checked. Save the module again."
            )
        if info.file_size > MAX_CHECKSUMS_BYTES:
            raise SerializationError(f"{self.path!r}: {CHECKSUMS!r} is malformed.")
        sums = json.loads(self.zip.read(info))
        if not isinstance(sums, dict) or not all(
            isinstance(v, str) and len(v) == 64 for v in sums.values()
        ):
            raise SerializationError(f"{self.path!r}: {CHECKSUMS!r} is malformed.")
        if set(sums) != self.names():
            unlisted = sorted(self.names() - set(sums))[:3]
            absent = sorted(set(sums) - self.names())[:3]
            raise SerializationError(
                f"{self.path!r}: {CHECKSUMS!r} does not list exactly the file's members "
                f"(unlisted {unlisted}, absent {absent}); the file was changed or corrupted."
            )
        return sums


def _open(path: str) -> BinaryIO:
    try:
        return open_regular(path)
    except (OSError, ValueError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SerializationError(f"{path!r} is not a torchrefit file ({text}).") from exc


def _members(archive: zipfile.ZipFile, path: str, size: int) -> dict[str, zipfile.ZipInfo]:
    """Name -> entry, each name once, stored uncompressed (save never compresses: what is
    read is what the file holds) and no larger than the file."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise SerializationError(f"{path!r} has {len(infos)} members; torchrefit writes fewer.")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.filename in members:
            raise SerializationError(
                f"{path!r} holds member {info.filename!r} twice; the file was changed or "
                "corrupted. Save the module again."
            )
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
            raise SerializationError(
                f"{path!r}: member {info.filename!r} is compressed or larger than the file."
            )
        members[info.filename] = info
    return members
