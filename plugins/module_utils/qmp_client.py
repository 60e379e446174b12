# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small synchronous QMP client, standard library only.

It runs on the managed host inside a module, so it must not import anything
outside the standard library. One client holds one connection; QEMU's QMP
sockets serve one client at a time.
"""

from __future__ import annotations

import collections
import errno
import itertools
import json
import os
import socket
import struct
import stat
import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_schema import load_schema

DEFAULT_TIMEOUT = 30.0
# query-qmp-schema is about 240 KB; anything near this limit is not QMP.
DEFAULT_MAX_REPLY_SIZE = 64 * 1024 * 1024
_RECV_SIZE = 256 * 1024
# Events nobody waits for pile up over a long connection (a backup of a day): keep the newest ones.
MAX_BUFFERED_EVENTS = 10000


class QMPError(Exception):
    """Base of every error the client raises; `str()` is a plain message."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


class QMPConnectError(QMPError):
    """The connection could not be made.

    `reason` is one of: missing, not_socket, refused, permission, busy,
    unreachable.
    """

    def __init__(self, message, address, reason):
        super().__init__(message)
        self.address = address
        self.reason = reason


class QMPGreetingError(QMPError):
    """The peer answered, but not with a QMP greeting."""


class QMPTimeoutError(QMPError):
    """No complete answer within the timeout."""


class QMPProtocolError(QMPError):
    """The peer broke the protocol: bad JSON, EOF mid-reply, a reply too large."""


class QMPConnectionClosed(QMPProtocolError):
    """The peer closed the connection (QEMU exited or dropped us)."""


class QMPCommandError(QMPError):
    """QEMU refused a command; carries QEMU's error class and description."""

    def __init__(self, command, arguments, error_class, desc, peer="QEMU"):
        super().__init__("%s refused %s: %s" % (peer, command, desc))
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc


def describe_address(socket_path=None, host=None, port=None):
    if socket_path is not None:
        return socket_path
    if host is not None and ":" in host:
        return "[%s]:%s" % (host, port)
    return "%s:%s" % (host, port)


