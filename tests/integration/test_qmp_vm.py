# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_vm against a real QEMU."""

from __future__ import annotations

import os

import pytest

from harness import changed_flags


def statuses(records):
    return [r["probe"][0]["status"] for r in records]


def test_running_then_paused(vm, ansible):
    assert vm.status() == "prelaunch"

    records = ansible.four_ways("qmp_vm", {"socket": vm.socket, "state": "running"}, vm=vm)
    assert changed_flags(records) == [True, True, False, False]
    # Check mode left the VM alone; the real run started it; nothing changed after.
    assert statuses(records) == ["prelaunch", "running", "running", "running"]
    assert records[0]["result"]["diff"] == {"before": {"state": "paused"}, "after": {"state": "running"}}
    assert [c["execute"] for c in records[1]["result"]["qmp_commands"]] == ["query-status", "cont", "query-status"]
    assert records[3]["result"]["qmp_commands"] == [{"execute": "query-status"}]

    records = ansible.four_ways("qmp_vm", {"socket": vm.socket, "state": "paused"}, vm=vm)
    assert changed_flags(records) == [True, True, False, False]
    assert statuses(records) == ["running", "paused", "paused", "paused"]
    assert records[1]["result"]["status"] == "paused"
    status = vm.qmp("query-status")
    assert (status["status"], status["running"]) == ("paused", False)


def test_absent_quits_qemu(vm, ansible):
    records = ansible.four_ways("qmp_vm", {"socket": vm.socket, "state": "absent"}, vm=vm,
                                probe=[])
    assert changed_flags(records) == [True, True, False, False]
    assert records[0]["result"]["state"] == "absent"
    assert "quit" in [c["execute"] for c in records[0]["result"]["qmp_commands"]]
    assert vm.wait_exit(10) == 0
    assert not os.path.exists(vm.socket)
    assert records[3]["result"]["qmp_commands"] == []


def test_shutdown_of_a_cooperating_guest(vm_factory, ansible):
    guest = vm_factory(guest=True, paused=False)
    guest.wait_serial("guest: ready")
    records = ansible.four_ways("qmp_vm", {"socket": guest.socket, "state": "shutdown", "timeout": 60},
                                vm=guest, probe=[])
    assert changed_flags(records) == [True, True, False, False]
    assert records[0]["result"]["qmp_commands"][-1] == {"execute": "system_powerdown"}
    assert "guest: power button pressed" in guest.serial()
    assert guest.wait_exit(10) == 0
    assert records[1]["result"]["status"] == "absent"
    assert records[1]["result"]["waited"] < 30


def test_shutdown_with_no_shutdown_keeps_qemu(vm_factory, ansible):
    guest = vm_factory(guest=True, paused=False, args=["-no-shutdown"])
    guest.wait_serial("guest: ready")
    # The guest takes its time; each reply is bounded apart.
    result = ansible.run("qmp_vm", {"socket": guest.socket, "state": "shutdown", "timeout": 5, "wait_timeout": 60},
                         vm=guest)
    assert result["changed"] is True
    assert guest.status() == "shutdown"
    assert ansible.run("qmp_vm", {"socket": guest.socket, "state": "shutdown"}, vm=guest)["changed"] is False
    # Powering it on again: a reset, then its CPUs run.
    result = ansible.run("qmp_vm", {"socket": guest.socket, "state": "running"}, vm=guest)
    assert [c["execute"] for c in result["qmp_commands"]][1:3] == ["system_reset", "cont"]
    assert guest.status() == "running"


@pytest.mark.parametrize("limit", [{"timeout": 2}, {"wait_timeout": 2}])
def test_shutdown_ignored_by_the_guest_fails_and_leaves_it_running(vm, ansible, limit):
    vm.qmp("cont")  # firmware only: nothing answers the power button
    result = ansible.run("qmp_vm", dict(limit, socket=vm.socket, state="shutdown"), vm=vm)
    assert result["_status"] == "failed"
    assert "did not power down within wait_timeout=2s" in result["msg"]
    assert 1.5 < result["waited"] < 10
    assert vm.status() == "running"


def test_shutdown_of_a_paused_guest_fails_at_once(vm, ansible):
    result = ansible.run("qmp_vm", {"socket": vm.socket, "state": "shutdown", "timeout": 20}, vm=vm)
    assert result["_status"] == "failed"
    assert "paused guest cannot answer" in result["msg"]
    assert result["qmp_commands"] == [{"execute": "query-status"}]
    assert vm.status() == "prelaunch"


def test_running_refused_for_an_incoming_migration(vm_factory, ansible):
    dest = vm_factory(args=["-incoming", "defer"])
    result = ansible.run("qmp_vm", {"socket": dest.socket, "state": "running"}, vm=dest)
    assert result["_status"] == "failed"
    assert "incoming migration" in result["msg"]
    assert dest.status() == "inmigrate"
