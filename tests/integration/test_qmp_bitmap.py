# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_bitmap against a real QEMU, with guest writes through HMP qemu-io."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness import changed_flags, disk_args, make_image

MiB = 1024 * 1024
PROBE_NODES = [["query-named-block-nodes", None]]


@pytest.fixture
def disk_vm(vm_factory, workdir):
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    return vm_factory(args=disk_args(image))


def bitmap_args(vm, **kwargs):
    args = {"socket": vm.socket, "node": "disk0", "name": "bm0"}
    args.update(kwargs)
    return args


def test_add_then_absent(disk_vm, ansible):
    vm = disk_vm
    records = ansible.four_ways("qmp_bitmap", bitmap_args(vm, granularity=65536), vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert ("disk0", "bm0") not in _probe_bitmaps(records[0])
    assert ("disk0", "bm0") in _probe_bitmaps(records[1])
    got = vm.bitmaps()[("disk0", "bm0")]
    assert (got["granularity"], got["recording"], got["persistent"], got["count"]) == (65536, True, False, 0)
    assert records[1]["result"]["bitmap"] == {"name": "bm0", "node": "disk0", "count": 0, "granularity": 65536,
                                              "recording": True, "busy": False, "persistent": False,
                                              "inconsistent": False}
    # Check mode predicted what the real run made.
    assert records[0]["result"]["bitmap"] == records[1]["result"]["bitmap"]

    records = ansible.four_ways("qmp_bitmap", bitmap_args(vm, state="absent"), vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert ("disk0", "bm0") in _probe_bitmaps(records[0])
    assert vm.bitmaps() == {}


def _probe_bitmaps(record):
    return dict(((n["node-name"], b["name"]), b) for n in record["probe"][0]
                for b in n.get("dirty-bitmaps", []) if b.get("name"))


def test_recording_and_guest_writes(disk_vm, ansible):
    vm = disk_vm
    ansible.run("qmp_bitmap", bitmap_args(vm), vm=vm)
    vm.guest_write("vdisk0", 0, MiB)
    assert vm.bitmaps()[("disk0", "bm0")]["count"] == MiB

    records = ansible.four_ways("qmp_bitmap", bitmap_args(vm, recording=False), vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert [_probe_bitmaps(r)[("disk0", "bm0")]["recording"] for r in records] == [True, False, False, False]
    # A disabled bitmap does not record, and keeps its bits.
    vm.guest_write("vdisk0", 8 * MiB, MiB)
    assert vm.bitmaps()[("disk0", "bm0")]["count"] == MiB

    records = ansible.four_ways("qmp_bitmap", bitmap_args(vm, recording=True), vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    vm.guest_write("vdisk0", 16 * MiB, 2 * MiB)
    assert vm.bitmaps()[("disk0", "bm0")]["count"] == 3 * MiB


def test_clear_changes_only_when_dirty(disk_vm, ansible):
    vm = disk_vm
    ansible.run("qmp_bitmap", bitmap_args(vm), vm=vm)
    ansible.run("qmp_bitmap", bitmap_args(vm, name="other"), vm=vm)
    vm.guest_write("vdisk0", 0, 2 * MiB)
    records = ansible.four_ways("qmp_bitmap", bitmap_args(vm, clear=True), vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert [_probe_bitmaps(r)[("disk0", "bm0")]["count"] for r in records] == [2 * MiB, 0, 0, 0]
    assert records[0]["result"]["bitmap"]["count"] == 0  # predicted
    # Exactly that bitmap: the other one kept its bits.
    assert vm.bitmaps()[("disk0", "other")]["count"] == 2 * MiB


def test_merge_same_node_and_other_node(vm_factory, workdir, ansible):
    image0 = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    image1 = make_image(os.path.join(workdir, "disk1.qcow2"), "64M")
    vm = vm_factory(args=disk_args(image0) + disk_args(image1, node="disk1", device="vdisk1"))
    ansible.run("qmp_bitmap", bitmap_args(vm, name="a"), vm=vm)
    ansible.run("qmp_bitmap", bitmap_args(vm, name="b", recording=False), vm=vm)
    ansible.run("qmp_bitmap", {"socket": vm.socket, "node": "disk1", "name": "c"}, vm=vm)
    vm.guest_write("vdisk0", 0, MiB)            # in a only (b is disabled)
    vm.qmp("block-dirty-bitmap-enable", {"node": "disk0", "name": "b"})
    vm.qmp("block-dirty-bitmap-disable", {"node": "disk0", "name": "a"})
    vm.guest_write("vdisk0", 4 * MiB, MiB)      # in b only
    vm.guest_write("vdisk1", 8 * MiB, 2 * MiB)  # in c only
    assert [vm.bitmaps()[k]["count"] for k in (("disk0", "a"), ("disk0", "b"), ("disk1", "c"))] == \
        [MiB, MiB, 2 * MiB]

    args = bitmap_args(vm, name="a", merge=["b", {"node": "disk1", "name": "c"}])
    records = ansible.four_ways("qmp_bitmap", args, vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert [_probe_bitmaps(r)[("disk0", "a")]["count"] for r in records] == [MiB, 4 * MiB, 4 * MiB, 4 * MiB]
    # The sources are untouched, and no scratch bitmap is left behind.
    bitmaps = vm.bitmaps()
    assert sorted(bitmaps) == [("disk0", "a"), ("disk0", "b"), ("disk1", "c")]
    assert (bitmaps[("disk0", "b")]["count"], bitmaps[("disk1", "c")]["count"]) == (MiB, 2 * MiB)
    # A merge that adds nothing new is no change, even with dirty sources.
    assert ansible.run("qmp_bitmap", bitmap_args(vm, name="a", merge=["b"]), vm=vm)["changed"] is False
    # A merge into a new bitmap adds it first.
    result = ansible.run("qmp_bitmap", bitmap_args(vm, name="d", merge=["b"]), vm=vm)
    assert result["changed"] is True and vm.bitmaps()[("disk0", "d")]["count"] == MiB


def test_mismatch_needs_recreate(disk_vm, ansible):
    vm = disk_vm
    ansible.run("qmp_bitmap", bitmap_args(vm, granularity=65536), vm=vm)
    vm.guest_write("vdisk0", 0, MiB)
    result = ansible.run("qmp_bitmap", bitmap_args(vm, granularity=131072), vm=vm)
    assert result["_status"] == "failed"
    assert "granularity 65536" in result["msg"] and "granularity 131072" in result["msg"]
    assert "recreate=true" in result["msg"]
    assert vm.bitmaps()[("disk0", "bm0")]["count"] == MiB  # untouched

    records = ansible.four_ways("qmp_bitmap", bitmap_args(vm, granularity=131072, recreate=True), vm=vm,
                                probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert any("dirty bytes are lost" in w for w in records[1]["result"]["warnings"])
    got = vm.bitmaps()[("disk0", "bm0")]
    assert (got["granularity"], got["count"]) == (131072, 0)


def test_persistent_needs_qcow2(vm_factory, workdir, ansible):
    raw = make_image(os.path.join(workdir, "disk0.raw"), "64M", "raw")
    vm = vm_factory(args=disk_args(raw, fmt="raw"))
    result = ansible.run("qmp_bitmap", bitmap_args(vm, persistent=True), vm=vm)
    assert result["_status"] == "failed"
    assert result["msg"] == "node disk0 is raw: only qcow2 images can store persistent bitmaps"
    # Refused before QEMU was asked to add anything.
    assert "block-dirty-bitmap-add" not in [c["execute"] for c in result["qmp_commands"]]
    assert vm.bitmaps() == {}


def test_missing_node_and_source(disk_vm, ansible):
    vm = disk_vm
    result = ansible.run("qmp_bitmap", bitmap_args(vm, node="nope"), vm=vm)
    assert result["_status"] == "failed" and "no block node nope" in result["msg"] and "disk0" in result["msg"]
    result = ansible.run("qmp_bitmap", bitmap_args(vm, merge=["ghost"]), vm=vm)
    assert result["_status"] == "failed" and "has no bitmap ghost" in result["msg"]
    assert vm.bitmaps() == {}


def test_busy_bitmap(disk_vm, ansible):
    vm = disk_vm
    ansible.run("qmp_bitmap", bitmap_args(vm), vm=vm)
    # Dirty areas far apart: at 1 byte/s the job stops after its first chunk.
    for offset in range(0, 64 * MiB, 8 * MiB):
        vm.guest_write("vdisk0", offset, MiB)
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "sink", "size": 64 * MiB})
    vm.qmp("blockdev-backup", {"job-id": "slow", "device": "disk0", "target": "sink", "sync": "bitmap",
                               "bitmap": "bm0", "bitmap-mode": "on-success", "speed": 1, "auto-dismiss": False})
    assert vm.bitmaps()[("disk0", "bm0")]["busy"] is True
    for args, doing in ((bitmap_args(vm, clear=True), "cleared"), (bitmap_args(vm, state="absent"), "removed"),
                        (bitmap_args(vm, recording=False), "disabled")):
        result = ansible.run("qmp_bitmap", args, vm=vm)
        assert result["_status"] == "failed", args
        assert "busy (in use by a job or a migration)" in result["msg"] and doing in result["msg"]
    # Nothing to change is fine while busy.
    assert ansible.run("qmp_bitmap", bitmap_args(vm), vm=vm)["changed"] is False


def test_persistent_bitmap_survives_restart(vm_factory, workdir, ansible):
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    vm = vm_factory(args=disk_args(image))
    records = ansible.four_ways("qmp_bitmap", bitmap_args(vm, persistent=True), vm=vm)
    assert changed_flags(records) == [True, True, False, False]
    vm.guest_write("vdisk0", 0, 3 * MiB)
    ansible.run("qmp_vm", {"socket": vm.socket, "state": "absent"}, vm=vm)
    assert vm.wait_exit(10) == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", image], capture_output=True,
                                     text=True, check=True).stdout)
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["bm0"]

    again = vm_factory(name="again", args=disk_args(image))
    result = ansible.run("qmp_bitmap", bitmap_args(again, persistent=True), vm=again)
    assert result["changed"] is False
    assert result["bitmap"]["persistent"] is True and result["bitmap"]["count"] == 3 * MiB
    assert again.bitmaps()[("disk0", "bm0")]["count"] == 3 * MiB


def test_inconsistent_bitmap_can_only_be_removed(vm_factory, workdir, ansible):
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    vm = vm_factory(args=disk_args(image))
    ansible.run("qmp_bitmap", bitmap_args(vm, persistent=True), vm=vm)
    vm.qmp("quit")  # stored in the image on a clean exit
    vm.wait_exit()
    crashing = vm_factory(name="crashing", args=disk_args(image))
    crashing.guest_write("vdisk0", 0, MiB)
    crashing.kill()  # a crash: the image still marks the bitmap in use
    again = vm_factory(name="again", args=disk_args(image))
    assert again.bitmaps()[("disk0", "bm0")]["inconsistent"] is True

    for args in (bitmap_args(again), bitmap_args(again, clear=True), bitmap_args(again, recording=False)):
        result = ansible.run("qmp_bitmap", args, vm=again)
        assert result["_status"] == "failed", args
        assert "inconsistent (left by a crash" in result["msg"] and "state=absent" in result["msg"]
        assert result["bitmap"]["inconsistent"] is True

    records = ansible.four_ways("qmp_bitmap", bitmap_args(again, state="absent"), vm=again, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert again.bitmaps() == {}
    # A new one can take its place: the next backup starts a new chain.
    assert ansible.run("qmp_bitmap", bitmap_args(again, persistent=True), vm=again)["changed"] is True
    assert again.bitmaps()[("disk0", "bm0")].get("inconsistent", False) is False
