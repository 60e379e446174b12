# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qemu.qmp.backup role: chains that restore exactly, and faults that lose nothing."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from backup_helpers import MiB, reference_copy, same_content
from harness import disk_args, make_image

SIZE = 64 * MiB
SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "roles", "backup", "files", "manifest.schema.json")


class BackupRole:
    def __init__(self, ansible, vm, root, name="vm1"):
        self.ansible = ansible
        self.vm = vm
        self.root = root
        self.name = name

    def run(self, entry="main", **variables):
        base = {"backup_qmp_socket": self.vm.socket, "backup_name": self.name, "backup_dir": self.root,
                "backup_poll_interval": 1}
        base.update(variables)
        fact = "backup_restore_result" if entry == "restore" else "backup_result"
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": [
            {"name": "role", "ansible.builtin.include_role": {"name": "qemu.qmp.backup", "tasks_from": entry}},
            {"name": "result", "ansible.builtin.debug": {"var": fact}}]}]
        records, proc = self.ansible.playbook(json.dumps(play), extra_vars=base)
        result = next((r["result"] for r in records if r["task"] == "result"), {})
        return {"rc": proc.returncode, "records": records, "stdout": proc.stdout, "result": result.get(fact),
                "failed": [r["result"].get("msg", "") for r in records if r["status"] == "failed"],
                "debug": [r["result"].get("msg") for r in records if r["action"] == "ansible.builtin.debug"]}

    def backup(self, **variables):
        outcome = self.run(**variables)
        assert outcome["rc"] == 0, outcome["stdout"][-3000:]
        return outcome["result"]

    def restore(self, disk, output, point="latest"):
        outcome = self.run(entry="restore", backup_restore_disk=disk, backup_restore_output=output, backup_restore_point=point)
        assert outcome["rc"] == 0, outcome["stdout"][-3000:]
        return outcome["result"]

    def manifests(self):
        return sorted(glob.glob(os.path.join(self.root, self.name, "*", "*.json")))

    def files(self):
        return sorted(os.path.relpath(p, os.path.join(self.root, self.name))
                      for p in glob.glob(os.path.join(self.root, self.name, "**"), recursive=True) if os.path.isfile(p))


def check_manifest(path):
    import jsonschema  # pylint: disable=import-outside-toplevel
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    with open(SCHEMA, encoding="utf-8") as handle:
        jsonschema.Draft202012Validator(json.load(handle)).validate(manifest)
    return manifest


@pytest.fixture
def disk_vm(vm_factory, workdir):
    return vm_factory(args=disk_args(make_image(os.path.join(workdir, "disk0.qcow2"), "64M")))


