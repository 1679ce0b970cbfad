"""The event log: every accepted frame, appended with a checksum, fsynced before it is acknowledged.

Record layout (little-endian)::

    u32 length of payload | u32 crc32 of payload | payload (one wire frame, msgpack)

The file starts with the 8-byte magic ``RLMONEV1``. A reader stops at the first record whose length
runs past the end or whose checksum does not match (a torn tail after a crash) and reports how many
bytes it skipped; it never trusts such a record.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

MAGIC = b"RLMONEV1"
_HEADER = struct.Struct("<II")
FILE_NAME = "events.rlog"


class EventLog:
    """Append-only writer. Not thread-safe: owned by the collector's receive loop.

    Reopening an existing log first cuts off a torn or corrupt tail (``truncated_bytes``), so
    records appended after a crash are never hidden behind a record no reader trusts."""

    truncated_bytes = 0

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE_NAME
        is_new = not self.path.exists() or self.path.stat().st_size == 0
        if not is_new:
            self.truncated_bytes = _cut_torn_tail(self.path)
        self._file: BinaryIO = open(self.path, "ab")
        if is_new:
            self._file.write(MAGIC)
        self._unsynced = 0
        self.bytes_written = self.path.stat().st_size if not is_new else len(MAGIC)

    def append(self, payload: bytes) -> None:
        """Buffer one record; it is durable only after :meth:`commit`."""
        self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)))
        self._file.write(payload)
        self._unsynced += 1
        self.bytes_written += _HEADER.size + len(payload)

    def commit(self) -> bool:
        """Flush and fsync everything appended so far (group commit). True if there was any."""
        if not self._unsynced:
            return False
        self._file.flush()
        os.fsync(self._file.fileno())
        self._unsynced = 0
        return True

    def close(self) -> None:
        """Commit and close."""
        if not self._file.closed:
            self.commit()
            self._file.close()


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Outcome of reading a log: records yielded and bytes skipped at a torn or corrupt tail."""

    records: int
    skipped_bytes: int


def read_records(path: Path, result: list[ReadResult] | None = None) -> Iterator[bytes]:
    """Yield every intact record's payload in order; append a :class:`ReadResult` to ``result``."""
    with open(path, "rb") as file:
        data = file.read()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not an rlmon event log")
    offset, count = len(MAGIC), 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        yield data[start:end]
        offset, count = end, count + 1
    if result is not None:
        result.append(ReadResult(count, len(data) - offset))


def _cut_torn_tail(path: Path) -> int:
    """Truncate ``path`` after its last intact record; return how many bytes were cut."""
    results: list[ReadResult] = []
    for _ in read_records(path, results):
        pass
    skipped = results[0].skipped_bytes if results else 0
    if skipped:
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size - skipped)
    return skipped
