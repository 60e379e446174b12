# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_job against a real QEMU: real backup and mirror jobs, and a job that fails."""

from __future__ import annotations

import os
import threading

import pytest

from harness import changed_flags, disk_args, make_image

MiB = 1024 * 1024
PROBE_JOBS = [["query-jobs", None]]


@pytest.fixture
def disk_vm(vm_factory, workdir):
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    vm = vm_factory(args=disk_args(image))
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "sink", "size": 64 * MiB})
    return vm


def job_args(vm, job_id="job0", **kwargs):
    args = {"socket": vm.socket, "id": job_id}
    args.update(kwargs)
    return args


def slow_backup(vm, job_id="job0", **extra):
    arguments = {"job-id": job_id, "device": "disk0", "target": "sink", "sync": "full", "speed": 1,
                 "auto-dismiss": False}
    arguments.update(extra)
    vm.qmp("blockdev-backup", arguments)


def probe_status(record, job_id="job0"):
    jobs = dict((j["id"], j) for j in record["probe"][0])
    return jobs[job_id]["status"] if job_id in jobs else None


def test_concluded_then_absent(disk_vm, ansible):
    vm = disk_vm
    vm.qmp("block-dirty-bitmap-add", {"node": "disk0", "name": "all"})
    vm.guest_write("vdisk0", 0, 8 * MiB)
    # About 8 s at 1 MiB/s: the real run has to wait, even after a slow check-mode run on a loaded machine.
    vm.qmp("blockdev-backup", {"job-id": "job0", "device": "disk0", "target": "sink", "sync": "bitmap",
                               "bitmap": "all", "bitmap-mode": "never", "speed": MiB, "auto-dismiss": False})
    records = ansible.four_ways("qmp_job", job_args(vm, state="concluded"), vm=vm, probe=PROBE_JOBS)
    # Waiting for a job changes nothing.
    assert changed_flags(records) == [False, False, False, False]
    assert records[0]["result"]["job"]["status"] == "running"
    job = records[1]["result"]["job"]
    assert (job["status"], job["type"], job["error"]) == ("concluded", "backup", None)
    assert job["current"] == job["total"] == 8 * MiB and records[1]["result"]["progress"] == 100.0
    assert records[1]["result"]["waited"] > 0.2

    records = ansible.four_ways("qmp_job", job_args(vm, state="absent"), vm=vm, probe=PROBE_JOBS)
    assert changed_flags(records) == [True, True, False, False]
    assert [probe_status(r) for r in records] == ["concluded", None, None, None]
    assert records[3]["result"]["job"] is None


def test_pause_resume_cancel(disk_vm, ansible):
    vm = disk_vm
    for offset in range(0, 64 * MiB, 8 * MiB):
        vm.guest_write("vdisk0", offset, MiB)
    slow_backup(vm)
    records = ansible.four_ways("qmp_job", job_args(vm, state="paused"), vm=vm, probe=PROBE_JOBS)
    assert changed_flags(records) == [True, True, False, False]
    assert [probe_status(r) for r in records] == ["running", "paused", "paused", "paused"]

    records = ansible.four_ways("qmp_job", job_args(vm, state="running"), vm=vm, probe=PROBE_JOBS)
    assert changed_flags(records) == [True, True, False, False]
    assert [probe_status(r) for r in records] == ["paused", "running", "running", "running"]

    result = ansible.run("qmp_job", job_args(vm, state="absent"), vm=vm)
    assert result["_status"] == "failed" and "job job0 is running" in result["msg"]
    assert "state=cancelled" in result["msg"]

    records = ansible.four_ways("qmp_job", job_args(vm, state="cancelled"), vm=vm, probe=PROBE_JOBS)
    assert changed_flags(records) == [True, True, False, False]
    assert [probe_status(r) for r in records] == ["running", "concluded", "concluded", "concluded"]
    assert vm.jobs()["job0"]["error"] == "Operation canceled"
    # Waiting for a cancelled job reports it as the failure it is.
    result = ansible.run("qmp_job", job_args(vm, state="concluded"), vm=vm)
    assert result["_status"] == "failed" and result["msg"] == "job job0 failed: Operation canceled"


@pytest.mark.parametrize("limit", [{"timeout": 2}, {"wait_timeout": 2}])
def test_timeout_leaves_the_job_running(disk_vm, ansible, limit):
    vm = disk_vm
    for offset in range(0, 64 * MiB, 8 * MiB):
        vm.guest_write("vdisk0", offset, MiB)
    slow_backup(vm)
    result = ansible.run("qmp_job", job_args(vm, state="concluded", **limit), vm=vm)
    assert result["_status"] == "failed"
    assert result["msg"].startswith("job job0 did not reach concluded within wait_timeout=2s (it is running")
    assert 1.5 < result["waited"] < 10
    assert vm.jobs()["job0"]["status"] == "running"
    polled = [c for c in result["qmp_commands"] if c["execute"] == "query-jobs"]
    # The polls of the wait are listed once, with their count.
    assert len(polled) == 2 and polled[-1].get("repeated", 1) >= 2


