# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Checksums of backup image files, one SHA-256 per chunk.

A digest per chunk (64 MiB by default) lets a mismatch name where the
damage is, and lets both cores hash at once: hashlib releases the GIL, so
two threads over different chunks read and hash in parallel.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os

CHUNK_SIZE = 64 * 1024 * 1024
_READ_SIZE = 4 * 1024 * 1024


def _workers():
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _chunk_digest(fd, start, length):
    digest = hashlib.sha256()
    offset, end = start, start + length
    while offset < end:
        data = os.pread(fd, min(_READ_SIZE, end - offset), offset)
        if not data:
            break  # the file shrank while it was read: the digest will not match
        digest.update(data)
        offset += len(data)
    return digest.hexdigest()


def _chunks(fd, size, chunk_size, progress):
    """The digest of each chunk, in order; `progress(bytes done)` after each one."""
    starts = list(range(0, size, chunk_size))
    digests = [None] * len(starts)
    done = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=_workers()) as pool:
        futures = dict((pool.submit(_chunk_digest, fd, start, min(chunk_size, size - start)), index)
                       for index, start in enumerate(starts))
        try:
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                digests[index] = future.result()
                done += min(chunk_size, size - starts[index])
                if progress is not None:
                    progress(done)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return digests


def file_digest(path, chunk_size=CHUNK_SIZE, progress=None):
    """{algorithm, chunk_size, size, chunks} of the file at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        chunks = _chunks(fd, size, chunk_size, progress)
    finally:
        os.close(fd)
    return {"algorithm": "sha256", "chunk_size": chunk_size, "size": size, "chunks": chunks}


def digest_mismatches(path, recorded, progress=None):
    """Where the file at `path` differs from its recorded digest: a list of
    (file start, file end, what), empty when it matches. Raises OSError when the
    file cannot be read."""
    size = os.stat(path).st_size
    if size != recorded["size"]:
        return [(min(size, recorded["size"]), max(size, recorded["size"]),
                 "the file is %d bytes, the manifest says %d (%s)"
                 % (size, recorded["size"], "truncated" if size < recorded["size"] else "grown"))]
    actual = file_digest(path, recorded["chunk_size"], progress)["chunks"]
    chunk = recorded["chunk_size"]
    return [(index * chunk, min(size, (index + 1) * chunk), "its checksum differs from the manifest's")
            for index, (want, got) in enumerate(zip(recorded["chunks"], actual)) if want != got] + \
        ([(0, size, "the manifest records %d chunks, the file has %d" % (len(recorded["chunks"]), len(actual)))]
         if len(actual) != len(recorded["chunks"]) else [])
