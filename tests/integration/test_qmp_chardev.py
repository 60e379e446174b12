# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_chardev against a real QEMU."""

from __future__ import annotations

import os
import socket
import time

from harness import changed_flags

PROBE_CHARDEVS = [["query-chardev", None]]


def labels(record):
    return sorted(c["label"] for c in record["probe"][0] if not c["label"].startswith("compat_monitor"))


def unix_server(path):
    return {"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": path}}, "server": True,
                                       "wait": False}}


def test_socket_server_is_reachable(vm, workdir, ansible):
    path = os.path.join(workdir, "console.sock")
    args = {"socket": vm.socket, "id": "console0", "backend": unix_server(path)}
    records = ansible.four_ways("qmp_chardev", args, vm=vm, probe=PROBE_CHARDEVS)
    assert changed_flags(records) == [True, True, False, False]
    assert [labels(r) for r in records] == [[], ["console0"], ["console0"], ["console0"]]
    chardev = records[1]["result"]["chardev"]
    assert (chardev["type"], chardev["server"], chardev["address"]) == \
        ("socket", True, {"type": "unix", "path": path})
    assert records[3]["result"]["not_compared"] == ["wait"]
    # Something listens there now.
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)

    records = ansible.four_ways("qmp_chardev", {"socket": vm.socket, "id": "console0", "state": "absent"},
                                vm=vm, probe=PROBE_CHARDEVS)
    assert changed_flags(records) == [True, True, False, False]
    assert labels(records[1]) == [] and not os.path.exists(path)


def test_ringbuf_written_and_read_back(vm, ansible):
    args = {"socket": vm.socket, "id": "ring0", "backend": {"type": "ringbuf", "data": {"size": 4096}}}
    records = ansible.four_ways("qmp_chardev", args, vm=vm, probe=PROBE_CHARDEVS)
    assert changed_flags(records) == [True, True, False, False]
    assert records[1]["result"]["chardev"]["type"] == "ringbuf"
    assert records[3]["result"]["not_compared"] == ["size"]
    write = {"socket": vm.socket, "command": "ringbuf-write", "arguments": {"device": "ring0", "data": "hello"}}
    assert ansible.run("qmp_command", write, vm=vm)["changed"] is True
    assert vm.qmp("ringbuf-read", {"device": "ring0", "size": 100}) == "hello"


def test_pty_returns_its_path(vm, ansible):
    result = ansible.run("qmp_chardev", {"socket": vm.socket, "id": "tty0", "backend": {"type": "pty", "data": {}}},
                         vm=vm)
    assert result["changed"] is True
    pty = result["chardev"]["pty"]
    assert pty.startswith("/dev/pts/") and os.path.exists(pty)
    again = ansible.run("qmp_chardev", {"socket": vm.socket, "id": "tty0", "backend": {"type": "pty", "data": {}}},
                        vm=vm)
    assert again["changed"] is False and again["chardev"]["pty"] == pty
    assert [c["filename"] for c in vm.qmp("query-chardev") if c["label"] == "tty0"] == ["pty:" + pty]


def test_other_backend_fails_unless_recreate(vm, workdir, ansible):
    log = os.path.join(workdir, "out.log")
    ansible.run("qmp_chardev", {"socket": vm.socket, "id": "c0", "backend": {"type": "file", "data": {"out": log}}},
                vm=vm)
    # A file's path is not reported by QEMU: another path cannot be told apart.
    other = ansible.run("qmp_chardev", {"socket": vm.socket, "id": "c0",
                                        "backend": {"type": "file", "data": {"out": log + ".2"}}}, vm=vm)
    assert other["changed"] is False and other["not_compared"] == ["out"]

    path = os.path.join(workdir, "c0.sock")
    args = {"socket": vm.socket, "id": "c0", "backend": unix_server(path)}
    result = ansible.run("qmp_chardev", args, vm=vm)
    assert result["_status"] == "failed"
    assert "type is 'file', wanted 'socket'" in result["msg"] and "recreate=true" in result["msg"]
    assert not os.path.exists(path)
    records = ansible.four_ways("qmp_chardev", dict(args, recreate=True), vm=vm)
    assert changed_flags(records) == [True, True, False, False]
    assert "chardev-change" in [c["execute"] for c in records[1]["result"]["qmp_commands"]]
    assert os.path.exists(path)


def test_serial_keeps_working_across_chardev_change(vm_factory, workdir, ansible):
    guest = vm_factory(guest=True, paused=False)
    guest.wait_serial("guest: tick 2")
    path = os.path.join(workdir, "serial.sock")
    result = ansible.run("qmp_chardev", {"socket": guest.socket, "id": "serial0", "backend": unix_server(path),
                                         "recreate": True}, vm=guest)
    assert result["changed"] is True
    last_in_file = int(guest.serial().strip().splitlines()[-1].split()[2])
    # The guest's serial port now writes to the socket: its counter goes on there.
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        client.settimeout(10)
        received = b""
        deadline = time.monotonic() + 15
        while received.count(b"guest: tick") < 3 and time.monotonic() < deadline:
            received += client.recv(4096)
    ticks = [int(line.split()[2]) for line in received.decode(errors="replace").splitlines()
             if line.startswith("guest: tick") and len(line.split()) >= 4]
    assert ticks and ticks[0] > last_in_file and ticks == sorted(ticks)
    # The serial port still holds it.
    result = ansible.run("qmp_chardev", {"socket": guest.socket, "id": "serial0", "state": "absent"}, vm=guest)
    assert result["_status"] == "failed" and "busy" in result["msg"] and "remove that device first" in result["msg"]