def test_wait_timeout_outlasts_timeout(disk_vm, ansible):
    """A short timeout bounds each reply, not the wait for a job that takes longer."""
    vm = disk_vm
    vm.qmp("block-dirty-bitmap-add", {"node": "disk0", "name": "all"})
    vm.guest_write("vdisk0", 0, 12 * MiB)
    # The job stands still until the module has surely started (ansible-playbook's own start takes seconds
    # on a loaded machine), then takes about 6 s at 2 MiB/s: three times the timeout.
    slow_backup(vm, sync="bitmap", bitmap="all", speed=1, **{"bitmap-mode": "never"})
    speed_up = threading.Timer(5, lambda: vm.qmp("block-job-set-speed", {"device": "job0", "speed": 2 * MiB}))
    speed_up.start()
    result = ansible.run("qmp_job", job_args(vm, state="concluded", timeout=2, wait_timeout=60), vm=vm)
    speed_up.join()
    assert result["_status"] == "ok", result
    assert (result["job"]["status"], result["job"]["error"]) == ("concluded", None)
    assert result["waited"] > 2


def test_mirror_ready_then_completed(disk_vm, workdir, ansible):
    vm = disk_vm
    vm.guest_write("vdisk0", 0, 2 * MiB)
    copy = os.path.join(workdir, "copy.qcow2")
    ansible.run("qmp_blockdev", {"socket": vm.socket, "node_name": "copy", "create": {"size": "64M"},
                                 "options": {"driver": "qcow2", "file": {"driver": "file", "filename": copy}}},
                vm=vm)
    vm.qmp("blockdev-mirror", {"job-id": "mirror0", "device": "disk0", "target": "copy", "sync": "full",
                               "auto-dismiss": False})
    records = ansible.four_ways("qmp_job", job_args(vm, "mirror0", state="ready"), vm=vm, probe=PROBE_JOBS)
    assert changed_flags(records) == [False, False, False, False]
    assert probe_status(records[1], "mirror0") == "ready"

    records = ansible.four_ways("qmp_job", job_args(vm, "mirror0", state="completed"), vm=vm, probe=PROBE_JOBS)
    assert changed_flags(records) == [True, True, False, False]
    assert [probe_status(r, "mirror0") for r in records] == ["ready", "concluded", "concluded", "concluded"]
    # The device now reads from the mirror's target.
    inserted = [b["inserted"] for b in vm.qmp("query-block") if b.get("qdev") == "/machine/peripheral/vdisk0/virtio-backend"]
    assert inserted[0]["node-name"] == "copy"


def test_pending_job_is_finalized(disk_vm, ansible):
    vm = disk_vm
    vm.qmp("blockdev-backup", {"job-id": "job0", "device": "disk0", "target": "sink", "sync": "full",
                               "auto-dismiss": False, "auto-finalize": False})
    vm.wait_job("job0", "pending")
    records = ansible.four_ways("qmp_job", job_args(vm, state="concluded"), vm=vm, probe=PROBE_JOBS)
    assert changed_flags(records) == [True, True, False, False]
    assert [probe_status(r) for r in records] == ["pending", "concluded", "concluded", "concluded"]


def test_failing_job_keeps_the_bitmap(disk_vm, workdir, ansible):
    """A target that fails writes (blkdebug): the job fails with QEMU's error, the bitmap keeps its bits."""
    vm = disk_vm
    ansible.run("qmp_bitmap", {"socket": vm.socket, "node": "disk0", "name": "inc"}, vm=vm)
    vm.guest_write("vdisk0", 0, 2 * MiB)
    target = make_image(os.path.join(workdir, "broken.raw"), "64M", "raw")
    ansible.run("qmp_blockdev", {"socket": vm.socket, "node_name": "broken", "options": {
        "driver": "raw", "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": target},
                                  "inject-error": [{"event": "pwritev", "errno": 5}]}}}, vm=vm)
    vm.qmp("blockdev-backup", {"job-id": "inc0", "device": "disk0", "target": "broken", "sync": "bitmap",
                               "bitmap": "inc", "bitmap-mode": "on-success", "auto-dismiss": False})
    result = ansible.run("qmp_job", job_args(vm, "inc0", state="concluded"), vm=vm)
    assert result["_status"] == "failed"
    assert result["msg"] == "job inc0 failed: Input/output error"
    assert result["job"]["error"] == "Input/output error"
    bitmap = vm.bitmaps()[("disk0", "inc")]
    assert bitmap["count"] == 2 * MiB and bitmap["busy"] is False
    # The failed job stays until it is dismissed; then the id is free again.
    assert ansible.run("qmp_job", job_args(vm, "inc0", state="absent"), vm=vm)["changed"] is True
    assert "inc0" not in vm.jobs()


def test_unknown_job(vm, ansible):
    result = ansible.run("qmp_job", job_args(vm, "ghost"), vm=vm)
    assert result["_status"] == "failed" and result["msg"].startswith("QEMU has no job ghost")
    assert ansible.run("qmp_job", job_args(vm, "ghost", state="absent"), vm=vm)["changed"] is False
