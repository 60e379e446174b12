# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small fake NBD server for unit tests of nbd_client.

A real unix socket server in a background thread, one client at a time,
backed by a bytearray. It speaks what nbd_client uses of the protocol
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md): the
fixed newstyle handshake, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT,
NBD_OPT_GO (with NBD_INFO_EXPORT), then NBD_CMD_READ (structured OFFSET_DATA
and OFFSET_HOLE chunks), NBD_CMD_WRITE and NBD_CMD_FLUSH (simple replies),
NBD_CMD_BLOCK_STATUS (one BLOCK_STATUS chunk built from an extent list) and
NBD_CMD_DISC.

The wire constants come from nbd_client itself, except the few it does not
define (error reply types), which are spelled out here from the protocol.

Knobs (constructor arguments):

* `data`: the export's bytes (a bytearray, kept by reference: tests read it
  after writes); or only `size`, for an export that is never read.
* `extents`: (length, flags) covering the export, for block status.
* `contexts`: {meta context name: context id} the server knows.
* `max_descriptors`: answer block status with at most this many descriptors
  (so the client has to ask again for the rest: windowing).
* `read_chunk`, `holes`, `reverse`, `done_chunk`: how reads are answered:
  pieces of `read_chunk` bytes, all-zero pieces as OFFSET_HOLE when `holes`,
  in reverse order when `reverse`, DONE on the last piece or, with
  `done_chunk`, on a separate NONE chunk.
* `refuse`: {option: (error reply type, message)} options answered with an
  error.
* `handshake_flags`: the server's handshake flags.
* `send_info`: whether NBD_OPT_GO is answered with NBD_INFO_EXPORT (the size).
* `commands`: {command: handler(session, handle, offset, length, payload)}
  replacing the normal answer (to send errors or break the protocol).
* `greeting`: a callable(session) replacing the whole handshake.

