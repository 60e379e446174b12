# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_migration, the migration engine, against real QEMUs on one host: each side four ways, the disk copied
equal, the switch-over inside the limit, the policy at work, and faults undone."""

from __future__ import annotations

import os
import subprocess

import pytest

from backup_helpers import MiB
from harness import changed_flags, disk_args, make_image

PROBE = [["query-status", None], ["query-migrate", None]]


@pytest.fixture
def pair(vm_factory, workdir):
    """A running guest with a disk holding data, and a destination waiting with an empty disk of that size."""
    disk = make_image(os.path.join(workdir, "disk0.qcow2"), "32M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 8M", disk], check=True, capture_output=True)
    copy = make_image(os.path.join(workdir, "copy0.qcow2"), "32M")
    source = vm_factory("source", guest=True, paused=False, args=disk_args(disk))
    destination = vm_factory("dest", guest=True, paused=False, args=disk_args(copy) + ["-incoming", "defer"])
    source.wait_serial("guest: tick 1 ")
    return source, destination, disk, copy


def listening_args(destination, **extra):
    args = {"socket": destination.socket, "state": "listening", "uri": "tcp:127.0.0.1:0",
            "nbd_address": {"type": "inet", "host": "127.0.0.1", "port": "0"}, "copies": ["disk0"],
            "export_prefix": "m1", "capabilities": {"events": True, "multifd": True},
            "parameters": {"multifd-channels": 2}}
    args.update(extra)
    return args


def test_each_side_four_ways_and_the_disk_arrives_equal(pair, ansible):
    source, destination, disk, copy = pair
    records = ansible.four_ways("qmp_migration", listening_args(destination), vm=destination, probe=PROBE)
    assert changed_flags(records) == [True, True, False, False]
    assert records[0]["probe"][1] == {}  # check mode left QEMU as it was: no listener
    incoming = records[1]["result"]
    assert incoming["uri"].startswith("tcp:127.0.0.1:") and not incoming["uri"].endswith(":0")
    assert records[3]["result"].get("uri") == incoming["uri"] and records[3]["result"]["nbd"] == incoming["nbd"], records[3]["result"]
    address = destination.qmp("query-migrate")["socket-address"][0]
    assert (address["host"], "tcp:127.0.0.1:" + address["port"]) == ("127.0.0.1", incoming["uri"])
    assert [e["id"] for e in destination.qmp("query-block-exports")] == ["m1-disk0"]

    migrate = {"socket": source.socket, "state": "migrated", "uri": incoming["uri"],
               "nbd_address": incoming["nbd"]["address"], "copies": ["disk0"], "export_prefix": "m1",
               "capabilities": {"events": True, "multifd": True}, "parameters": {"multifd-channels": 2},
               "poll_interval": 0.5}
    records = ansible.four_ways("qmp_migration", migrate, vm=source, probe=PROBE)
    assert changed_flags(records) == [True, True, False, False]
    assert records[0]["result"]["plan"]["copies"][0]["node"] == "disk0"
    assert records[0]["probe"][0]["status"] == "running" and records[0]["probe"][1] == {}
    done = records[1]["result"]
    assert done["status"] == "completed" and done["copied_disks"] == ["disk0"]
    # The guest was held in pre-switchover only while the mirror finished: well inside the limit.
    assert done["paused_before_switchover_ms"] < 300 and done["downtime_ms"] is not None
    assert records[1]["probe"][0]["status"] == "postmigrate" and records[3]["result"]["status"] == "completed"
    assert source.qmp("query-block-jobs") == []
    assert not [n for n in source.qmp("query-named-block-nodes") if n["node-name"].startswith("qemu-qmp-copy")]

    close = {"socket": destination.socket, "state": "closed", "copies": ["disk0"], "export_prefix": "m1"}
    records = ansible.four_ways("qmp_migration", close, vm=destination, probe=[["query-block-exports", None]])
    assert changed_flags(records) == [True, True, False, False]
    assert records[0]["probe"][0] != [] and records[1]["probe"][0] == []
    assert records[1]["result"]["status"] == "running" and records[1]["result"]["nbd_server_stopped"]

    # The copy holds what the source held (the destination stopped so its image holds still).
    destination.qmp("stop")
    destination.hmp("qemu-io -d vdisk0/virtio-backend flush")
    compare = subprocess.run(["qemu-img", "compare", "-U", disk, copy], capture_output=True, text=True, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_listening_on_every_address_is_refused_before_anything_changes(pair, ansible):
    dummy, destination, dummy, dummy = pair
    for args in (listening_args(destination, uri="tcp:0.0.0.0:0"),
                 listening_args(destination, nbd_address={"type": "inet", "host": "::", "port": "0"})):
        result = ansible.run("qmp_migration", args, vm=destination)
        assert result["_status"] == "failed" and "every address" in result["msg"], result
        assert [c["execute"] for c in result["qmp_commands"]] == ["query-status", "query-migrate"]
    assert destination.qmp("query-migrate") == {} and destination.qmp("query-block-exports") == []


def test_downtime_policy_lets_a_busy_guest_finish(vm_factory, ansible):
    source = vm_factory("source", guest=True, paused=False, append="qmpguest.fill_mb=96 qmpguest.dirty_mb=32")
    destination = vm_factory("dest", guest=True, paused=False, args=["-incoming", "defer"])
    source.wait_serial("guest: dirtying")
    common = {"capabilities": {"events": True}, "parameters": {"max-bandwidth": 16 * MiB}}
    incoming = ansible.run("qmp_migration", dict(common, socket=destination.socket, state="listening",
                                                 uri="tcp:127.0.0.1:0"), vm=destination)
    result = ansible.run("qmp_migration", dict(
        common, socket=source.socket, state="migrated", uri=incoming["uri"], converge="downtime",
        converge_after_passes=2, downtime_steps=3, downtime_ceiling=6000, poll_interval=0.5, wait_timeout=300),
        vm=source)
    assert result.get("status") == "completed", result.get("msg")
    steps = result["policy_steps"]
    assert steps and all(s["action"] == "downtime-limit" for s in steps), steps
    assert [s["value"] for s in steps] == sorted(s["value"] for s in steps) and steps[0]["pass"] > 2
    assert source.status() == "postmigrate" and destination.status() == "running"


def test_a_failed_migration_is_undone(pair, ansible):
    source, destination, dummy, dummy = pair
    incoming = ansible.run("qmp_migration", listening_args(destination), vm=destination)
    destination.kill()  # the destination dies before the copy starts
    result = ansible.run("qmp_migration", {
        "socket": source.socket, "state": "migrated", "uri": incoming["uri"],
        "nbd_address": incoming["nbd"]["address"], "copies": ["disk0"], "export_prefix": "m1"}, vm=source)
    assert result["_status"] == "failed" and "goes on running on the source" in result["msg"], result
    assert source.status() == "running" and source.qmp("query-block-jobs") == []
    assert not [n for n in source.qmp("query-named-block-nodes") if n["node-name"].startswith("qemu-qmp-copy")]
