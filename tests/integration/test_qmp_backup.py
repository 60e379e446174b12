# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_backup against a real QEMU: full, incremental and differential restore to what the disk held."""

from __future__ import annotations

import os

import pytest

from backup_helpers import (MiB, add_target, allocated_bytes, create_target, reference_copy, remove_node,
                            restore, same_content)
from harness import disk_args, make_image

SIZE = 64 * MiB


@pytest.fixture
def disk_vm(vm_factory, workdir):
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    return vm_factory(args=disk_args(image))


def backup(ansible, vm, mode, target, check=False, **extra):
    args = {"socket": vm.socket, "mode": mode, "disks": [{"node": "disk0", "target": target}]}
    args.update(extra)
    return ansible.run("qmp_backup", args, vm=vm, check=check)


def test_full_incremental_differential_restore_exactly(disk_vm, workdir, ansible):
    vm = disk_vm

    def path(name):
        return os.path.join(workdir, name)

    vm.guest_write("vdisk0", 0, 4 * MiB, 0x11)

    # Full, anchoring the chain's bitmaps: "inc" (since the last backup) and "base" (since the full).
    create_target(path("full.qcow2"), SIZE)
    add_target(vm, "t-full", path("full.qcow2"))
    reference_copy(vm, "disk0", path("ref0.qcow2"), SIZE)
    check = backup(ansible, vm, "full", "t-full", check=True, anchor_bitmaps=["inc", "base"])
    assert check["changed"] is True and vm.jobs() == {} and vm.bitmaps() == {}
    full = backup(ansible, vm, "full", "t-full", anchor_bitmaps=["inc", "base"])
    assert full["changed"] is True and full["started"] is True and full["finished"] is True
    disk = full["disks"][0]
    assert (disk["result"], disk["bytes"], disk["total"]) == ("success", SIZE, SIZE)
    assert disk["duration"] > 0 and vm.jobs() == {}
    assert {b[1] for b in vm.bitmaps()} == {"inc", "base"}
    assert all(b["count"] == 0 and b["persistent"] for b in vm.bitmaps().values())
    remove_node(vm, "t-full")

    # Incremental 1: exactly what the guest wrote since the full.
    vm.guest_write("vdisk0", 8 * MiB, 1 * MiB, 0x22)
    vm.guest_write("vdisk0", 0, 64 * 1024, 0x23)
    reference_copy(vm, "disk0", path("ref1.qcow2"), SIZE)
    create_target(path("inc1.qcow2"), SIZE, backing=path("full.qcow2"))
    add_target(vm, "t-inc1", path("inc1.qcow2"))
    inc1 = backup(ansible, vm, "incremental", "t-inc1", bitmap="inc")
    assert inc1["disks"][0]["bytes"] == MiB + 64 * 1024
    assert vm.bitmaps()[("disk0", "inc")]["count"] == 0
    assert vm.bitmaps()[("disk0", "base")]["count"] == MiB + 64 * 1024
    remove_node(vm, "t-inc1")
    assert allocated_bytes(path("inc1.qcow2")) == MiB + 64 * 1024

    # Incremental 2.
    vm.guest_write("vdisk0", 32 * MiB, 2 * MiB, 0x33)
    reference_copy(vm, "disk0", path("ref2.qcow2"), SIZE)
    create_target(path("inc2.qcow2"), SIZE, backing=path("inc1.qcow2"))
    add_target(vm, "t-inc2", path("inc2.qcow2"))
    backup(ansible, vm, "incremental", "t-inc2", bitmap="inc")
    remove_node(vm, "t-inc2")

    # Differential: everything since the full, leaving its bitmap as it is.
    vm.guest_write("vdisk0", 40 * MiB, MiB, 0x44)
    reference_copy(vm, "disk0", path("ref3.qcow2"), SIZE)
    create_target(path("diff.qcow2"), SIZE, backing=path("full.qcow2"))
    add_target(vm, "t-diff", path("diff.qcow2"))
    diff = backup(ansible, vm, "differential", "t-diff", bitmap="base")
    assert diff["disks"][0]["bytes"] == MiB + 64 * 1024 + 2 * MiB + MiB
    assert vm.bitmaps()[("disk0", "base")]["count"] == diff["disks"][0]["bytes"]
    remove_node(vm, "t-diff")

    for point, reference in (("full", "ref0"), ("inc1", "ref1"), ("inc2", "ref2"), ("diff", "ref3")):
        restored = restore(path(point + ".qcow2"), path(point + "-restored.qcow2"))
        assert same_content(restored, path(reference + ".qcow2")), point
    # A restore point is not any other point.
    assert not same_content(path("inc1-restored.qcow2"), path("ref2.qcow2"))


