# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A minimal NBD client, standard library only: what a pull-mode backup needs.

It reads QEMU's point-in-time view of a disk (with a metadata context: a dirty
bitmap, `qemu:dirty-bitmap:NAME`, or `base:allocation`) and writes into a
qcow2 image that qemu-nbd serves, at the same offsets.
"""

from __future__ import annotations

import socket
import struct

NBD_MAGIC = b"NBDMAGIC"
OPTS_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
REP_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
INFO_EXPORT = 0
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_BLOCK_STATUS = 7
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
# Flags of block status: a dirty bitmap's context, and base:allocation's.
STATE_DIRTY = 1
STATE_ZERO = 2
MAX_REQUEST = 32 * 1024 * 1024


class NBDError(Exception):
    """The NBD peer refused something or broke the protocol."""


class NBDClient:
    """A minimal NBD client: newstyle handshake, structured replies, read, write, block status."""

    def __init__(self, path, export, meta_context=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.handle = 0
        self.context_id = None
        try:
            self.size = self._handshake(export, meta_context)
        except BaseException:
            self.sock.close()  # a refused handshake leaves no connection behind
            raise

    def _recv(self, length):
        data = bytearray()
        while len(data) < length:
            chunk = self.sock.recv(length - len(data))
            if not chunk:
                raise NBDError("the NBD server closed the connection")
            data += chunk
        return bytes(data)

    def _option(self, option, data=b""):
        self.sock.sendall(struct.pack(">QII", OPTS_MAGIC, option, len(data)) + data)

    def _option_reply(self):
        magic, option, reply, length = struct.unpack(">QIII", self._recv(20))
        if magic != REP_MAGIC:
            raise NBDError("bad option reply")
        data = self._recv(length)
        if reply & 0x80000000:
            raise NBDError("the NBD server refused option %d: %s" % (option, data.decode(errors="replace")))
        return reply, data

    def _handshake(self, export, meta_context):
        magic, opts, flags = struct.unpack(">8sQH", self._recv(18))
        if magic != NBD_MAGIC or opts != OPTS_MAGIC or not flags & FLAG_FIXED_NEWSTYLE:
            raise NBDError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY)
        if self._option_reply()[0] != REP_ACK:
            raise NBDError("the NBD server does not do structured replies")
        name = export.encode()
        if meta_context:
            query = meta_context.encode()
            self._option(OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name + struct.pack(">I", 1)
                         + struct.pack(">I", len(query)) + query)
            while True:
                reply, data = self._option_reply()
                if reply == REP_ACK:
                    break
                if reply == REP_META_CONTEXT and data[4:].decode() == meta_context:
                    self.context_id = struct.unpack(">I", data[:4])[0]
            if self.context_id is None:
                raise NBDError("export %s has no metadata context %s" % (export, meta_context))
        self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        size = None
        while True:
            reply, data = self._option_reply()
            if reply == REP_ACK:
                break
            if reply == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                size = struct.unpack(">QH", data[2:12])[0]
        if size is None:
            raise NBDError("the NBD server did not give the export's size")
        return size

    def _request(self, command, offset=0, length=0, data=b"", flags=0):
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, self.handle, offset, length) + data)
        return self.handle

    def _replies(self, handle):
        """Yield (type, payload) of each structured chunk (or a simple reply) until done."""
        while True:
            magic = struct.unpack(">I", self._recv(4))[0]
            if magic == SIMPLE_REPLY_MAGIC:
                error, reply_handle = struct.unpack(">IQ", self._recv(12))
                if reply_handle != handle:
                    raise NBDError("reply to another request")
                if error:
                    raise NBDError("NBD error %d" % error)
                yield REPLY_TYPE_NONE, b""
                return
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NBDError("bad reply magic %x" % magic)
            flags, kind, reply_handle, length = struct.unpack(">HHQI", self._recv(16))
            payload = self._recv(length)
            if reply_handle != handle:
                raise NBDError("reply to another request")
            if kind & 0x8000:
                # error (4 bytes), message length (2), message; ERROR_OFFSET adds the offset after it.
                error, size = struct.unpack(">IH", payload[:6])
                raise NBDError("NBD error %d: %s" % (error, payload[6:6 + size].decode(errors="replace")))
            yield kind, payload
            if flags & REPLY_FLAG_DONE:
                return

    def extents(self):
        """(offset, length, flags) of every extent of the metadata context, in order.

        One window of block status is read whole before its extents are
        yielded, so a caller may send other requests in between; memory is
        bounded by one window, whatever the size of the disk.
        """
        offset = 0
        while offset < self.size:
            length = min(self.size - offset, 0x80000000)
            handle = self._request(CMD_BLOCK_STATUS, offset, length)
            window, got = [], 0
            for kind, payload in self._replies(handle):
                if kind != REPLY_TYPE_BLOCK_STATUS:
                    continue
                for index in range(4, len(payload), 8):
                    extent, flags = struct.unpack(">II", payload[index:index + 8])
                    window.append((offset + got, extent, flags))
                    got += extent
            if got == 0:
                raise NBDError("the NBD server gave no block status at %d" % offset)
            yield from window
            offset += got

    def read(self, offset, length):
        data = bytearray(length)
        handle = self._request(CMD_READ, offset, length)
        for kind, payload in self._replies(handle):
            if kind == REPLY_TYPE_OFFSET_DATA:
                where = struct.unpack(">Q", payload[:8])[0] - offset
                data[where:where + len(payload) - 8] = payload[8:]
            # OFFSET_HOLE chunks read as zeros, which the buffer already holds.
        return bytes(data)

    def write(self, offset, data):
        for dummy in self._replies(self._request(CMD_WRITE, offset, len(data), data)):
            pass

    def flush(self):
        for dummy in self._replies(self._request(CMD_FLUSH)):
            pass

    def close(self):
        """Say goodbye and close; a server that already hung up is no error (the first error counts)."""
        try:
            self._request(CMD_DISC)
        except OSError:
            pass
        finally:
            self.sock.close()


def copy_extents(source, target, wanted, progress=None):
    """Copy what `wanted(flags)` selects from source to target, at the same offsets.

    Returns (bytes copied, extents). `progress(bytes copied)` is called after
    each request, so a caller can report and stop a long copy.
    """
    if target.size != source.size:
        raise NBDError("the target (%d bytes) is not as big as the source (%d bytes)" % (target.size, source.size))
    copied = count = 0
    for offset, length, flags in source.extents():
        if not wanted(flags):
            continue
        count += 1
        for part in range(offset, offset + length, MAX_REQUEST):
            size = min(MAX_REQUEST, offset + length - part)
            target.write(part, source.read(part, size))
            copied += size
            if progress is not None:
                progress(copied)
    target.flush()
    return copied, count