def test_chain_full_incremental_differential_restores_exactly(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    refs = []
    steps = [("auto", 0x11, 0), ("auto", 0x22, 8 * MiB), ("incremental", 0x33, 20 * MiB), ("differential", 0x44, 40 * MiB)]
    for index, (level, pattern, offset) in enumerate(steps):
        vm.guest_write("vdisk0", offset, 2 * MiB, pattern)
        result = role.backup(backup_level=level)
        assert result["level"] == ["full", "incremental", "incremental", "differential"][index]
        assert result["sequence"] == index and not result["warnings"]
        # The VM is paused and only the test writes: the disk now is the disk at the backup.
        refs.append(reference_copy(vm, "disk0", os.path.join(workdir, "ref%d.qcow2" % index), SIZE))

    manifests = [check_manifest(p) for p in role.manifests()]
    assert [(m["sequence"], m["level"], m["based_on"]) for m in manifests] == \
        [(0, "full", None), (1, "incremental", 0), (2, "incremental", 1), (3, "differential", 0)]
    chain = manifests[0]["chain"]
    # Incrementals copied exactly what the guest wrote since the backup before (64 KiB-aligned writes).
    assert [m["disks"][0]["bytes_copied"] for m in manifests[1:]] == [2 * MiB, 2 * MiB, 6 * MiB]
    # The chain's bitmaps are persistent, in QEMU, and nothing else of the role's.
    bitmaps = vm.bitmaps()
    assert sorted(name for dummy, name in bitmaps) == ["qemu-qmp-backup-%s" % chain, "qemu-qmp-backup-%s-full" % chain]
    assert vm.jobs() == {} and not [n for n in vm.nodes() if n.startswith("qmpbk")]

    for index in range(4):
        restored = os.path.join(workdir, "restored%d.qcow2" % index)
        out = role.restore("disk0", restored, point="%s/%d" % (chain, index))
        assert out["sequence"] == index
        assert same_content(restored, refs[index]), index
    latest = role.restore("disk0", os.path.join(workdir, "latest.qcow2"))
    assert latest["level"] == "differential"
    assert same_content(os.path.join(workdir, "latest.qcow2"), refs[3])


def test_broken_chain_starts_a_new_full(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    first = role.backup()
    vm.qmp("block-dirty-bitmap-remove", {"node": "disk0", "name": "qemu-qmp-backup-%s" % first["chain"]})
    outcome = role.run(backup_level="incremental")
    assert outcome["rc"] == 0
    result = outcome["result"]
    assert result["level"] == "full" and result["chain"] != first["chain"]
    assert any("bitmap qemu-qmp-backup-%s is missing on node disk0" % first["chain"] in w for w in result["warnings"])
    assert any("WARNING" in str(m) for m in outcome["debug"])
    # The old chain's remaining bitmap is gone: only the new chain's bitmaps record.
    assert sorted(name for dummy, name in vm.bitmaps()) == \
        ["qemu-qmp-backup-%s" % result["chain"], "qemu-qmp-backup-%s-full" % result["chain"]]


def test_retention_keeps_the_newest_chains(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    chains = []
    for dummy in range(3):
        chains.append(role.backup(backup_level="full", backup_keep_chains=2)["chain"])
        time.sleep(1.1)  # chain ids are timestamps
    assert sorted(os.listdir(os.path.join(workdir, "backups", "vm1"))) == chains[1:]


def test_job_failure_keeps_nothing_and_the_next_incremental_restores(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    vm.guest_write("vdisk0", 0, 4 * MiB, 0x31)
    full = role.backup()
    for offset in range(8 * MiB, 64 * MiB, 8 * MiB):
        vm.guest_write("vdisk0", offset, MiB, 0x32)
    before = role.files()
    bitmap = vm.bitmaps()[("disk0", "qemu-qmp-backup-%s" % full["chain"])]["count"]

    # Another client cancels the slow backup's job: the job ends with an error.
    def cancel():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "qemu-qmp-backup-disk0" in vm.jobs():
                vm.qmp("job-cancel", {"id": "qemu-qmp-backup-disk0"})
                return
            time.sleep(0.05)
    canceller = threading.Thread(target=cancel)
    canceller.start()
    outcome = role.run(backup_speed=MiB)
    canceller.join()
    assert outcome["rc"] != 0
    assert any("incremental backup of vm1 failed" in m and "Operation canceled" in m for m in outcome["failed"])
    assert role.files() == before  # no manifest, no image of the failed backup
    assert vm.bitmaps()[("disk0", "qemu-qmp-backup-%s" % full["chain"])]["count"] == bitmap
    assert vm.jobs() == {} and not [n for n in vm.nodes() if n.startswith("qmpbk")]

    retry = role.backup()
    assert retry["level"] == "incremental" and retry["chain"] == full["chain"] and retry["sequence"] == 1
    ref = reference_copy(vm, "disk0", os.path.join(workdir, "ref.qcow2"), SIZE)
    role.restore("disk0", os.path.join(workdir, "restored.qcow2"))
    assert same_content(os.path.join(workdir, "restored.qcow2"), ref)


@pytest.fixture
def small_dir(workdir):
    path = os.path.join(workdir, "small")
    os.mkdir(path)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", path], capture_output=True, check=False)
    if mount.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here: %s" % mount.stderr.decode())
    yield path
    subprocess.run(["umount", "-l", path], check=False)


def test_full_target_directory(disk_vm, workdir, small_dir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, small_dir)
    vm.guest_write("vdisk0", 0, 8 * MiB, 0x41)
    full = role.backup()
    before = role.files()
    vm.guest_write("vdisk0", 16 * MiB, 8 * MiB, 0x42)
    bitmap = vm.bitmaps()[("disk0", "qemu-qmp-backup-%s" % full["chain"])]["count"]
    # Something else fills the folder up.
    filler = os.path.join(small_dir, "filler")
    stat = os.statvfs(small_dir)
    with open(filler, "wb") as handle:
        handle.write(b"\xff" * (stat.f_bavail * stat.f_frsize - 2 * MiB))
    outcome = role.run()
    assert outcome["rc"] != 0
    assert any("No space left on device" in m for m in outcome["failed"]), outcome["failed"]
    assert [f for f in role.files() if f != "../filler"] == before
    assert vm.bitmaps()[("disk0", "qemu-qmp-backup-%s" % full["chain"])]["count"] == bitmap
    # Room again: the chain goes on, with no new full.
    os.unlink(filler)
    retry = role.backup()
    assert retry["level"] == "incremental" and retry["chain"] == full["chain"]
    ref = reference_copy(vm, "disk0", os.path.join(workdir, "ref.qcow2"), SIZE)
    role.restore("disk0", os.path.join(workdir, "restored.qcow2"))
    assert same_content(os.path.join(workdir, "restored.qcow2"), ref)


def test_qemu_killed_mid_backup(vm_factory, workdir, ansible):
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    vm = vm_factory(args=disk_args(image))
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    vm.guest_write("vdisk0", 0, 4 * MiB, 0x51)
    full = role.backup()
    vm.qmp("quit")  # a clean exit stores the persistent bitmaps
    vm.wait_exit()
    vm = vm_factory(name="again", args=disk_args(image))
    role.vm = vm
    for offset in range(8 * MiB, 64 * MiB, 8 * MiB):
        vm.guest_write("vdisk0", offset, MiB, 0x52)
    before = role.files()

    def kill():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "qemu-qmp-backup-disk0" in vm.jobs():
                vm.process.send_signal(signal.SIGKILL)
                return
            time.sleep(0.05)
    killer = threading.Thread(target=kill)
    killer.start()
    outcome = role.run(backup_speed=MiB)
    killer.join()
    assert outcome["rc"] != 0
    assert role.files() == before

    # QEMU comes back; its bitmap did not survive the kill (inconsistent): a new full chain, with a warning.
    vm = vm_factory(name="third", args=disk_args(image))
    role.vm = vm
    outcome = role.run()
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    result = outcome["result"]
    assert result["level"] == "full" and result["chain"] != full["chain"]
    assert any("inconsistent" in w for w in result["warnings"])
    assert ("disk0", "qemu-qmp-backup-%s" % full["chain"]) not in vm.bitmaps()
    # The earlier chain is still there and restores.
    assert role.restore("disk0", os.path.join(workdir, "old.qcow2"), point=full["chain"])["level"] == "full"


def guest_ticks(image, workdir):
    """The newest tick the tiny guest wrote into a disk image (its records cycle through 256 slots)."""
    raw = os.path.join(workdir, "ticks.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, raw], check=True)
    with open(raw, "rb") as handle:
        data = handle.read(256 * 4096)
    os.unlink(raw)
    ticks = []
    for slot in range(256):
        record = data[slot * 4096:slot * 4096 + 64].split(b"\n")[0]
        if record.startswith(b"qemu.qmp guest tick "):
            tick = int(record.split()[-1])
            assert tick % 256 == slot, (slot, record)
            ticks.append(tick)
    return max(ticks) if ticks else None


def test_two_disks_are_from_one_instant(vm_factory, workdir, ansible):
    """The guest writes each tick to disk a, then disk b: a backup of both from one instant sees the
    same tick on both, or b one behind."""
    args = (disk_args(make_image(os.path.join(workdir, "a.qcow2"), "64M"), node="a", device="va")
            + disk_args(make_image(os.path.join(workdir, "b.qcow2"), "64M"), node="b", device="vb"))
    guest = vm_factory(guest=True, paused=False, args=args, append="qmpguest.disk=/dev/vda,/dev/vdb")
    guest.wait_serial("guest: tick 4 ")
    role = BackupRole(ansible, guest, os.path.join(workdir, "backups"))
    seen = []
    for level in ("full", "incremental", "incremental"):
        result = role.backup(backup_level=level)
        assert result["level"] == level and sorted(d["node"] for d in result["disks"]) == ["a", "b"]
        ticks = {}
        for node in ("a", "b"):
            restored = os.path.join(workdir, "%s-%d.qcow2" % (node, result["sequence"]))
            role.restore(node, restored)
            ticks[node] = guest_ticks(restored, workdir)
        assert ticks["a"] is not None and ticks["a"] - ticks["b"] in (0, 1), ticks
        seen.append(ticks["a"])
    # Each backup is later than the one before: the guest kept writing, and the chain followed.
    assert seen == sorted(seen) and seen[0] < seen[-1]


def test_pull_mode_chain_restores_exactly(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    refs = []
    steps = [("auto", 0x61, 0), ("auto", 0x62, 8 * MiB), ("incremental", 0x63, 20 * MiB), ("differential", 0x64, 40 * MiB)]
    for index, (level, pattern, offset) in enumerate(steps):
        vm.guest_write("vdisk0", offset, 2 * MiB, pattern)
        result = role.backup(backup_level=level, backup_mode="pull")
        assert result["level"] == ["full", "incremental", "incremental", "differential"][index]
        refs.append(reference_copy(vm, "disk0", os.path.join(workdir, "ref%d.qcow2" % index), SIZE))
    manifests = [check_manifest(p) for p in role.manifests()]
    assert [m["mode"] for m in manifests] == ["pull"] * 4
    assert [m["disks"][0]["bytes_copied"] for m in manifests[1:]] == [2 * MiB, 2 * MiB, 6 * MiB]
    # Only the chain's current bitmaps are left, all recording; no fleece, export or job.
    chain = manifests[0]["chain"]
    assert sorted(name for dummy, name in vm.bitmaps()) == sorted([manifests[-1]["bitmap"], manifests[-1]["full_bitmap"]])
    assert manifests[-1]["bitmap"] == "qemu-qmp-backup-%s-0002" % chain
    assert all(b["recording"] for b in vm.bitmaps().values())
    assert vm.jobs() == {} and vm.qmp("query-block-exports") == [] and not [n for n in vm.nodes() if n.startswith("qmpbk")]
    assert not glob.glob(os.path.join(workdir, "backups", "**", "*.fleece.qcow2"), recursive=True)
    for index in range(4):
        restored = os.path.join(workdir, "restored%d.qcow2" % index)
        role.restore("disk0", restored, point="%s/%d" % (chain, index))
        assert same_content(restored, refs[index]), index


def test_pull_mode_failure_gives_the_bitmap_back(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    full = role.backup(backup_mode="pull")
    vm.guest_write("vdisk0", 0, 3 * MiB, 0x71)
    name = "qemu-qmp-backup-%s" % full["chain"]
    before = role.files()
    # The reader cannot write its image: the backup fails after QEMU froze the bitmap.
    outcome = role.run(backup_mode="pull", backup_qemu_img="/bin/false")
    assert outcome["rc"] != 0
    assert role.files() == before
    bitmaps = vm.bitmaps()
    assert sorted(n for dummy, n in bitmaps) == [name, name + "-full"]
    assert bitmaps[("disk0", name)]["recording"] is True and bitmaps[("disk0", name)]["count"] == 3 * MiB
    assert vm.jobs() == {} and vm.qmp("query-block-exports") == []
    # The next incremental copies it all.
    retry = role.backup(backup_mode="pull")
    assert retry["level"] == "incremental" and retry["disks"][0]["bytes_copied"] == 3 * MiB


def test_guest_agent_freezes_only_while_the_backup_starts(disk_vm, workdir, ansible):
    from harness import FakeGuestAgent  # pylint: disable=import-outside-toplevel
    agent = FakeGuestAgent(os.path.join(workdir, "qga.sock"))
    agent.start()
    role = BackupRole(ansible, disk_vm, os.path.join(workdir, "backups"))
    outcome = role.run(backup_guest_agent_socket=os.path.join(workdir, "qga.sock"))
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    assert [c for c in agent.commands if c != "guest-sync"] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    # Frozen for the transaction only: thawed before the jobs were followed.
    tasks = [r["task"].split(" : ")[-1] for r in outcome["records"]]
    assert tasks.index("Thaw the guest's file systems") < tasks.index("Show the backup's progress")


def test_max_age_makes_a_second_run_unchanged(disk_vm, workdir, ansible):
    role = BackupRole(ansible, disk_vm, os.path.join(workdir, "backups"))
    first = role.run(backup_max_age=3600)
    assert first["rc"] == 0 and first["result"]["skipped"] is False
    second = role.run(backup_max_age=3600)
    assert second["rc"] == 0 and second["result"]["skipped"] is True
    assert not any(r["result"].get("changed") for r in second["records"] if r["status"] == "ok")
    assert len(role.manifests()) == 1