def test_check_mode_starts_nothing(disk_vm, workdir, ansible):
    vm = disk_vm
    create_target(os.path.join(workdir, "t.qcow2"), SIZE)
    add_target(vm, "t", os.path.join(workdir, "t.qcow2"))
    args = {"socket": vm.socket, "mode": "full", "disks": [{"node": "disk0", "target": "t"}], "anchor_bitmaps": ["inc"]}
    result = ansible.run("qmp_backup", args, check=True, vm=vm)
    assert result["changed"] is True and result["started"] is True and result["finished"] is False
    assert [c["execute"] for c in result["qmp_commands"]].count("transaction") == 2
    assert vm.jobs() == {} and vm.bitmaps() == {}


def test_incremental_needs_a_usable_bitmap(disk_vm, workdir, ansible):
    vm = disk_vm
    create_target(os.path.join(workdir, "t.qcow2"), SIZE)
    add_target(vm, "t", os.path.join(workdir, "t.qcow2"))
    result = backup(ansible, vm, "incremental", "t", bitmap="inc")
    assert result["_status"] == "failed"
    assert "node disk0 has no bitmap inc" in result["msg"] and "full backup" in result["msg"]
    vm.qmp("block-dirty-bitmap-add", {"node": "disk0", "name": "inc"})
    result = backup(ansible, vm, "full", "t", anchor_bitmaps=["inc"])
    assert result["_status"] == "failed" and "already has bitmap inc" in result["msg"]
    assert vm.jobs() == {}


def test_failed_incremental_keeps_bitmaps_and_retries(vm_factory, workdir, ansible):
    """Two disks in one backup; one target fails writes: neither bitmap loses a bit, and a retry restores."""

    def path(name):
        return os.path.join(workdir, name)

    def disks(target_a, target_b):
        return [{"node": "a", "target": target_a}, {"node": "b", "target": target_b}]

    vm = vm_factory(args=disk_args(make_image(path("a.qcow2"), "64M"), node="a", device="va")
                    + disk_args(make_image(path("b.qcow2"), "64M"), node="b", device="vb"))
    for node in ("a", "b"):
        create_target(path("full-%s.qcow2" % node), SIZE)
        add_target(vm, "tf-" + node, path("full-%s.qcow2" % node))
    full = ansible.run("qmp_backup", {"socket": vm.socket, "mode": "full", "disks": disks("tf-a", "tf-b"),
                                      "anchor_bitmaps": ["inc"]}, vm=vm)
    assert [d["result"] for d in full["disks"]] == ["success", "success"]
    for node in ("a", "b"):
        remove_node(vm, "tf-" + node)

    vm.guest_write("va", 0, 2 * MiB, 0x51)
    vm.guest_write("vb", 4 * MiB, 2 * MiB, 0x52)
    create_target(path("inc-a.qcow2"), SIZE, backing=path("full-a.qcow2"))
    add_target(vm, "ti-a", path("inc-a.qcow2"))
    broken = path("broken.raw")
    make_image(broken, "64M", "raw")
    vm.qmp("blockdev-add", {"driver": "raw", "node-name": "ti-b", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": broken},
        "inject-error": [{"event": "pwritev", "errno": 5}]}})
    failed = ansible.run("qmp_backup", {"socket": vm.socket, "mode": "incremental", "bitmap": "inc",
                                        "disks": disks("ti-a", "ti-b")}, vm=vm)
    assert failed["_status"] == "failed"
    assert "disk b (job backup-b): Input/output error" in failed["msg"]
    results = dict((d["node"], d["result"]) for d in failed["disks"])
    assert results["b"] == "failed" and results["a"] in ("cancelled", "failed")
    # Grouped completion: neither bitmap was cleared, the jobs are gone.
    assert vm.bitmaps()[("a", "inc")]["count"] == 2 * MiB
    assert vm.bitmaps()[("b", "inc")]["count"] == 2 * MiB
    assert vm.jobs() == {}
    remove_node(vm, "ti-a")
    remove_node(vm, "ti-b")

    # The retry needs no new full, and restores both disks exactly.
    for node in ("a", "b"):
        reference_copy(vm, node, path("ref-%s.qcow2" % node), SIZE)
        create_target(path("inc-%s.qcow2" % node), SIZE, backing=path("full-%s.qcow2" % node))
        add_target(vm, "ti-" + node, path("inc-%s.qcow2" % node))
    retry = ansible.run("qmp_backup", {"socket": vm.socket, "mode": "incremental", "bitmap": "inc",
                                       "disks": disks("ti-a", "ti-b")}, vm=vm)
    assert [d["result"] for d in retry["disks"]] == ["success", "success"]
    for node in ("a", "b"):
        remove_node(vm, "ti-" + node)
        restored = restore(path("inc-%s.qcow2" % node), path("restored-%s.qcow2" % node))
        assert same_content(restored, path("ref-%s.qcow2" % node)), node


