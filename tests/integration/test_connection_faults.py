# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bad input and faults: each ends in `failed` within `timeout`, naming the path and the cause."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient, QMPError


class _Peer(threading.Thread):
    """A unix socket server that answers every client with `reply` (or nothing)."""

    def __init__(self, path, reply=None):
        super().__init__(daemon=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.reply = reply
        self.clients = []

    def run(self):
        while True:
            try:
                conn, dummy = self.server.accept()
            except OSError:
                return
            self.clients.append(conn)
            if self.reply:
                conn.sendall(self.reply)

    def stop(self):
        self.server.close()
        for conn in self.clients:
            conn.close()


def _failed(ansible, args, elapsed_max):
    start = time.monotonic()
    result = ansible.run("qmp_info", dict(args, gather=["status"]))
    elapsed = time.monotonic() - start
    assert result["_status"] == "failed", result
    assert result["qmp_commands"] == []
    assert elapsed < elapsed_max, "took %.1fs" % elapsed
    return result


def test_missing_socket(workdir, ansible):
    path = os.path.join(workdir, "nothing.qmp")
    result = _failed(ansible, {"socket": path}, 10)
    assert result["msg"].startswith("cannot connect to QMP at %s: no such file" % path)


def test_regular_file(workdir, ansible):
    path = os.path.join(workdir, "file.qmp")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("not a socket\n")
    result = _failed(ansible, {"socket": path}, 10)
    assert result["msg"] == "cannot connect to QMP at %s: not a socket" % path


def test_peer_speaking_http(workdir, ansible):
    path = os.path.join(workdir, "http.sock")
    peer = _Peer(path, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    peer.start()
    try:
        result = _failed(ansible, {"socket": path, "timeout": 3}, 10)
    finally:
        peer.stop()
    assert path in result["msg"] and "not a QMP socket" in result["msg"]
    assert "HTTP/1.1 400" in result["msg"]


def test_silent_peer_fails_within_timeout(workdir, ansible):
    path = os.path.join(workdir, "silent.sock")
    peer = _Peer(path)
    peer.start()
    try:
        result = _failed(ansible, {"socket": path, "timeout": 2}, 2 + 8)
    finally:
        peer.stop()
    assert result["msg"].startswith("cannot connect to QMP at %s: no greeting within 2s" % path)


def test_qemu_that_died(vm, ansible):
    vm.process.send_signal(signal.SIGKILL)
    vm.process.wait(10)
    assert os.path.exists(vm.socket)  # a stale socket file stays behind
    result = _failed(ansible, {"socket": vm.socket}, 10)
    assert result["msg"].startswith("cannot connect to QMP at %s: connection refused" % vm.socket)


def test_busy_socket(vm, ansible):
    with QMPClient(socket_path=vm.socket, timeout=5):
        result = _failed(ansible, {"socket": vm.socket, "timeout": 2}, 2 + 8)
        assert "one client at a time" in result["msg"]
    # The module waits for a client that leaves within its timeout.
    holder = QMPClient(socket_path=vm.socket, timeout=5).__enter__()
    threading.Timer(1.5, holder.close).start()
    result = ansible.run("qmp_info", {"socket": vm.socket, "gather": ["status"], "timeout": 20}, vm=vm)
    assert result["status"] == "prelaunch"


@pytest.mark.parametrize("option", ["timeout", "wait_timeout"])
@pytest.mark.parametrize("value, shown", [(0, "0.0"), (-1, "-1.0"), ("nan", "nan"), ("inf", "inf"),
                                          (1e300, "1e+300")])
def test_unusable_timeouts_fail_naming_the_option(vm, ansible, option, value, shown):
    """Values a socket cannot take fail before connecting, not in a traceback."""
    result = _failed(ansible, {"socket": vm.socket, option: value}, 10)
    assert result["msg"] == "%s must be a number of seconds, more than 0 and at most 1000000000, not %s" % (
        option, shown)


@pytest.mark.parametrize("args", [{"socket": "/run/vm\x00.qmp"}, {"host": "local\x00host", "port": 4444}])
def test_a_nul_in_the_address_fails_naming_the_option(ansible, args):
    result = ansible.run("qmp_info", dict(args, gather=["status"]))
    option = "socket" if "socket" in args else "host"
    assert result["_status"] == "failed" and "Traceback" not in json.dumps(result), result
    # Newer ansible-core refuses the value itself, before the module's code runs (it logs the arguments to
    # syslog first); otherwise the module names the option.
    assert result["msg"].startswith("%s must not contain a NUL character" % option) or (
        "embedded null character" in result["msg"]), result


def test_no_connection_given(ansible):
    result = ansible.run("qmp_info", {"gather": ["status"]})
    assert result["_status"] == "failed"
    assert "QMP_SOCKET" in result["msg"]


def test_socket_and_host_are_exclusive(ansible):
    result = ansible.run("qmp_info", {"socket": "/x", "host": "127.0.0.1", "port": 1})
    assert result["_status"] == "failed" and "mutually exclusive" in result["msg"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _non_loopback_address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _tcp_vm(vm_factory, addresses):
    """A QEMU with a QMP TCP server on each address; (vm, ports). A port taken meanwhile by another test
    makes QEMU exit at start: then again, with other ports."""
    for attempt in range(5):
        ports = [_free_port() for dummy in addresses]
        args = []
        for address, port in zip(addresses, ports):
            args += ["-qmp", "tcp:%s:%d,server=on,wait=off" % (address, port)]
        try:
            return vm_factory("tcp%d" % attempt, qmp_socket=False, args=args), ports
        except (RuntimeError, QMPError):
            if attempt == 4:
                raise
    return None


def test_tcp(workdir, vm_factory, ansible):
    address = _non_loopback_address()
    vm, ports = _tcp_vm(vm_factory, ["127.0.0.1"] + ([address] if address else []))
    time.sleep(0.2)
    result = ansible.run("qmp_info", {"host": "127.0.0.1", "port": ports[0], "gather": ["status"]}, vm=vm)
    assert result["status"] == "prelaunch"
    assert not result.get("warnings")
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    result = ansible.run("qmp_info", {"host": address, "port": ports[1], "gather": ["status"]}, vm=vm)
    assert result["status"] == "prelaunch"
    assert any("no authentication" in w for w in result["warnings"])


def test_tcp_refused(ansible):
    port = _free_port()
    result = _failed(ansible, {"host": "127.0.0.1", "port": port}, 10)
    assert result["msg"].startswith("cannot connect to QMP at 127.0.0.1:%d: connection refused" % port)
