"""The checksummed event log: round trip, torn tails skipped, corruption never trusted."""

from __future__ import annotations

import pytest

from collector.eventlog import FILE_NAME, EventLog, ReadResult, read_records


def _write(directory, payloads):
    log = EventLog(directory)
    for payload in payloads:
        log.append(payload)
    log.commit()
    log.close()
    return directory / FILE_NAME


def test_round_trip(tmp_path):
    """Records come back in order, byte for byte."""
    payloads = [b"a", b"", b"x" * 100_000, bytes(range(256))]
    result: list[ReadResult] = []
    assert list(read_records(_write(tmp_path, payloads), result)) == payloads
    assert result == [ReadResult(4, 0)]


def test_reopening_appends(tmp_path):
    """A second writer on the same directory appends after the first's records."""
    _write(tmp_path, [b"one"])
    path = _write(tmp_path, [b"two"])
    assert list(read_records(path)) == [b"one", b"two"]


@pytest.mark.parametrize("cut", [1, 4, 8, 9, 12])
def test_torn_tail_is_skipped(tmp_path, cut):
    """A record cut short by a crash is detected and skipped; earlier ones survive."""
    path = _write(tmp_path, [b"first", b"second-record"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    result: list[ReadResult] = []
    assert list(read_records(path, result)) == [b"first"]
    assert result[0].skipped_bytes > 0


def test_corrupt_record_stops_the_read(tmp_path):
    """A flipped byte fails the checksum: that record and everything after it are not trusted."""
    path = _write(tmp_path, [b"good", b"bad!", b"after"])
    data = bytearray(path.read_bytes())
    index = data.index(b"bad!")
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))
    assert list(read_records(path)) == [b"good"]


def test_not_a_log_is_an_error(tmp_path):
    """A file without the magic header is refused."""
    path = tmp_path / FILE_NAME
    path.write_bytes(b"hello world")
    with pytest.raises(ValueError):
        list(read_records(path))


def test_reopening_cuts_a_torn_tail_so_new_records_are_readable(tmp_path):
    """A writer reopened after a crash mid-record truncates the torn tail before appending."""
    path = _write(tmp_path, [b"first", b"second-record"])
    path.write_bytes(path.read_bytes()[:-4])
    log = EventLog(tmp_path)
    assert log.truncated_bytes > 0
    log.append(b"after-restart")
    log.close()
    assert list(read_records(path)) == [b"first", b"after-restart"]


def test_a_full_disk_fails_commits_and_recovers_without_loss(tmp_path):
    """On a real 256 KiB tmpfs: records past the free space make commit() return False (never
    raise); once space returns, the pending records are written again and the log holds every
    record exactly once, none torn."""
    from tests.components import small_tmpfs

    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * 150_000)
        log = EventLog(disk)
        payloads = [bytes([i % 256]) * 1000 for i in range(200)]
        results = []
        for payload in payloads:
            log.append(payload)
            results.append(log.commit())
        assert False in results and log.failing and log.pending_records > 0
        filler.unlink()
        assert log.commit() and not log.failing and log.pending_records == 0
        log.close()
        read: list[ReadResult] = []
        assert list(read_records(disk / FILE_NAME, read)) == payloads
        assert read[0].skipped_bytes == 0
