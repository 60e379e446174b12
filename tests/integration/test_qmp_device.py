# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_device against a real QEMU: hot-plug on a PCIe root port, unplug with and without a guest."""

from __future__ import annotations

import time

import pytest

from harness import changed_flags

ROOT_PORT = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"]
PROBE_PERIPHERALS = [["qom-list", {"path": "/machine/peripheral"}]]


def peripherals(record):
    return sorted(p["name"] for p in record["probe"][0] if p["type"].startswith("child<"))


def disk_device(vm, **extra):
    args = {"socket": vm.socket, "id": "vd1", "driver": "virtio-blk-pci", "bus": "rp1",
            "properties": {"drive": "data1", "serial": "data1"}}
    args.update(extra)
    return args


@pytest.fixture
def port_vm(vm_factory):
    vm = vm_factory(args=ROOT_PORT)
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "data1", "size": 16 << 20})
    return vm


def test_disk_hot_plugged_on_a_root_port(port_vm, ansible):
    vm = port_vm
    records = ansible.four_ways("qmp_device", disk_device(vm), vm=vm, probe=PROBE_PERIPHERALS)
    assert changed_flags(records) == [True, True, False, False]
    assert [peripherals(r) for r in records] == [["rp1"], ["rp1", "vd1"], ["rp1", "vd1"], ["rp1", "vd1"]]
    device = records[1]["result"]["device"]
    assert (device["driver"], device["bus"]) == ("virtio-blk-pci", "/machine/peripheral/rp1/rp1")
    assert device["properties"] == {"drive": "data1", "serial": "data1"}
    blocks = [b for b in vm.qmp("query-block") if b.get("qdev") == "/machine/peripheral/vd1/virtio-backend"]
    assert blocks and blocks[0]["inserted"]["node-name"] == "data1"


def test_differences_fail_unless_recreate(port_vm, ansible):
    vm = port_vm
    ansible.run("qmp_device", disk_device(vm), vm=vm)
    result = ansible.run("qmp_device", disk_device(vm, properties={"drive": "data1", "serial": "other"}), vm=vm)
    assert result["_status"] == "failed"
    assert "serial is 'data1', wanted 'other'" in result["msg"] and "recreate=true" in result["msg"]
    result = ansible.run("qmp_device", disk_device(vm, driver="virtio-scsi-pci", properties={}), vm=vm)
    assert result["_status"] == "failed" and "driver is 'virtio-blk-pci'" in result["msg"]
    assert vm.qmp("qom-get", {"path": "/machine/peripheral/vd1", "property": "serial"}) == "data1"


def test_unplug_from_a_guest_that_does_not_answer(port_vm, ansible):
    vm = port_vm  # never started (-S): nothing in the guest handles the unplug request
    ansible.run("qmp_device", disk_device(vm), vm=vm)
    start = time.monotonic()
    result = ansible.run("qmp_device", {"socket": vm.socket, "id": "vd1", "state": "absent", "wait_timeout": 3},
                         vm=vm)
    elapsed = time.monotonic() - start
    assert result["_status"] == "failed"
    assert result["msg"].startswith("the guest did not release device vd1 within wait_timeout=3s")
    assert 3 <= result["waited"] < 5 and elapsed < 3 + 8
    assert "vd1" in [p["name"] for p in vm.qmp("qom-list", {"path": "/machine/peripheral"})]
    # Running it again waits on the request QEMU still holds, and fails the same way; without
    # wait_timeout, timeout bounds the wait.
    again = ansible.run("qmp_device", {"socket": vm.socket, "id": "vd1", "state": "absent", "timeout": 1}, vm=vm)
    assert again["_status"] == "failed" and "did not release device vd1 within wait_timeout=1s" in again["msg"]


def test_unplug_with_a_linux_guest(vm_factory, ansible):
    guest = vm_factory(guest=True, paused=False, args=ROOT_PORT)
    guest.wait_serial("guest: ready")
    guest.qmp("blockdev-add", {"driver": "null-co", "node-name": "data1", "size": 16 << 20})
    ansible.run("qmp_device", disk_device(guest), vm=guest)
    records = ansible.four_ways("qmp_device", {"socket": guest.socket, "id": "vd1", "state": "absent",
                                               "timeout": 60}, vm=guest, probe=PROBE_PERIPHERALS)
    assert changed_flags(records) == [True, True, False, False]
    assert [peripherals(r) for r in records] == [["rp1", "vd1"], ["rp1"], ["rp1"], ["rp1"]]


def test_usb_device_unplugs_at_once(vm_factory, ansible):
    vm = vm_factory(args=["-device", "qemu-xhci,id=xhci"])
    args = {"socket": vm.socket, "id": "tablet0", "driver": "usb-tablet", "bus": "xhci.0"}
    records = ansible.four_ways("qmp_device", args, vm=vm, probe=PROBE_PERIPHERALS)
    assert changed_flags(records) == [True, True, False, False]
    records = ansible.four_ways("qmp_device", {"socket": vm.socket, "id": "tablet0", "state": "absent"},
                                vm=vm, probe=PROBE_PERIPHERALS)
    assert changed_flags(records) == [True, True, False, False]
    assert [peripherals(r) for r in records] == [["tablet0", "xhci"], ["xhci"], ["xhci"], ["xhci"]]


def test_root_bus_refuses_hotplug(vm, ansible):
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "data1", "size": 16 << 20})
    result = ansible.run("qmp_device", disk_device(vm, bus="pcie.0"), vm=vm)
    assert result["_status"] == "failed"
    assert "does not support hotplugging" in result["qmp_error"]["desc"]
