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
    records appended after a crash are never hidden behind a record no reader trusts.

    A failed write or fsync (a full disk, an I/O error) never raises into the receive loop:
    :meth:`commit` returns False and :attr:`failing` holds the error. Records appended since the
    last good commit stay in memory; the next :meth:`commit` cuts the file back to its last
    durable size and writes them again, so after a failed fsync nothing is trusted that the
    kernel may have dropped (a later fsync does not vouch for pages an earlier one failed on)."""

    truncated_bytes = 0

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE_NAME
        is_new = not self.path.exists() or self.path.stat().st_size == 0
        if not is_new:
            self.truncated_bytes = _cut_torn_tail(self.path)
        self._file: BinaryIO = open(self.path, "ab")
        if is_new:
            self._file.write(MAGIC)
            self._file.flush()
            os.fsync(self._file.fileno())
        self._durable_size = self.path.stat().st_size
        self._uncommitted: list[bytes] = []
        self._needs_rewrite = False
        self.failing: str = ""
        """The last write or fsync error while it lasts ("" when the log is healthy)."""
        self.failures = 0
        """Commits that failed so far."""
        self.bytes_written = self._durable_size

    def append(self, payload: bytes) -> None:
        """Buffer one record; it is durable only after :meth:`commit` returns True."""
        self._uncommitted.append(payload)
        self.bytes_written += _HEADER.size + len(payload)
        if self._needs_rewrite:
            return  # the next commit writes every uncommitted record again
        try:
            self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        except OSError as exc:
            self._fail(exc)

    def commit(self) -> bool:
        """Flush and fsync everything appended so far (group commit). True when every appended
        record is durable; False after a write or fsync error (they stay pending, see the class)."""
        if not self._uncommitted:
            return not self._needs_rewrite
        try:
            if self._needs_rewrite:
                self._rewrite_uncommitted()
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            self._fail(exc)
            return False
        self._durable_size = self._file.tell()
        self._uncommitted.clear()
        self._needs_rewrite, self.failing = False, ""
        return True

    @property
    def pending_records(self) -> int:
        """Records appended and not yet durable."""
        return len(self._uncommitted)

    def close(self) -> None:
        """Commit (as far as the disk allows) and close."""
        if not self._file.closed:
            self.commit()
            try:
                self._file.close()
            except OSError:
                pass  # its buffer could not be written: those records were never acknowledged

    def _fail(self, exc: OSError) -> None:
        self.failing = f"{type(exc).__name__}: {exc}"
        self.failures += 1
        self._needs_rewrite = True

    def _rewrite_uncommitted(self) -> None:
        """Reopen at the last durable size and write every pending record again."""
        try:
            self._file.close()
        except OSError:
            pass  # its unwritten buffer is dropped: the records are written again below
        with open(self.path, "r+b") as file:
            file.truncate(self._durable_size)
        self._file = open(self.path, "ab")
        for payload in self._uncommitted:
            self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)


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
