# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of nbd_client against a fake NBD server (fake_nbd.py) on a unix socket."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils import nbd_client as nbd
from ansible_collections.qemu.qmp.plugins.module_utils.nbd_client import (
    STATE_DIRTY,
    STATE_ZERO,
    NBDClient,
    NBDError,
    copy_extents,
)
from ansible_collections.qemu.qmp.tests.unit.plugins.module_utils.fake_nbd import (
    REP_ERR_POLICY,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    FakeNBDServer,
)

KIB = 1024
BITMAP = "qemu:dirty-bitmap:backup-frozen"
ALLOCATION = "base:allocation"
STATE_HOLE = 1  # base:allocation's other flag (the same bit as STATE_DIRTY)


def _data(size, seed=1):
    return bytearray(random.Random(seed).randbytes(size))


def _offsets(extents):
    """(offset, length, flags) of (length, flags) extents laid end to end."""
    result, offset = [], 0
    for length, flags in extents:
        result.append((offset, length, flags))
        offset += length
    return result


def _cumulative(lengths):
    total, result = 0, []
    for length in lengths:
        total += length
        result.append(total)
    return result


@pytest.fixture(autouse=True)
def fixture_no_hang():
    """A broken client or server fails its test (socket.timeout) rather than hanging the run."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    yield
    socket.setdefaulttimeout(previous)


@pytest.fixture(name="nbd_serve")
def fixture_nbd_serve(sock_dir):
    """nbd_serve(name="src", **kwargs) starts a FakeNBDServer on <sock_dir>/<name>.sock; stopped after the test."""
    servers = []

    def start(name="src", **kwargs):
        server = FakeNBDServer(os.path.join(sock_dir, name + ".sock"), **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(name="connect")
def fixture_connect():
    """connect(server, export="disk0", meta_context=None): an NBDClient, closed (quietly) after the test."""
    clients = []

    def connect(server, export="disk0", meta_context=None):
        client = NBDClient(server.path, export, meta_context)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        try:
            client.close()
        except OSError:
            pass


def _reply_header(handle, kind, length, flags=0):
    return struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, flags, kind, handle, length)


# -- handshake ------------------------------------------------------------------


@pytest.mark.parametrize("server_flags", [nbd.FLAG_FIXED_NEWSTYLE, nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES])
def test_handshake_gives_the_size(nbd_serve, connect, server_flags):
    server = nbd_serve(size=3 * 65536 + 512, handshake_flags=server_flags)
    client = connect(server, "disk0")
    assert client.size == 3 * 65536 + 512
    assert client.context_id is None
    assert server.options == [nbd.OPT_STRUCTURED_REPLY, nbd.OPT_GO]
    assert server.exports == ["disk0"]
    # Fixed newstyle always; no zeroes only when the server offers it.
    assert server.client_flags == server_flags


def test_handshake_with_a_meta_context(nbd_serve, connect):
    server = nbd_serve(size=1 << 20, contexts={ALLOCATION: 1, BITMAP: 9})
    client = connect(server, "drive-virtio0", BITMAP)
    assert client.size == 1 << 20
    assert client.context_id == 9
    assert server.options == [nbd.OPT_STRUCTURED_REPLY, nbd.OPT_SET_META_CONTEXT, nbd.OPT_GO]
    assert server.queries == [BITMAP]
    assert server.exports == ["drive-virtio0"]


def test_close_disconnects(nbd_serve, connect):
    server = nbd_serve(size=4096)
    client = connect(server)
    client.close()
    assert server.disconnected.wait(5)
    assert server.requests == [(nbd.CMD_DISC, 0, 0, 0)]
    assert client.sock.fileno() == -1


# -- block status ---------------------------------------------------------------

EXTENTS = [(64 * KIB, 0), (32 * KIB, STATE_DIRTY), (96 * KIB, 0), (160 * KIB, STATE_DIRTY),
           (4 * KIB, 0), (4 * KIB, STATE_DIRTY), (152 * KIB, 0)]
SIZE = sum(length for length, flags in EXTENTS)


def test_extents_in_order(nbd_serve, connect):
    server = nbd_serve(size=SIZE, extents=EXTENTS, contexts={BITMAP: 3})
    client = connect(server, meta_context=BITMAP)
    assert list(client.extents()) == _offsets(EXTENTS)
    assert server.requests_of(nbd.CMD_BLOCK_STATUS) == [(nbd.CMD_BLOCK_STATUS, 0, 0, SIZE)]


@pytest.mark.parametrize("per_reply", [1, 2, 3])
def test_extents_are_asked_again_for_what_a_reply_left_out(nbd_serve, connect, per_reply):
    server = nbd_serve(size=SIZE, extents=EXTENTS, contexts={BITMAP: 3}, max_descriptors=per_reply)
    client = connect(server, meta_context=BITMAP)
    assert list(client.extents()) == _offsets(EXTENTS)
    # Each request starts where the last reply ended, and asks for the rest of the export.
    starts = [offset for offset, length, flags in _offsets(EXTENTS)][::per_reply]
    expected = [(nbd.CMD_BLOCK_STATUS, 0, start, SIZE - start) for start in starts]
    assert server.requests_of(nbd.CMD_BLOCK_STATUS) == expected


def test_extents_of_a_big_export_are_asked_in_windows(nbd_serve, connect):
    gib = 1 << 30
    server = nbd_serve(size=5 * gib, extents=[(3 * gib, 0), (2 * gib, STATE_DIRTY)], contexts={BITMAP: 3})
    client = connect(server, meta_context=BITMAP)
    assert list(client.extents()) == [(0, 2 * gib, 0), (2 * gib, gib, 0), (3 * gib, gib, STATE_DIRTY),
                                      (4 * gib, gib, STATE_DIRTY)]
    # The length of a request is 32 bits: never more than 2 GiB at a time.
    assert [(offset, length) for dummy, dummy, offset, length in server.requests_of(nbd.CMD_BLOCK_STATUS)] == [
        (0, 2 * gib), (2 * gib, 2 * gib), (4 * gib, gib)]


def test_extents_of_an_empty_export(nbd_serve, connect):
    server = nbd_serve(size=0, extents=[], contexts={BITMAP: 3})
    client = connect(server, meta_context=BITMAP)
    assert list(client.extents()) == []
    assert server.requests_of(nbd.CMD_BLOCK_STATUS) == []


def test_block_status_without_a_descriptor_raises(nbd_serve, connect):
    def empty(session, handle, offset, length, payload):
        session.chunk(handle, nbd.REPLY_TYPE_BLOCK_STATUS, struct.pack(">I", 3), done=True)

    server = nbd_serve(size=SIZE, contexts={BITMAP: 3}, commands={nbd.CMD_BLOCK_STATUS: empty})
    client = connect(server, meta_context=BITMAP)
    with pytest.raises(NBDError, match="gave no block status at 0"):
        list(client.extents())


# -- read, write, flush -------------------------------------------------------------


def _sparse_data():
    data = _data(256 * KIB)
    data[16 * KIB:48 * KIB] = bytes(32 * KIB)
    data[200 * KIB:256 * KIB] = bytes(56 * KIB)
    return data


@pytest.mark.parametrize("read_chunk, holes, reverse, done_chunk", [
    (None, False, False, False),
    (4 * KIB, False, False, True),
    (4 * KIB, True, False, False),
    (8 * KIB, True, True, True),
    (3000, True, True, False),
])
def test_read_assembles_data_and_holes(nbd_serve, connect, read_chunk, holes, reverse, done_chunk):
    data = _sparse_data()
    server = nbd_serve(data=data, read_chunk=read_chunk, holes=holes, reverse=reverse, done_chunk=done_chunk)
    client = connect(server)
    for offset, length in [(0, 256 * KIB), (12 * KIB, 40 * KIB), (16 * KIB, 32 * KIB), (199 * KIB, 57 * KIB),
                           (5, 7)]:
        assert client.read(offset, length) == bytes(data[offset:offset + length]), (offset, length)
    kinds = set(kind for dummy, kind in server.chunks)
    assert (nbd.REPLY_TYPE_OFFSET_HOLE in kinds) == holes


def test_hole_chunks_read_as_zeros(nbd_serve, connect):
    """The server says the range is a hole: the client must not make up data for it."""
    def hole_then_data(session, handle, offset, length, payload):
        session.chunk(handle, nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + b"\x11" * 1000)
        session.chunk(handle, nbd.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset + 1000, length - 1000), done=True)

    server = nbd_serve(data=bytearray(b"\xff" * 8192), commands={nbd.CMD_READ: hole_then_data})
    client = connect(server)
    assert client.read(4096, 4096) == b"\x11" * 1000 + bytes(3096)
    assert server.requests_of(nbd.CMD_READ) == [(nbd.CMD_READ, 0, 4096, 4096)]


def test_write_and_flush(nbd_serve, connect):
    data = bytearray(64 * KIB)
    server = nbd_serve(data=data)
    client = connect(server)
    client.write(4096, b"\x5a" * 1000)
    client.flush()
    assert bytes(data[4096:5096]) == b"\x5a" * 1000
    assert not any(data[:4096]) and not any(data[5096:])
    assert server.flushes == 1
    assert server.requests == [(nbd.CMD_WRITE, 0, 4096, 1000), (nbd.CMD_FLUSH, 0, 0, 0)]


def test_requests_have_distinct_handles(nbd_serve, connect):
    server = nbd_serve(data=_data(8192))
    client = connect(server)
    for dummy in range(3):
        client.read(0, 512)
    handles = [handle for handle, kind in server.chunks]
    assert len(set(handles)) == 3


# -- copy_extents -----------------------------------------------------------------


def _copy_pair(nbd_serve, connect, extents, context=BITMAP, target_size=None, **source_kwargs):
    size = sum(length for length, flags in extents)
    source_data = _data(size, seed=7)
    target_data = bytearray(b"\xee" * (size if target_size is None else target_size))
    source = nbd_serve("src", data=source_data, extents=extents, contexts={context: 5}, **source_kwargs)
    target = nbd_serve("dst", data=target_data)
    return (source, connect(source, "drive0", context), source_data,
            target, connect(target, ""), target_data)


@pytest.mark.parametrize("per_reply", [None, 1])
def test_copy_extents_copies_the_dirty_extents(nbd_serve, connect, per_reply):
    source, src, source_data, target, dst, target_data = _copy_pair(nbd_serve, connect, EXTENTS,
                                                                    max_descriptors=per_reply)
    progress = []
    copied, count = copy_extents(src, dst, lambda flags: flags & STATE_DIRTY, progress.append)
    dirty = [(offset, length) for offset, length, flags in _offsets(EXTENTS) if flags & STATE_DIRTY]
    assert (copied, count) == (196 * KIB, 3)
    expected = bytearray(b"\xee" * SIZE)
    for offset, length in dirty:
        expected[offset:offset + length] = source_data[offset:offset + length]
    assert target_data == expected
    assert [(o, n) for dummy, dummy, o, n in target.requests_of(nbd.CMD_WRITE)] == dirty
    assert [(o, n) for dummy, dummy, o, n in source.requests_of(nbd.CMD_READ)] == dirty
    assert progress == _cumulative(length for offset, length in dirty)
    assert target.flushes == 1
    assert target.requests[-1][0] == nbd.CMD_FLUSH
    assert source.requests_of(nbd.CMD_WRITE) == []


def test_copy_extents_copies_what_is_not_zero(nbd_serve, connect):
    extents = [(8 * KIB, 0), (8 * KIB, STATE_ZERO), (8 * KIB, STATE_HOLE | STATE_ZERO), (8 * KIB, STATE_HOLE),
               (16 * KIB, 0), (4 * KIB, STATE_ZERO)]
    source, src, source_data, target, dst, target_data = _copy_pair(nbd_serve, connect, extents, ALLOCATION)
    copied, count = copy_extents(src, dst, lambda flags: not flags & STATE_ZERO)
    wanted = [(offset, length) for offset, length, flags in _offsets(extents) if not flags & STATE_ZERO]
    assert wanted == [(0, 8 * KIB), (24 * KIB, 8 * KIB), (32 * KIB, 16 * KIB)]
    assert (copied, count) == (32 * KIB, 3)
    for offset, length, flags in _offsets(extents):
        want = source_data if not flags & STATE_ZERO else b"\xee" * len(source_data)
        assert target_data[offset:offset + length] == want[offset:offset + length], (offset, flags)
    assert src.context_id == 5


def test_copy_extents_splits_big_extents(nbd_serve, connect, monkeypatch):
    monkeypatch.setattr(nbd, "MAX_REQUEST", 16 * KIB)
    extents = [(4 * KIB, 0), (40 * KIB, STATE_DIRTY), (4 * KIB, 0), (16 * KIB, STATE_DIRTY), (8 * KIB, STATE_DIRTY)]
    source, src, source_data, target, dst, target_data = _copy_pair(nbd_serve, connect, extents)
    progress = []
    copied, count = copy_extents(src, dst, lambda flags: flags & STATE_DIRTY, progress.append)
    parts = [(4 * KIB, 16 * KIB), (20 * KIB, 16 * KIB), (36 * KIB, 8 * KIB), (48 * KIB, 16 * KIB),
             (64 * KIB, 8 * KIB)]
    assert (copied, count) == (64 * KIB, 3)
    assert [(o, n) for dummy, dummy, o, n in target.requests_of(nbd.CMD_WRITE)] == parts
    assert [(o, n) for dummy, dummy, o, n in source.requests_of(nbd.CMD_READ)] == parts
    assert progress == _cumulative(length for offset, length in parts)
    assert target_data[4 * KIB:44 * KIB] == source_data[4 * KIB:44 * KIB]
    assert target_data[48 * KIB:] == source_data[48 * KIB:]
    assert target_data[:4 * KIB] == target_data[44 * KIB:48 * KIB] == b"\xee" * (4 * KIB)


def test_copy_extents_with_nothing_wanted(nbd_serve, connect):
    source, src, source_data, target, dst, target_data = _copy_pair(nbd_serve, connect, [(64 * KIB, 0)])
    progress = []
    assert copy_extents(src, dst, lambda flags: flags & STATE_DIRTY, progress.append) == (0, 0)
    assert target_data == b"\xee" * (64 * KIB)
    assert progress == []
    assert target.requests_of(nbd.CMD_WRITE) == []


@pytest.mark.parametrize("target_size", [64 * KIB - 512, 64 * KIB + 512])
def test_copy_extents_refuses_a_target_of_another_size(nbd_serve, connect, target_size):
    source, src, source_data, target, dst, target_data = _copy_pair(
        nbd_serve, connect, [(64 * KIB, STATE_DIRTY)], target_size=target_size)
    with pytest.raises(NBDError) as info:
        copy_extents(src, dst, lambda flags: True)
    assert "%d bytes" % target_size in str(info.value)
    assert "%d bytes" % (64 * KIB) in str(info.value)
    assert source.requests == [] and target.requests == []
    assert target_data == b"\xee" * target_size


def test_copy_extents_stops_when_progress_raises(nbd_serve, connect):
    class Stop(Exception):
        pass

    def progress(done):
        raise Stop()

    source, src, source_data, target, dst, target_data = _copy_pair(nbd_serve, connect, EXTENTS)
    with pytest.raises(Stop):
        copy_extents(src, dst, lambda flags: flags & STATE_DIRTY, progress)
    assert len(target.requests_of(nbd.CMD_WRITE)) == 1
    assert target.flushes == 0


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("option, error, message, meta", [
    (nbd.OPT_GO, REP_ERR_UNKNOWN, "export 'disk0' not present", None),
    (nbd.OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, "structured replies are disabled", None),
    (nbd.OPT_SET_META_CONTEXT, REP_ERR_POLICY, "no metadata contexts for you", BITMAP),
])
def test_a_refused_option_raises(nbd_serve, connect, option, error, message, meta):
    server = nbd_serve(size=4096, contexts={BITMAP: 3}, refuse={option: (error, message)})
    with pytest.raises(NBDError) as info:
        connect(server, meta_context=meta)
    assert "refused option %d" % option in str(info.value)
    assert message in str(info.value)


def test_a_missing_meta_context_raises(nbd_serve, connect):
    server = nbd_serve(size=4096, contexts={ALLOCATION: 1})
    with pytest.raises(NBDError, match="export disk0 has no metadata context qemu:dirty-bitmap:backup-frozen"):
        connect(server, meta_context=BITMAP)
    assert nbd.OPT_GO not in server.options


def test_a_server_not_fixed_newstyle_raises(nbd_serve, connect):
    server = nbd_serve(size=4096, handshake_flags=0)
    with pytest.raises(NBDError, match="not a fixed-newstyle NBD server"):
        connect(server)


def test_a_server_without_the_export_size_raises(nbd_serve, connect):
    server = nbd_serve(size=4096, send_info=False)
    with pytest.raises(NBDError, match="did not give the export's size"):
        connect(server)


def test_an_error_chunk_on_a_read_raises_and_the_connection_goes_on(nbd_serve, connect):
    def failing(session, handle, offset, length, payload):
        session.error_chunk(handle, 5, "Input/output error reading block 17")

    data = bytearray(64 * KIB)
    server = nbd_serve(data=data, commands={nbd.CMD_READ: failing})
    client = connect(server)
    with pytest.raises(NBDError) as info:
        client.read(0, 4096)
    assert str(info.value) == "NBD error 5: Input/output error reading block 17"
    # The error chunk ended the reply: the next request gets its own answer.
    client.write(0, b"ok")
    assert data[:2] == b"ok"


def test_an_error_chunk_after_data_raises(nbd_serve, connect):
    def half(session, handle, offset, length, payload):
        session.chunk(handle, nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + bytes(512))
        session.error_chunk(handle, 28, "No space left on device")

    server = nbd_serve(data=bytearray(4096), commands={nbd.CMD_READ: half})
    client = connect(server)
    with pytest.raises(NBDError, match="NBD error 28: No space left on device"):
        client.read(0, 4096)


def test_an_error_chunk_on_block_status_raises(nbd_serve, connect):
    def failing(session, handle, offset, length, payload):
        session.error_chunk(handle, 22, "bitmap is busy")

    server = nbd_serve(size=4096, contexts={BITMAP: 3}, commands={nbd.CMD_BLOCK_STATUS: failing})
    client = connect(server, meta_context=BITMAP)
    with pytest.raises(NBDError, match="NBD error 22: bitmap is busy"):
        list(client.extents())


@pytest.mark.parametrize("command", [nbd.CMD_WRITE, nbd.CMD_FLUSH])
def test_a_simple_error_reply_raises(nbd_serve, connect, command):
    def failing(session, handle, offset, length, payload):
        session.simple(handle, 1)  # EPERM: a read-only export

    server = nbd_serve(data=bytearray(4096), commands={command: failing})
    client = connect(server)
    with pytest.raises(NBDError, match="NBD error 1"):
        if command == nbd.CMD_WRITE:
            client.write(0, b"x")
        else:
            client.flush()


def test_a_bad_reply_magic_raises(nbd_serve, connect):
    def garbage(session, handle, offset, length, payload):
        session.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    server = nbd_serve(data=bytearray(4096), commands={nbd.CMD_READ: garbage})
    client = connect(server)
    with pytest.raises(NBDError, match="bad reply magic"):
        client.read(0, 512)


def test_a_reply_to_another_request_raises(nbd_serve, connect):
    def other(session, handle, offset, length, payload):
        session.chunk(handle + 100, nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + bytes(length), done=True)

    server = nbd_serve(data=bytearray(4096), commands={nbd.CMD_READ: other})
    client = connect(server)
    with pytest.raises(NBDError, match="reply to another request"):
        client.read(0, 512)


# -- the server goes away -----------------------------------------------------------------


def test_a_server_that_closes_during_the_handshake(nbd_serve, connect):
    def greet_and_go(session):
        session.send(nbd.NBD_MAGIC + struct.pack(">Q", nbd.OPTS_MAGIC))  # the flags never come
        session.close()

    server = nbd_serve(size=4096, greeting=greet_and_go)
    with pytest.raises(NBDError, match="closed the connection"):
        connect(server)


def test_a_server_that_closes_after_an_option(nbd_serve, connect):
    def refuse_and_go(session):
        session.send(nbd.NBD_MAGIC + struct.pack(">QH", nbd.OPTS_MAGIC, nbd.FLAG_FIXED_NEWSTYLE))
        session.recv(4 + 16)
        session.close()

    server = nbd_serve(size=4096, greeting=refuse_and_go)
    with pytest.raises(NBDError, match="closed the connection"):
        connect(server)


def _half_read(session, handle, offset, length, payload):
    session.send(_reply_header(handle, nbd.REPLY_TYPE_OFFSET_DATA, 8 + length, nbd.REPLY_FLAG_DONE)
                 + struct.pack(">Q", offset) + bytes(100))
    session.close()


def test_a_server_that_closes_mid_reply_raises(nbd_serve, connect):
    server = nbd_serve(data=bytearray(8192), commands={nbd.CMD_READ: _half_read})
    client = connect(server)
    with pytest.raises(NBDError, match="the NBD server closed the connection"):
        client.read(0, 4096)


def test_a_server_that_closes_mid_header_raises(nbd_serve, connect):
    def half_header(session, handle, offset, length, payload):
        session.send(_reply_header(handle, nbd.REPLY_TYPE_BLOCK_STATUS, 12)[:10])
        session.close()

    server = nbd_serve(size=8192, contexts={BITMAP: 3}, commands={nbd.CMD_BLOCK_STATUS: half_header})
    client = connect(server, meta_context=BITMAP)
    with pytest.raises(NBDError, match="the NBD server closed the connection"):
        list(client.extents())


def test_copy_extents_raises_when_the_source_goes_away(nbd_serve, connect):
    source, src, source_data, target, dst, target_data = _copy_pair(
        nbd_serve, connect, EXTENTS, commands={nbd.CMD_READ: _half_read})
    with pytest.raises(NBDError, match="closed the connection"):
        copy_extents(src, dst, lambda flags: flags & STATE_DIRTY)
    assert target.requests_of(nbd.CMD_WRITE) == []
    assert target.flushes == 0


# -- bugs ------------------------------------------------------------------------------------


def test_an_error_offset_chunk_gives_a_clean_message(nbd_serve, connect):
    def failing(session, handle, offset, length, payload):
        session.error_chunk(handle, 5, "bad sector", offset=offset + 512)

    server = nbd_serve(data=bytearray(8192), commands={nbd.CMD_READ: failing})
    client = connect(server)
    with pytest.raises(NBDError) as info:
        client.read(4096, 4096)
    text = str(info.value)
    assert "NBD error 5: bad sector" in text
    assert not any(ord(c) < 32 for c in text), repr(text)


def test_a_failed_handshake_hangs_up(nbd_serve, connect):
    server = nbd_serve(size=4096, refuse={nbd.OPT_GO: (REP_ERR_UNKNOWN, "no such export")})
    with pytest.raises(NBDError) as info:
        connect(server, "nope")
    assert info.value is not None  # the exception is still around, as in a caller's error handling
    assert server.wait_hung_up(0.5), "the client did not close its connection"


def test_close_after_the_server_hung_up(nbd_serve, connect):
    server = nbd_serve(data=bytearray(8192), commands={nbd.CMD_READ: _half_read})
    client = connect(server)
    with pytest.raises(NBDError):
        client.read(0, 4096)
    client.close()
    assert client.sock.fileno() == -1