class QMPClient:
    """One QMP connection: greeting, negotiation, commands and events.

    Use it as a context manager; nothing touches the network before
    `connect()` (or `__enter__`).
    """

    def __init__(self, socket_path=None, host=None, port=None,
                 timeout=DEFAULT_TIMEOUT, max_reply_size=DEFAULT_MAX_REPLY_SIZE, protocol="qmp"):
        if (socket_path is None) == (host is None):
            raise ValueError("give either socket_path or host and port")
        if protocol not in ("qmp", "guest-agent"):
            raise ValueError("protocol is qmp or guest-agent")
        # The QEMU guest agent speaks the same JSON, without greeting or negotiation.
        self.protocol = protocol
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.timeout = float(timeout)
        self.max_reply_size = max_reply_size
        self.address = describe_address(socket_path, host, port)
        self.greeting = None
        self.events = collections.deque(maxlen=MAX_BUFFERED_EVENTS)
        self._sock = None
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._schema = None

    # -- connection -------------------------------------------------------

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def connected(self):
        return self._sock is not None

    def peer_pid(self):
        """The process id of the QEMU at the other end of a unix socket (SO_PEERCRED), or None."""
        if self._sock is None or self._sock.family != socket.AF_UNIX:
            return None
        try:
            pid, dummy, dummy = struct.unpack("3i", self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                          struct.calcsize("3i")))
        except OSError:
            return None
        return pid or None

    def connect(self):
        deadline = time.monotonic() + self.timeout
        self._sock = self._open_socket()
        try:
            if self.protocol == "guest-agent":
                self._sync_guest_agent(deadline)
            else:
                self.greeting = self._read_greeting(deadline)
                self._negotiate(deadline)
        except BaseException:
            self.close()
            raise
        return self.greeting

    def close(self):
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buffer = bytearray()

    def _open_socket(self):
        if self.socket_path is not None:
            return self._open_unix()
        return self._open_tcp()

    def _connect_error(self, reason, detail):
        what = "the guest agent" if self.protocol == "guest-agent" else "QMP"
        return QMPConnectError("cannot connect to %s at %s: %s" % (what, self.address, detail),
                               self.address, reason)

    def _open_unix(self):
        path = self.socket_path
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            if self.protocol == "guest-agent":
                raise self._connect_error("missing", "no such file (is the guest agent's channel a unix socket "
                                                     "there: -chardev socket,path=%s,server=on,wait=off?)" % path)
            raise self._connect_error("missing", "no such file (is QEMU running with -qmp unix:%s,server=on?)" % path)
        except PermissionError:
            raise self._connect_error("permission", "permission denied")
        if not stat.S_ISSOCK(mode):
            raise self._connect_error("not_socket", "not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise self._os_connect_error(exc)
        return sock

    def _open_tcp(self):
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except socket.timeout:
            raise self._connect_error("unreachable", "no answer within %gs" % self.timeout)
        except OSError as exc:
            raise self._os_connect_error(exc)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _os_connect_error(self, exc):
        if isinstance(exc, socket.timeout):
            return self._connect_error("busy", "no answer within %gs" % self.timeout)
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return self._connect_error("refused", "connection refused (QEMU is not listening there; it may have exited)")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return self._connect_error("permission", "permission denied")
        if exc.errno == errno.EAGAIN:
            return self._connect_error("busy", "the socket's backlog is full")
        return self._connect_error("unreachable", exc.strerror or str(exc))

    def _read_greeting(self, deadline):
        try:
            message = self._read_message(deadline)
            while "event" in message and "QMP" not in message:
                # QEMU can still hold output queued for the previous client.
                message = self._read_message(deadline)
        except QMPTimeoutError:
            if self._buffer:
                raise QMPGreetingError("%s is not a QMP socket: it sent %r and no QMP greeting"
                                       % (self.address, bytes(self._buffer[:80])))
            raise QMPConnectError(
                "cannot connect to QMP at %s: no greeting within %gs. A QMP socket serves one "
                "client at a time: another client is probably connected (give tools a second "
                "-qmp socket), or the peer is not QEMU" % (self.address, self.timeout),
                self.address, "busy")
        except QMPConnectionClosed:
            raise QMPGreetingError("%s closed the connection without a QMP greeting" % self.address)
        except QMPProtocolError as exc:
            raise QMPGreetingError("%s is not a QMP socket: %s" % (self.address, exc))
        info = message.get("QMP") if isinstance(message, dict) else None
        if not isinstance(info, dict) or not isinstance(info.get("version"), dict):
            raise QMPGreetingError("%s is not a QMP socket: its first message is not a QMP greeting: %.200s"
                                   % (self.address, json.dumps(message)))
        return info

    def _negotiate(self, deadline):
        self._send_and_wait("qmp_capabilities", None, deadline)

    def _sync_guest_agent(self, deadline):
        """Resynchronise with the guest agent, which may hold another client's leftovers.

        A 0xFF byte resets its JSON parser (a half-written request is dropped);
        then guest-sync with a fresh token, skipping every answer, error or
        not, until the one that carries the token.
        """
        token = int(time.time() * 1000) % 2000000000 + os.getpid()
        try:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            request = {"execute": "guest-sync", "arguments": {"id": token}, "id": "qemu.qmp-%d" % next(self._ids)}
            self._sock.sendall(b"\xff" + json.dumps(request).encode() + b"\n")
            while True:
                try:
                    message = self._read_message(deadline)
                except QMPConnectionClosed as exc:
                    raise QMPConnectionClosed("%s while waiting for the answer to guest-sync" % exc)
                except QMPProtocolError:
                    continue  # leftover output that is not JSON
                if message.get("return") == token:
                    return
        except (QMPTimeoutError, socket.timeout):
            raise QMPConnectError("cannot talk to the guest agent at %s: no answer within %gs (is qemu-ga "
                                  "running in the guest?)" % (self.address, self.timeout), self.address, "busy")

    # -- version ----------------------------------------------------------

    @property
    def version(self):
        """{major, minor, micro, package} from the greeting."""
        if self.greeting is None:
            return None
        ver = self.greeting["version"]
        qemu = ver.get("qemu", {})
        return {
            "major": qemu.get("major"),
            "minor": qemu.get("minor"),
            "micro": qemu.get("micro"),
            "package": ver.get("package", "").strip(),
        }

    # -- commands ---------------------------------------------------------

    def execute(self, command, arguments=None, timeout=None):
        """Run one command and return its `return` value.

        Raises QMPCommandError with QEMU's class and desc when QEMU refuses it.
        Events that arrive meanwhile are kept in `self.events`.
        """
        if self._sock is None:
            raise QMPConnectionClosed("not connected to %s" % self.address)
        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        return self._send_and_wait(command, arguments, deadline)

    def _send_and_wait(self, command, arguments, deadline):
        msg_id = "qemu.qmp-%d" % next(self._ids)
        request = {"execute": command, "id": msg_id}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode("utf-8") + b"\n"
        try:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            self._sock.sendall(data)
        except socket.timeout:
            raise QMPTimeoutError("timed out sending %s to %s" % (command, self.address))
        except OSError as exc:
            self.close()
            raise QMPConnectionClosed("connection to %s lost while sending %s: %s"
                                      % (self.address, command, exc.strerror or exc))
        while True:
            try:
                message = self._read_message(deadline)
            except QMPTimeoutError:
                raise QMPTimeoutError("QEMU at %s did not answer %s within the timeout"
                                      % (self.address, command))
            except QMPConnectionClosed as exc:
                raise QMPConnectionClosed("%s while waiting for the answer to %s" % (exc, command))
            if "event" in message:
                self.events.append(message)
                continue
            if "id" in message and message["id"] != msg_id:
                continue  # a late answer to an earlier command that timed out
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise QMPCommandError(command, arguments, error.get("class", "GenericError"),
                                      error.get("desc", json.dumps(message["error"])),
                                      "the guest agent" if self.protocol == "guest-agent" else "QEMU")
            if "id" in message:
                raise QMPProtocolError("answer to %s has neither return nor error: %.200s"
                                       % (command, json.dumps(message)))

    # -- events -----------------------------------------------------------

    def wait_for_event(self, names, match=None, timeout=None):
        """Return the first event named in `names` whose data matches.

        `match` is a dict (every key must equal the event's data value) or a
        callable taking the event. Buffered events are searched first, then
        the socket is read until `timeout` (seconds) passes.
        """
        if isinstance(names, str):
            names = (names,)
        names = frozenset(names)

        def wanted(event):
            if event.get("event") not in names:
                return False
            if match is None:
                return True
            if callable(match):
                return bool(match(event))
            data = event.get("data", {})
            return all(data.get(k) == v for k, v in match.items())

        found = self.take_event(wanted)
        if found is not None:
            return found
        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        while True:
            if self._sock is None:
                raise QMPConnectionClosed("not connected to %s" % self.address)
            message = self._read_message(deadline)
            if "event" not in message:
                continue
            if wanted(message):
                return message
            self.events.append(message)

    def wait_closed(self, timeout):
        """Read (and keep) events until the peer closes the connection, as QEMU does when it exits;
        False if it is still there after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                message = self._read_message(deadline) if self._sock is not None else None
                if message is None:
                    return True
                if "event" in message:
                    self.events.append(message)
        except QMPConnectionClosed:
            return True
        except QMPTimeoutError:
            return False

    def take_event(self, predicate):
        """Remove and return the first buffered event for which predicate is true."""
        for index, event in enumerate(self.events):
            if predicate(event):
                del self.events[index]
                return event
        return None

    def poll_events(self, timeout=0.0):
        """Read whatever events arrive within `timeout` into the buffer."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                message = self._read_message(deadline)
                if "event" in message:
                    self.events.append(message)
        except QMPTimeoutError:
            pass
        return list(self.events)

    # -- wire -------------------------------------------------------------

    def _read_message(self, deadline):
        while True:
            newline = self._buffer.find(b"\n")
            if newline > self.max_reply_size or (newline < 0 and len(self._buffer) > self.max_reply_size):
                raise QMPProtocolError("%s sent a message larger than the %d byte limit"
                                       % (self.address, self.max_reply_size))
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                # 0xFF resynchronises the guest agent's stream; never part of JSON.
                line = line.replace(b"\xff", b"").strip()
                if not line:
                    continue
                try:
                    message = json.loads(line.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise QMPProtocolError("%s sent something that is not JSON (%s): %.80r"
                                           % (self.address, exc, line))
                if not isinstance(message, dict):
                    raise QMPProtocolError("%s sent a JSON value that is not an object: %.80r"
                                           % (self.address, line))
                return message
            self._fill(deadline)

    def _fill(self, deadline):
        if self._sock is None:
            raise QMPConnectionClosed("not connected to %s" % self.address)
        # Past the deadline, still take what is already waiting (a zero timeout
        # makes the socket non-blocking).
        self._sock.settimeout(max(0.0, deadline - time.monotonic()))
        try:
            chunk = self._sock.recv(_RECV_SIZE)
        except (socket.timeout, BlockingIOError):
            raise QMPTimeoutError("timed out waiting for %s" % self.address)
        except OSError as exc:
            self.close()
            raise QMPConnectionClosed("connection to %s lost: %s" % (self.address, exc.strerror or exc))
        if not chunk:
            partial = bool(self._buffer.strip())
            self.close()
            if partial:
                raise QMPConnectionClosed("%s closed the connection in the middle of a message" % self.address)
            raise QMPConnectionClosed("%s closed the connection" % self.address)
        self._buffer += chunk

    # -- schema -----------------------------------------------------------

    def schema(self, cache_dir=None, use_cache=True):
        """The running QEMU's QMP schema (see qmp_schema), cached on disk."""
        if self._schema is None:
            self._schema, dummy = load_schema(self.execute, self.version, cache_dir=cache_dir,
                                              use_cache=use_cache)
        return self._schema
