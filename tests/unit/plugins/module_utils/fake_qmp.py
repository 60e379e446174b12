# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A scriptable fake QMP server for unit tests.

It is a real socket server (unix, or TCP on localhost) running in a
background thread, speaking QEMU's wire format: a greeting line, then one
JSON object per line in each direction. Like QEMU it serves one client at a
time: while a session is open, further clients wait in the listen backlog
without a greeting.

Each test scripts it:

* `greeting`: a dict (sent as JSON and CRLF, the default is QEMU 7.2's),
  bytes (sent as they are), None (nothing is sent), or a callable taking the
  `Session` (for anything else, e.g. `lambda session: session.close()`).
* `commands`: maps a command name to the value to return, or to a callable
  `handler(session, message)` that answers (or not) with `session.reply`,
  `session.error`, `session.event`, `session.send_raw`, `session.close`.
  `qmp_capabilities` answers `{}` unless overridden; an unknown command gets
  QEMU's CommandNotFound error.

Every message the server receives is kept in `received`. A handler's
exception is re-raised by `stop()`, so a broken script fails its test.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import tempfile
import threading

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"},
        "capabilities": ["oob"],
    }
}

# FakeQMPServer's default greeting (None means no greeting at all).
_QEMU_GREETING = object()

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107


def short_socket_dir(base):
    """A directory under which `<dir>/qmp.sock` fits in a unix socket address.

    Returns (directory, cleanup) where cleanup is None when `base` is short
    enough, else a function removing the fresh directory made under /tmp.
    """
    base = str(base)
    if len(os.path.join(base, "qmp.sock").encode("utf-8")) <= _MAX_UNIX_PATH - 20:
        return base, None
    directory = tempfile.mkdtemp(prefix="qmp", dir="/tmp")
    return directory, lambda: shutil.rmtree(directory, ignore_errors=True)


def event_message(name, data=None, seconds=1, microseconds=2):
    """An event as QEMU sends it (no id)."""
    message = {"event": name, "timestamp": {"seconds": seconds, "microseconds": microseconds}}
    if data is not None:
        message["data"] = data
    return message


class Session:
    """One accepted client connection, as handlers and tests see it."""

    def __init__(self, server, conn):
        self.server = server
        self.conn = conn
        self.closed = False
        self._send_lock = threading.Lock()
        self._close_lock = threading.Lock()

    def send_raw(self, data):
        with self._send_lock:
            self.conn.sendall(data)

    def send(self, message):
        """One JSON object and CRLF, as QEMU writes it."""
        self.send_raw(json.dumps(message).encode("utf-8") + b"\r\n")

    def reply(self, message, value=None):
        """The successful answer to `message`, echoing its id like QEMU."""
        answer = {"return": {} if value is None else value}
        if "id" in message:
            answer["id"] = message["id"]
        self.send(answer)

    def error(self, message, desc, error_class="GenericError"):
        answer = {"error": {"class": error_class, "desc": desc}}
        if "id" in message:
            answer["id"] = message["id"]
        self.send(answer)

    def event(self, name, data=None, **timestamp):
        self.send(event_message(name, data, **timestamp))

    def close(self):
        """Close the connection; the server then waits for the next client."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()

    def abort(self):
        """From another thread: wake the server out of a blocking send or recv."""
        with self._close_lock:
            if not self.closed:
                try:
                    self.conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class FakeQMPServer:
    """See the module docstring. Use as a context manager, or start()/stop()."""

    def __init__(self, path=None, greeting=_QEMU_GREETING, commands=None, tcp=False, backlog=None):
        if (path is None) != tcp:
            raise ValueError("give either a unix socket path or tcp=True")
        self.path = path
        self.greeting = GREETING if greeting is _QEMU_GREETING else greeting
        self.commands = {"qmp_capabilities": lambda session, message: session.reply(message)}
        self.commands.update(commands or {})
        self.received = []
        self.sessions = []
        self.errors = []
        self.session = None
        self.host = self.port = None
        self._cond = threading.Condition()
        self._stopping = False
        if tcp:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(("127.0.0.1", 0))
            self.host, self.port = self._listener.getsockname()[:2]
        else:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(path)
        if backlog is None:
            self._listener.listen()
        else:
            self._listener.listen(backlog)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="fake-qmp", daemon=True)

    # -- control from the test -------------------------------------------

    def start(self):
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        """Stop serving, close everything, re-raise a handler's exception."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        session = self.session
        if session is not None:
            session.abort()
        if self._thread.is_alive():
            self._thread.join(10)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)
        if self.errors:
            raise self.errors[0]

    def push(self, message):
        """Send a message (an event, say) to the current client now."""
        session = self.wait_for_session()
        if isinstance(message, bytes):
            session.send_raw(message)
        else:
            session.send(message)

    def wait_for_session(self, count=1, timeout=5.0):
        """The current session, once `count` sessions have been accepted."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.sessions) >= count and self.session is not None, timeout):
                raise AssertionError("no client session within %gs" % timeout)
            return self.session

    def wait_for_messages(self, count, timeout=5.0):
        """The messages received, once there are at least `count`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError("the server received %d messages, not %d, within %gs"
                                     % (len(self.received), count, timeout))
            return list(self.received)

    def wait_for_sessions_closed(self, count, timeout=5.0):
        """Wait until `count` sessions have ended (the client's close was seen)."""
        with self._cond:
            if not self._cond.wait_for(lambda: sum(s.closed for s in self.sessions) >= count, timeout):
                raise AssertionError("fewer than %d sessions ended within %gs" % (count, timeout))

    def commands_received(self):
        with self._cond:
            return [message.get("execute") for message in self.received]

    # -- the server thread ------------------------------------------------

    def _readable(self, sock):
        """Block until `sock` is readable; False when the server is stopping."""
        if self._stopping:
            return False
        readable = select.select([sock, self._wake_r], [], [])[0]
        return not self._stopping and sock in readable

    def _run(self):
        while self._readable(self._listener):
            conn = self._listener.accept()[0]
            session = Session(self, conn)
            with self._cond:
                self.session = session
                self.sessions.append(session)
                self._cond.notify_all()
            try:
                self._serve(session)
            except OSError:
                pass  # the client went away, or stop() aborted us
            except Exception as exc:  # pylint: disable=broad-exception-caught
                self.errors.append(exc)
            finally:
                session.close()
                with self._cond:
                    self.session = None
                    self._cond.notify_all()

    def _serve(self, session):
        greeting = self.greeting
        if callable(greeting):
            greeting(session)
        elif isinstance(greeting, bytes):
            session.send_raw(greeting)
        elif greeting is not None:
            session.send(greeting)
        pending = b""
        while not session.closed and self._readable(session.conn):
            data = session.conn.recv(65536)
            if not data:
                return
            pending += data
            while b"\n" in pending and not session.closed:
                line, pending = pending.split(b"\n", 1)
                line = line.replace(b"\xff", b"")  # the guest agent's parser reset, as qemu-ga drops it
                if line.strip():
                    self._dispatch(session, json.loads(line.decode("utf-8")))

    def _dispatch(self, session, message):
        with self._cond:
            self.received.append(message)
            self._cond.notify_all()
        name = message.get("execute")
        handler = self.commands.get(name)
        if handler is None:
            session.error(message, "The command %s has not been found" % name, "CommandNotFound")
        elif callable(handler):
            handler(session, message)
        else:
            session.reply(message, handler)
