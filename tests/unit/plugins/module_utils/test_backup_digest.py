# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of backup_digest: per-chunk SHA-256 of image files, and where a file differs from its record."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils import backup_digest
from ansible_collections.qemu.qmp.plugins.module_utils.backup_digest import digest_mismatches, file_digest

CHUNK = 4096
MIB = 1024 * 1024


def _data(size, seed=0):
    return random.Random(seed).randbytes(size)


def _write(tmp_path, data, name="disk0.qcow2"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _expected(data, chunk_size):
    return [hashlib.sha256(data[start:start + chunk_size]).hexdigest() for start in range(0, len(data), chunk_size)]


def _progress():
    calls = []
    return calls, calls.append


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 7 * CHUNK + 123, 40 * CHUNK + 1])
def test_file_digest_is_sha256_of_each_chunk(tmp_path, size):
    data = _data(size, seed=size)
    calls, progress = _progress()
    digest = file_digest(_write(tmp_path, data), chunk_size=CHUNK, progress=progress)
    assert digest == {"algorithm": "sha256", "chunk_size": CHUNK, "size": size, "chunks": _expected(data, CHUNK)}
    assert len(digest["chunks"]) == -(-size // CHUNK)
    # progress: once per chunk, increasing, ending at the size
    assert len(calls) == len(digest["chunks"])
    assert calls == sorted(calls) and len(set(calls)) == len(calls)
    assert calls[-1] == size
    assert all(0 < c <= size for c in calls)


def test_file_digest_of_an_empty_file(tmp_path):
    calls, progress = _progress()
    assert file_digest(_write(tmp_path, b""), chunk_size=CHUNK, progress=progress) == {
        "algorithm": "sha256", "chunk_size": CHUNK, "size": 0, "chunks": []}
    assert calls == []  # nothing to report


def test_file_digest_keeps_chunks_in_file_order(tmp_path):
    # Chunks of equal content must give equal digests at their own index, whatever order the threads finish in.
    blocks = [bytes([i % 5]) * CHUNK for i in range(23)]
    digest = file_digest(_write(tmp_path, b"".join(blocks)), chunk_size=CHUNK)
    assert digest["chunks"] == [hashlib.sha256(b).hexdigest() for b in blocks]
    assert digest["chunks"][0] == digest["chunks"][5] != digest["chunks"][1]


def test_file_digest_reads_a_chunk_larger_than_one_read(tmp_path):
    # 8 MiB chunks are read 4 MiB at a time: the first chunk takes two reads, the second is short.
    assert backup_digest._READ_SIZE == 4 * MIB
    chunk = 8 * MIB
    data = _data(9 * MIB + 12345, seed=9)
    calls, progress = _progress()
    digest = file_digest(_write(tmp_path, data), chunk_size=chunk, progress=progress)
    assert digest["size"] == len(data)
    assert digest["chunk_size"] == chunk
    assert digest["chunks"] == [hashlib.sha256(data[:chunk]).hexdigest(), hashlib.sha256(data[chunk:]).hexdigest()]
    assert calls[-1] == len(data) and calls == sorted(calls) and len(calls) == 2


def test_file_digest_default_chunk_size(tmp_path):
    data = _data(1000)
    digest = file_digest(_write(tmp_path, data))
    assert digest["chunk_size"] == backup_digest.CHUNK_SIZE == 64 * MIB
    assert digest["chunks"] == [hashlib.sha256(data).hexdigest()]


def test_file_digest_of_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        file_digest(str(tmp_path / "nope.qcow2"), chunk_size=CHUNK)


def test_progress_exception_propagates(tmp_path):
    # The progress callback is how a run is told to stop (Reporter.check raises): it must get through.
    path = _write(tmp_path, _data(10 * CHUNK))

    class Stop(Exception):
        pass

    def progress(done):
        raise Stop(done)

    with pytest.raises(Stop):
        file_digest(path, chunk_size=CHUNK, progress=progress)


# -- digest_mismatches --------------------------------------------------------

SIZE = 10 * CHUNK + 100  # 11 chunks, the last one short


@pytest.fixture(name="image")
def fixture_image(tmp_path):
    """(path, data, recorded digest) of an image of SIZE bytes."""
    data = _data(SIZE, seed=1)
    path = _write(tmp_path, data)
    return path, data, file_digest(path, chunk_size=CHUNK)


def test_identical_file_has_no_mismatches(image):
    path, dummy, recorded = image
    calls, progress = _progress()
    assert digest_mismatches(path, recorded, progress) == []
    assert calls[-1] == SIZE


@pytest.mark.parametrize("offset", [0, 1, CHUNK - 1, CHUNK, 5 * CHUNK + 17, 10 * CHUNK, SIZE - 1])
def test_one_flipped_byte_names_its_chunk(image, offset):
    path, data, recorded = image
    damaged = bytearray(data)
    damaged[offset] ^= 0x01
    with open(path, "wb") as handle:
        handle.write(damaged)
    index = offset // CHUNK
    assert digest_mismatches(path, recorded) == [
        (index * CHUNK, min(SIZE, (index + 1) * CHUNK), "its checksum differs from the manifest's")]


def test_two_damaged_chunks_are_both_named(image):
    path, data, recorded = image
    damaged = bytearray(data)
    damaged[2 * CHUNK + 5] ^= 0xFF
    damaged[9 * CHUNK] ^= 0xFF
    with open(path, "wb") as handle:
        handle.write(damaged)
    assert [(s, e) for s, e, dummy in digest_mismatches(path, recorded)] == [
        (2 * CHUNK, 3 * CHUNK), (9 * CHUNK, 10 * CHUNK)]


def test_truncated_file(image):
    path, dummy, recorded = image
    os.truncate(path, SIZE - 1000)
    assert digest_mismatches(path, recorded) == [
        (SIZE - 1000, SIZE, "the file is %d bytes, the manifest says %d (truncated)" % (SIZE - 1000, SIZE))]


def test_truncated_to_nothing(image):
    path, dummy, recorded = image
    os.truncate(path, 0)
    ((start, end, what),) = digest_mismatches(path, recorded)
    assert (start, end) == (0, SIZE)
    assert "truncated" in what


def test_grown_file(image):
    path, dummy, recorded = image
    with open(path, "ab") as handle:
        handle.write(b"more")
    assert digest_mismatches(path, recorded) == [
        (SIZE, SIZE + 4, "the file is %d bytes, the manifest says %d (grown)" % (SIZE + 4, SIZE))]


def test_missing_file_raises_oserror(image, tmp_path):
    dummy, dummy, recorded = image
    with pytest.raises(OSError):
        digest_mismatches(str(tmp_path / "gone.qcow2"), recorded)


def test_recorded_chunk_size_is_used(image):
    path, data, dummy = image
    recorded = file_digest(path, chunk_size=3 * CHUNK)
    assert digest_mismatches(path, recorded) == []
    damaged = bytearray(data)
    damaged[4 * CHUNK] ^= 1
    with open(path, "wb") as handle:
        handle.write(damaged)
    assert [(s, e) for s, e, dummy in digest_mismatches(path, recorded)] == [(3 * CHUNK, 6 * CHUNK)]


def test_recorded_chunk_list_of_the_wrong_length(image):
    path, dummy, recorded = image
    short = dict(recorded, chunks=recorded["chunks"][:-1])
    assert digest_mismatches(path, short) == [(0, SIZE, "the manifest records 10 chunks, the file has 11")]