What the server saw is kept: `client_flags`, `options` (numbers),
`exports` (names given to NBD_OPT_GO), `queries` (meta context names asked
for), `requests` ((command, flags, offset, length)), `chunks` ((handle,
type) of the structured chunks sent), `flushes`; `disconnected` is set on
NBD_CMD_DISC, `hung_up` when the client closed its end. A handler's
exception is re-raised by stop().
"""

from __future__ import annotations

import socket
import struct
import threading

from ansible_collections.qemu.qmp.plugins.module_utils import nbd_client as nbd

# Not in nbd_client (it only reads their high bit).
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_UNKNOWN = 0x80000006
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002
TRANSMISSION_FLAGS = 0x0001 | 0x0004 | 0x0008  # HAS_FLAGS, SEND_FLUSH, SEND_FUA


class Session:
    """One client connection."""

    def __init__(self, server, conn):
        self.server = server
        self.conn = conn
        self.closed = False

    def send(self, data):
        self.conn.sendall(data)

    def recv(self, length):
        data = bytearray()
        while len(data) < length:
            chunk = self.conn.recv(length - len(data))
            if not chunk:
                raise EOFError("the client closed the connection")
            data += chunk
        return bytes(data)

    def option_reply(self, option, reply, data=b""):
        self.send(struct.pack(">QIII", nbd.REP_MAGIC, option, reply, len(data)) + data)

    def chunk(self, handle, kind, payload=b"", done=False):
        self.server.chunks.append((handle, kind))
        self.send(struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE if done else 0, kind,
                              handle, len(payload)) + payload)

    def error_chunk(self, handle, error, message, offset=None, done=True):
        text = message.encode()
        payload = struct.pack(">IH", error, len(text)) + text
        if offset is None:
            self.chunk(handle, REPLY_TYPE_ERROR, payload, done)
        else:
            self.chunk(handle, REPLY_TYPE_ERROR_OFFSET, payload + struct.pack(">Q", offset), done)

    def simple(self, handle, error=0):
        self.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, error, handle))

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()


class FakeNBDServer:
    def __init__(self, path, data=None, size=None, extents=None, contexts=None, max_descriptors=None,
                 read_chunk=None, holes=False, reverse=False, done_chunk=False, refuse=None,
                 handshake_flags=nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES, send_info=True, commands=None,
                 greeting=None):
        self.path = path
        self.data = data
        self.size = len(data) if size is None else size
        self.extents = list(extents) if extents is not None else [(self.size, 0)]
        self.contexts = dict(contexts or {})
        self.max_descriptors = max_descriptors
        self.read_chunk = read_chunk
        self.holes = holes
        self.reverse = reverse
        self.done_chunk = done_chunk
        self.refuse = dict(refuse or {})
        self.handshake_flags = handshake_flags
        self.send_info = send_info
        self.commands = dict(commands or {})
        self.greeting = greeting

        self.client_flags = None
        self.options = []
        self.exports = []
        self.queries = []
        self.requests = []
        self.chunks = []
        self.flushes = 0
        self.context_id = None
        self.disconnected = threading.Event()
        self.hung_up = threading.Event()
        self.errors = []
        self.session = None
        self._stopping = False

        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, name="fake-nbd", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping = True
        session = self.session
        if session is not None:
            session.close()
        self._thread.join(10)
        self._listener.close()
        if self.errors:
            raise self.errors[0]

    def wait_hung_up(self, timeout=5.0):
        return self.hung_up.wait(timeout)

    def requests_of(self, command):
        return [r for r in self.requests if r[0] == command]

    # -- the server thread ----------------------------------------------------

    def _run(self):
        while not self._stopping:
            try:
                conn = self._listener.accept()[0]
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(10)
            session = self.session = Session(self, conn)
            try:
                if self.greeting is not None:
                    self.greeting(session)
                elif self._handshake(session):
                    self._transmission(session)
            except EOFError:
                self.hung_up.set()
            except OSError:
                pass  # the client went away, or stop() closed us
            except Exception as exc:  # pylint: disable=broad-exception-caught
                self.errors.append(exc)
            finally:
                session.close()
                self.session = None

    def _handshake(self, session):
        session.send(nbd.NBD_MAGIC + struct.pack(">QH", nbd.OPTS_MAGIC, self.handshake_flags))
        self.client_flags = struct.unpack(">I", session.recv(4))[0]
        while not session.closed:
            magic, option, length = struct.unpack(">QII", session.recv(16))
            if magic != nbd.OPTS_MAGIC:
                raise AssertionError("bad option magic %x" % magic)
            data = session.recv(length)
            self.options.append(option)
            if option in self.refuse:
                error, message = self.refuse[option]
                session.option_reply(option, error, message.encode())
            elif option == nbd.OPT_STRUCTURED_REPLY:
                session.option_reply(option, nbd.REP_ACK)
            elif option == nbd.OPT_SET_META_CONTEXT:
                self._meta_context(session, data)
            elif option == nbd.OPT_GO:
                name_length = struct.unpack(">I", data[:4])[0]
                self.exports.append(data[4:4 + name_length].decode())
                if self.send_info:
                    session.option_reply(option, nbd.REP_INFO,
                                         struct.pack(">HQH", nbd.INFO_EXPORT, self.size, TRANSMISSION_FLAGS))
                session.option_reply(option, nbd.REP_ACK)
                return True
            else:
                session.option_reply(option, REP_ERR_UNSUP)
        return False

    def _meta_context(self, session, data):
        name_length = struct.unpack(">I", data[:4])[0]
        at = 4 + name_length
        count = struct.unpack(">I", data[at:at + 4])[0]
        at += 4
        for dummy in range(count):
            length = struct.unpack(">I", data[at:at + 4])[0]
            query = data[at + 4:at + 4 + length].decode()
            at += 4 + length
            self.queries.append(query)
            if query in self.contexts:
                self.context_id = self.contexts[query]
                session.option_reply(nbd.OPT_SET_META_CONTEXT, nbd.REP_META_CONTEXT,
                                     struct.pack(">I", self.contexts[query]) + query.encode())
        session.option_reply(nbd.OPT_SET_META_CONTEXT, nbd.REP_ACK)

    def _transmission(self, session):
        while not session.closed:
            magic, flags, command, handle, offset, length = struct.unpack(">IHHQQI", session.recv(28))
            if magic != nbd.REQUEST_MAGIC:
                raise AssertionError("bad request magic %x" % magic)
            payload = session.recv(length) if command == nbd.CMD_WRITE else b""
            self.requests.append((command, flags, offset, length))
            if command in self.commands:
                self.commands[command](session, handle, offset, length, payload)
            elif command == nbd.CMD_READ:
                self._read(session, handle, offset, length)
            elif command == nbd.CMD_WRITE:
                self.data[offset:offset + length] = payload
                session.simple(handle)
            elif command == nbd.CMD_FLUSH:
                self.flushes += 1
                session.simple(handle)
            elif command == nbd.CMD_BLOCK_STATUS:
                self._block_status(session, handle, offset, length)
            elif command == nbd.CMD_DISC:
                self.disconnected.set()
                return
            else:
                session.simple(handle, 22)  # EINVAL

    def _read(self, session, handle, offset, length):
        step = self.read_chunk or length
        pieces = []
        for start in range(offset, offset + length, step):
            data = bytes(self.data[start:min(start + step, offset + length)])
            if self.holes and not any(data):
                pieces.append((nbd.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", start, len(data))))
            else:
                pieces.append((nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", start) + data))
        if self.reverse:
            pieces.reverse()
        for index, (kind, payload) in enumerate(pieces):
            session.chunk(handle, kind, payload, done=not self.done_chunk and index == len(pieces) - 1)
        if self.done_chunk:
            session.chunk(handle, nbd.REPLY_TYPE_NONE, done=True)

    def _block_status(self, session, handle, offset, length):
        descriptors = []
        start, end = 0, offset + length
        for extent, flags in self.extents:
            lo, hi = max(start, offset), min(start + extent, end)
            if lo < hi:
                descriptors.append((hi - lo, flags))
            start += extent
        if self.max_descriptors is not None:
            descriptors = descriptors[:self.max_descriptors]
        payload = struct.pack(">I", self.context_id or 0)
        payload += b"".join(struct.pack(">II", extent, flags) for extent, flags in descriptors)
        session.chunk(handle, nbd.REPLY_TYPE_BLOCK_STATUS, payload, done=True)
