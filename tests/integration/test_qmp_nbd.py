# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_nbd against a real QEMU, read back with nbdinfo and qemu-img."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from backup_helpers import MiB, qemu_img
from harness import changed_flags, disk_args, make_image

PROBE_EXPORTS = [["query-block-exports", None]]


@pytest.fixture
def disk_vm(vm_factory, workdir):
    return vm_factory(args=disk_args(make_image(os.path.join(workdir, "disk0.qcow2"), "64M")))


def nbdinfo(*args):
    return subprocess.run(["nbdinfo"] + list(args), capture_output=True, text=True, check=False)


def test_server_and_export_with_bitmap(disk_vm, workdir, ansible):
    vm = disk_vm
    nbd = os.path.join(workdir, "nbd.sock")
    address = {"type": "unix", "path": nbd}
    records = ansible.four_ways("qmp_nbd", {"socket": vm.socket, "address": address}, vm=vm, probe=PROBE_EXPORTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [r["result"]["server"]["running"] for r in records] == [True, True, True, True]
    assert not os.path.exists(nbd) or records[1]["result"]["server"]["running"]
    assert nbdinfo("--list", "nbd+unix:///?socket=" + nbd).returncode == 0

    vm.qmp("block-dirty-bitmap-add", {"node": "disk0", "name": "bm"})
    vm.guest_write("vdisk0", 4 * MiB, MiB, 0x5a)
    args = {"socket": vm.socket, "export": "disk0", "node": "disk0", "bitmaps": ["bm"], "address": address}
    result = ansible.run("qmp_nbd", args, vm=vm, check=True)
    assert result["_status"] == "failed" and "still records writes" in result["msg"]
    vm.qmp("block-dirty-bitmap-disable", {"node": "disk0", "name": "bm"})
    records = ansible.four_ways("qmp_nbd", args, vm=vm, probe=PROBE_EXPORTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [len(r["probe"][0]) for r in records] == [0, 1, 1, 1]
    assert records[3]["result"]["not_compared"] == ["bitmaps"]
    uri = records[1]["result"]["uri"]
    assert uri == "nbd+unix:///disk0?socket=" + nbd
    # A client sees the disk's data, and where the bitmap marks it dirty.
    info = nbdinfo("--json", uri)
    assert info.returncode == 0, info.stderr
    export = json.loads(info.stdout)["exports"][0]
    assert "qemu:dirty-bitmap:bm" in export["contexts"] and export["is_read_only"] is True
    dirty = json.loads(nbdinfo("--map=qemu:dirty-bitmap:bm", "--json", uri).stdout)
    assert [(e["offset"], e["length"]) for e in dirty if e["type"] & 1] == [(4 * MiB, MiB)]
    copy = os.path.join(workdir, "copy.qcow2")
    assert qemu_img("convert", "-O", "qcow2", uri, copy).returncode == 0
    assert qemu_img("compare", "-U", copy, os.path.join(workdir, "disk0.qcow2")).returncode == 0

    records = ansible.four_ways("qmp_nbd", dict(args, state="absent"), vm=vm, probe=PROBE_EXPORTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [len(r["probe"][0]) for r in records] == [1, 0, 0, 0]
    assert records[1]["result"]["export"] is None

    records = ansible.four_ways("qmp_nbd", {"socket": vm.socket, "state": "absent"}, vm=vm, probe=PROBE_EXPORTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [r["result"]["diff"]["before"]["server"]["running"] for r in records] == [True, True, False, False]
    assert [r["result"]["server"]["running"] for r in records] == [False, False, False, False]
    assert nbdinfo("--list", "nbd+unix:///?socket=" + nbd).returncode != 0


def test_export_starts_the_server_and_needs_an_address(disk_vm, workdir, ansible):
    vm = disk_vm
    result = ansible.run("qmp_nbd", {"socket": vm.socket, "export": "e", "node": "disk0"}, vm=vm)
    assert result["_status"] == "failed" and "give address to start it" in result["msg"]
    nbd = os.path.join(workdir, "nbd.sock")
    result = ansible.run("qmp_nbd", {"socket": vm.socket, "export": "e", "node": "disk0",
                                     "address": {"type": "unix", "path": nbd}}, vm=vm)
    assert result["changed"] is True and result["server"]["running"] is True
    assert [e["id"] for e in vm.qmp("query-block-exports")] == ["e"]
    assert nbdinfo("nbd+unix:///e?socket=" + nbd).returncode == 0


def test_export_of_another_node_needs_recreate(disk_vm, workdir, ansible):
    vm = disk_vm
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "other", "size": 64 * MiB})
    address = {"type": "unix", "path": os.path.join(workdir, "nbd.sock")}
    ansible.run("qmp_nbd", {"socket": vm.socket, "export": "e", "node": "disk0", "address": address}, vm=vm)
    result = ansible.run("qmp_nbd", {"socket": vm.socket, "export": "e", "node": "other", "address": address}, vm=vm)
    assert result["_status"] == "failed" and "node is 'disk0', wanted 'other'" in result["msg"]
    result = ansible.run("qmp_nbd", {"socket": vm.socket, "export": "e", "node": "other", "address": address,
                                     "recreate": True}, vm=vm)
    assert result["changed"] is True
    assert [e["node-name"] for e in vm.qmp("query-block-exports")] == ["other"]


def test_tcp_address(disk_vm, ansible):
    vm = disk_vm
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = ansible.run("qmp_nbd", {"socket": vm.socket, "export": "d", "node": "disk0",
                                     "address": {"type": "inet", "host": "127.0.0.1", "port": port}}, vm=vm)
    assert result["uri"] == "nbd://127.0.0.1:%d/d" % port
    assert nbdinfo(result["uri"]).returncode == 0