def test_failed_full_removes_its_anchors(disk_vm, workdir, ansible):
    vm = disk_vm
    vm.guest_write("vdisk0", 0, MiB, 0x71)
    broken = make_image(os.path.join(workdir, "broken.raw"), "64M", "raw")
    vm.qmp("blockdev-add", {"driver": "raw", "node-name": "bad", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": broken},
        "inject-error": [{"event": "pwritev", "errno": 28}]}})
    result = backup(ansible, vm, "full", "bad", anchor_bitmaps=["inc", "base"])
    assert result["_status"] == "failed" and "No space left on device" in result["msg"]
    assert vm.bitmaps() == {} and vm.jobs() == {}


def test_started_then_completed_reports_progress(disk_vm, workdir, ansible):
    vm = disk_vm
    vm.guest_write("vdisk0", 0, 8 * MiB, 0x61)
    create_target(os.path.join(workdir, "t.qcow2"), SIZE)
    add_target(vm, "t", os.path.join(workdir, "t.qcow2"))
    args = {"socket": vm.socket, "mode": "full", "disks": [{"node": "disk0", "target": "t"}],
            "anchor_bitmaps": ["inc"], "speed": 6 * MiB, "state": "started", "poll": 1}
    first = ansible.run("qmp_backup", args, vm=vm)
    assert first["started"] is True and first["finished"] is False
    assert 0 < first["disks"][0]["percent"] < 100 and first["disks"][0]["result"] == "running"
    second = ansible.run("qmp_backup", args, vm=vm)
    assert second["started"] is False and second["changed"] is False
    assert second["disks"][0]["bytes"] >= first["disks"][0]["bytes"] and second["disks"][0]["rate"] > 0
    done = ansible.run("qmp_backup", dict(args, state="completed"), vm=vm)
    assert done["started"] is False and done["finished"] is True and done["changed"] is True
    assert done["disks"][0]["result"] == "success" and vm.jobs() == {}


def test_pull_mode_anchors_get_their_granularity(disk_vm, workdir, ansible):
    vm = disk_vm
    overlay = create_target(os.path.join(workdir, "fleece.qcow2"), 64 * MiB, backing=os.path.join(workdir, "disk0.qcow2"))
    vm.qmp("blockdev-add", {"driver": "qcow2", "node-name": "fleece0", "backing": "disk0",
                            "file": {"driver": "file", "filename": overlay}})
    args = {"socket": vm.socket, "mode": "full", "pull": True, "anchor_bitmaps": ["chain"],
            "anchor_granularity": 131072, "disks": [{"node": "disk0", "target": "fleece0", "job_id": "pull0"}]}
    started = ansible.run("qmp_backup", dict(args, state="started"), vm=vm)
    assert started["_status"] == "ok", started
    assert vm.bitmaps()[("disk0", "chain")]["granularity"] == 131072
    stopped = ansible.run("qmp_backup", dict(args, state="completed", pulled=True), vm=vm)
    assert stopped["_status"] == "ok", stopped
    assert vm.jobs() == {} and vm.bitmaps()[("disk0", "chain")]["granularity"] == 131072
