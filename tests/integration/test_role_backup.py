# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qemu.qmp.backup role: chains that restore exactly, and faults that lose nothing."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time

import pytest

from backup_helpers import MiB, reference_copy, same_content

from ansible_collections.qemu.qmp.plugins.module_utils.backup_host import human
from harness import disk_args, make_image

SIZE = 64 * MiB
SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "roles", "backup", "files", "manifest.schema.json")
PREFIX = "qemu-qmp-backup"


class BackupRole:
    def __init__(self, ansible, vm, root, name="vm1"):
        self.ansible = ansible
        self.vm = vm
        self.root = root
        self.name = name

    @property
    def folder(self):
        return os.path.join(self.root, self.name)

    def variables(self, **variables):
        base = {"backup_qmp_socket": self.vm.socket, "backup_name": self.name, "backup_dir": self.root,
                "backup_poll_interval": 1}
        base.update(variables)
        return base

    @staticmethod
    def play(entry):
        fact = {"restore": "backup_restore_result", "verify": "backup_verify_result"}.get(entry, "backup_result")
        return fact, [{"hosts": "localhost", "gather_facts": False, "tasks": [
            {"name": "role", "ansible.builtin.include_role": {"name": "qemu.qmp.backup", "tasks_from": entry}},
            {"name": "result", "ansible.builtin.debug": {"var": fact}}]}]

    def run(self, entry="main", env=None, args=None, **variables):
        fact, play = self.play(entry)
        records, proc = self.ansible.playbook(json.dumps(play), extra_vars=self.variables(**variables), env=env,
                                              args=args)
        result = next((r["result"] for r in records if r["task"] == "result"), {})
        return {"rc": proc.returncode, "records": records, "stdout": proc.stdout, "stderr": proc.stderr,
                "result": result.get(fact),
                "failed": [r["result"].get("msg", "") for r in records if r["status"] == "failed"],
                "engine": next((r["result"] for r in records if r["action"] == "qemu.qmp.qmp_backup_chain"), {})}

    def start(self, entry="main", env=None, **variables):
        """Start the role in the background (its own process group); returns the Popen."""
        fact, play = self.play(entry)
        path = os.path.join(self.ansible.workdir, "bg-%d.yml" % time.monotonic_ns())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(play))
        cmd = ["ansible-playbook", "-i", "localhost,", "-c", "local", path]
        for key, value in self.variables(**variables).items():
            cmd += ["-e", json.dumps({key: value})]
        run_env = self.ansible.env(path + ".jsonl")
        run_env.update(env or {})
        return subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def backup(self, **variables):
        outcome = self.run(**variables)
        assert outcome["rc"] == 0, outcome["stdout"][-3000:]
        return outcome["result"]

    def restore(self, disk, output, point="latest", **variables):
        outcome = self.run(entry="restore", backup_restore_disk=disk, backup_restore_output=output,
                           backup_restore_point=point, **variables)
        assert outcome["rc"] == 0, outcome["stdout"][-3000:]
        return outcome["result"]

    def manifests(self):
        return sorted(glob.glob(os.path.join(self.folder, "*", "*.json")))

    def files(self):
        return sorted(os.path.relpath(p, self.folder) for p in glob.glob(os.path.join(self.folder, "**"), recursive=True)
                      if os.path.isfile(p) and not os.path.basename(p).startswith(".lock"))

    def holder_pid(self):
        """The pid of the run holding the VM's backup lock, or None."""
        try:
            with open(os.path.join(self.folder, ".lock"), encoding="utf-8") as handle:
                return json.loads(handle.read() or "{}").get("pid")
        except (OSError, ValueError):
            return None


def check_manifest(path):
    import jsonschema  # pylint: disable=import-outside-toplevel
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    with open(SCHEMA, encoding="utf-8") as handle:
        jsonschema.Draft202012Validator(json.load(handle)).validate(manifest)
    return manifest


def chain_bitmaps(vm):
    return sorted(name for dummy, name in vm.bitmaps() if name.startswith(PREFIX))


def since(chain, sequence):
    return "%s-%s-%04d" % (PREFIX, chain, sequence)


def assert_nothing_left(vm, role):
    """No job, node, export of the collection in QEMU; no unfinished backup on disk."""
    assert not [j for j in vm.jobs() if j.startswith("qemu-qmp-backup-")], vm.jobs()
    assert not [n for n in vm.nodes() if n.startswith("qmpbk")]
    assert vm.qmp("query-block-exports") == []
    assert not glob.glob(os.path.join(role.folder, "*", "*", ".unfinished"))


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.05)


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
    assert [m["generation"] for m in manifests] == [1, 2, 3, 4]
    chain = manifests[0]["chain"]
    # Incrementals copied exactly what the guest wrote since the backup before (64 KiB-aligned writes).
    assert [m["disks"][0]["bytes_copied"] for m in manifests[1:]] == [2 * MiB, 2 * MiB, 6 * MiB]
    # Each point has its own bitmap; only the newest one and the chain's full bitmap are left, persistent.
    assert chain_bitmaps(vm) == sorted([since(chain, 3), "%s-%s-full" % (PREFIX, chain)])
    assert all(vm.bitmaps()[("disk0", name)]["persistent"] for name in chain_bitmaps(vm))
    assert_nothing_left(vm, role)

    for index in range(4):
        restored = os.path.join(workdir, "restored%d.qcow2" % index)
        out = role.restore("disk0", restored, point="%s/%d" % (chain, index))
        assert out["sequence"] == index
        assert len(out["verified"]) == [1, 2, 3, 2][index]  # the point and what it is based on
        assert same_content(restored, refs[index]), index
    latest = role.restore("disk0", os.path.join(workdir, "latest.qcow2"))
    assert latest["level"] == "differential"
    assert same_content(os.path.join(workdir, "latest.qcow2"), refs[3])
    verify = role.run(entry="verify")
    assert verify["rc"] == 0 and len(verify["result"]["verified"]) == 4, verify["stdout"][-2000:]


def test_broken_chain_starts_a_new_full(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    first = role.backup()
    vm.qmp("block-dirty-bitmap-remove", {"node": "disk0", "name": since(first["chain"], 0)})
    outcome = role.run(backup_level="incremental")
    assert outcome["rc"] == 0
    result = outcome["result"]
    assert result["level"] == "full" and result["chain"] != first["chain"]
    assert any("bitmap %s" % since(first["chain"], 0) in w and "is missing on disk disk0" in w
               for w in result["warnings"]), result["warnings"]
    assert "[WARNING]: starting a new full chain" in outcome["stderr"]
    # The old chain's remaining bitmap is gone: only the new chain's bitmaps record.
    assert chain_bitmaps(vm) == sorted([since(result["chain"], 0), "%s-%s-full" % (PREFIX, result["chain"])])


def test_retention_keeps_the_newest_chains(disk_vm, workdir, ansible):
    role = BackupRole(ansible, disk_vm, os.path.join(workdir, "backups"))
    chains = [role.backup(backup_level="full", backup_keep_chains=2)["chain"] for dummy in range(3)]
    assert len(set(chains)) == 3
    assert sorted(os.listdir(role.folder)) == sorted([".lock"] + chains[1:])


def test_clock_set_back_keeps_the_new_full(disk_vm, workdir, ansible):
    """A chain taken while the host's clock ran a year ahead; the clock is set right; the next full is kept."""
    faketime = shutil.which("faketime")
    if faketime is None:
        pytest.skip("faketime is not installed")
    role = BackupRole(ansible, disk_vm, os.path.join(workdir, "backups"))
    ahead = role.run(backup_level="full", args=None, env={"FAKETIME": "+365d", "LD_PRELOAD": _libfaketime()})
    assert ahead["rc"] == 0, ahead["stdout"][-2000:]
    assert ahead["result"]["chain"] > time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() + 300 * 86400))
    # A due backup despite a newest backup "finished" a year from now, with a warning.
    outcome = role.run(backup_level="full", backup_keep_chains=1, backup_max_age=3600)
    assert outcome["rc"] == 0, outcome["stdout"][-2000:]
    now = outcome["result"]
    assert now["skipped"] is False and any("clock was set back" in w for w in now["warnings"])
    assert now["chain"] < ahead["result"]["chain"]
    # Kept: it is the newest by the order backups were taken in; the chain from the future went.
    assert sorted(os.listdir(role.folder)) == [".lock", now["chain"]]
    assert now["removed_chains"] == [ahead["result"]["chain"]]


def _libfaketime():
    found = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    return found[0] if found else ""


def test_job_failure_keeps_nothing_and_the_next_incremental_restores(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    vm.guest_write("vdisk0", 0, 4 * MiB, 0x31)
    full = role.backup()
    for offset in range(8 * MiB, 64 * MiB, 8 * MiB):
        vm.guest_write("vdisk0", offset, MiB, 0x32)
    before = role.files()
    bitmap = vm.bitmaps()[("disk0", since(full["chain"], 0))]["count"]

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
    assert any("incremental backup 1 of chain %s of vm1 failed; nothing of it was kept" % full["chain"] in m
               and "disk disk0: Operation canceled" in m for m in outcome["failed"]), outcome["failed"]
    assert role.files() == before  # no manifest, no image of the failed backup
    assert vm.bitmaps()[("disk0", since(full["chain"], 0))]["count"] == bitmap
    assert chain_bitmaps(vm) == sorted([since(full["chain"], 0), "%s-%s-full" % (PREFIX, full["chain"])])
    assert_nothing_left(vm, role)

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


def fill(folder, leave=2 * MiB):
    filler = os.path.join(folder, "filler")
    stat = os.statvfs(folder)
    with open(filler, "wb") as handle:
        handle.write(b"\xff" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def test_full_target_directory(disk_vm, workdir, small_dir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, small_dir)
    vm.guest_write("vdisk0", 0, 8 * MiB, 0x41)
    full = role.backup()
    before = role.files()
    vm.guest_write("vdisk0", 16 * MiB, 8 * MiB, 0x42)
    bitmap = vm.bitmaps()[("disk0", since(full["chain"], 0))]["count"]
    filler = fill(small_dir)  # something else fills the folder up
    outcome = role.run()
    assert outcome["rc"] != 0
    assert any("No space left on device" in m for m in outcome["failed"]), outcome["failed"]
    assert [f for f in role.files() if f != "../filler"] == before
    assert vm.bitmaps()[("disk0", since(full["chain"], 0))]["count"] == bitmap
    # Room again: the chain goes on, with no new full.
    os.unlink(filler)
    retry = role.backup()
    assert retry["level"] == "incremental" and retry["chain"] == full["chain"]
    ref = reference_copy(vm, "disk0", os.path.join(workdir, "ref.qcow2"), SIZE)
    role.restore("disk0", os.path.join(workdir, "restored.qcow2"))
    assert same_content(os.path.join(workdir, "restored.qcow2"), ref)


# A qemu-img that, when the engine checks the new image (the step after QEMU's job), does the fault
# first; every other call goes to the real qemu-img.
FAULTY_QEMU_IMG = """#!/bin/sh
if [ "$1" = check ]; then
    image="$(eval echo \\${$#})"
    case "$FAULT" in
        check) echo "qemu-img: injected: image corrupt" >&2; exit 3 ;;
        checksum) qemu-img "$@" || exit $?; rm -f "$image"; exit 0 ;;
        manifest) mkdir "$(dirname "$image").json" ;;
        disk-full) head -c "$(( $(stat -f -c '%a*%S' "$(dirname "$image")") ))" /dev/zero \\
                     > "$(dirname "$(dirname "$(dirname "$(dirname "$image")")")")/filler" 2>/dev/null ;;
        killed) kill -KILL "$PPID"; sleep 5 ;;
    esac
fi
exec qemu-img "$@"
"""


@pytest.mark.parametrize("fault", ["check", "checksum", "manifest", "disk-full", "killed"])
def test_a_fault_after_the_job_loses_no_write(vm_factory, workdir, small_dir, ansible, fault):
    """The job succeeded; then a step of the commit fails, or the run is killed. The bitmap keeps every bit: the next
    incremental copies all writes since the last committed backup, and restores equal to QEMU's own copy."""
    vm = vm_factory(args=disk_args(make_image(os.path.join(workdir, "disk0.qcow2"), "64M")))
    wrapper = os.path.join(workdir, "qemu-img")
    with open(wrapper, "w", encoding="utf-8") as handle:
        handle.write(FAULTY_QEMU_IMG)
    os.chmod(wrapper, 0o755)
    role = BackupRole(ansible, vm, small_dir)
    vm.guest_write("vdisk0", 0, 2 * MiB, 0x51)
    full = role.backup()
    vm.guest_write("vdisk0", 8 * MiB, 3 * MiB, 0x52)
    before = role.files()

    outcome = role.run(backup_qemu_img=wrapper, env={"FAULT": fault})
    assert outcome["rc"] != 0
    expected = {"check": "qemu-img: injected: image corrupt",
                "checksum": "computing the checksums of image",
                "manifest": "writing the manifest",
                "disk-full": "No space left on device",
                "killed": "ended without a result"}[fault]
    assert any(expected in m for m in outcome["failed"]), outcome["failed"]
    if os.path.exists(os.path.join(small_dir, "filler")):
        os.unlink(os.path.join(small_dir, "filler"))
    if fault == "manifest":
        shutil.rmtree(glob.glob(os.path.join(role.folder, "*", "0001-incremental.json"))[0])
    if fault != "killed":
        assert role.files() == before, fault  # nothing of the failed backup is kept
        assert_nothing_left(vm, role)
    # Every write since the full backup is still marked, whatever happened.
    assert vm.bitmaps()[("disk0", since(full["chain"], 0))]["count"] == 3 * MiB

    vm.guest_write("vdisk0", 20 * MiB, MiB, 0x53)
    retry = role.run()
    assert retry["rc"] == 0, retry["stdout"][-3000:]
    result = retry["result"]
    assert result["level"] == "incremental" and result["chain"] == full["chain"] and result["sequence"] == 1
    assert result["disks"][0]["bytes_copied"] == 4 * MiB
    if fault == "killed":
        assert "unfinished backup %s/0001-incremental" % full["chain"] in result["cleaned"]
    assert_nothing_left(vm, role)
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
    assert not [name for dummy, name in vm.bitmaps() if full["chain"] in name]
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
    # Only the chain's current bitmaps are left, all recording; no fleece, export, job or NBD server.
    chain = manifests[0]["chain"]
    assert chain_bitmaps(vm) == sorted([manifests[-1]["bitmap"], manifests[-1]["full_bitmap"]])
    assert manifests[-1]["bitmap"] == since(chain, 3)
    assert all(b["recording"] for b in vm.bitmaps().values())
    assert_nothing_left(vm, role)
    assert not glob.glob(os.path.join(role.folder, "**", "*.fleece.qcow2"), recursive=True)
    for index in range(4):
        restored = os.path.join(workdir, "restored%d.qcow2" % index)
        role.restore("disk0", restored, point="%s/%d" % (chain, index))
        assert same_content(restored, refs[index]), index


def test_pull_mode_failure_gives_the_bitmap_back(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    full = role.backup(backup_mode="pull")
    vm.guest_write("vdisk0", 0, 3 * MiB, 0x71)
    name = since(full["chain"], 0)
    before = role.files()
    # The reader cannot write its image: the backup fails after QEMU froze its copy of the bitmap.
    outcome = role.run(backup_mode="pull", backup_qemu_img="/bin/false")
    assert outcome["rc"] != 0
    assert any("creating image" in m and "false failed" in m for m in outcome["failed"]), outcome["failed"]
    assert role.files() == before
    bitmaps = vm.bitmaps()
    assert chain_bitmaps(vm) == sorted([name, "%s-%s-full" % (PREFIX, full["chain"])])
    assert bitmaps[("disk0", name)]["recording"] is True and bitmaps[("disk0", name)]["count"] == 3 * MiB
    assert_nothing_left(vm, role)
    # The next incremental copies it all.
    retry = role.backup(backup_mode="pull")
    assert retry["level"] == "incremental" and retry["disks"][0]["bytes_copied"] == 3 * MiB


def test_guest_agent_freezes_only_while_the_backup_starts(disk_vm, workdir, ansible):
    from harness import FakeGuestAgent  # pylint: disable=import-outside-toplevel
    agent = FakeGuestAgent(os.path.join(workdir, "qga.sock"))
    agent.start()
    role = BackupRole(ansible, disk_vm, os.path.join(workdir, "backups"))
    disk_vm.guest_write("vdisk0", 0, 4 * MiB, 0x21)
    begin = time.monotonic()
    # Throttled: the job lasts seconds; the guest is frozen for the instant it starts only.
    outcome = role.run(backup_guest_agent_socket=os.path.join(workdir, "qga.sock"), backup_speed=16 * MiB)
    took = time.monotonic() - begin
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    commands = [(c, t) for c, t in zip(agent.commands, agent.times) if c != "guest-sync"]
    assert [c for c, dummy in commands] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    frozen = commands[1][1] - commands[0][1]
    assert frozen < 1.0 < took, (frozen, took)


def test_max_age_makes_a_second_run_unchanged(disk_vm, workdir, ansible):
    role = BackupRole(ansible, disk_vm, os.path.join(workdir, "backups"))
    # As -e gives it, a string: the role converts it.
    first = role.run(backup_max_age=3600, args=["-e", "backup_poll_interval=1"])
    assert first["rc"] == 0 and first["result"]["skipped"] is False
    second = role.run(backup_max_age=3600)
    assert second["rc"] == 0 and second["result"]["skipped"] is True
    assert not any(r["result"].get("changed") for r in second["records"] if r["status"] == "ok")
    assert len(role.manifests()) == 1


def start_paused(role, vm, **variables):
    """Start the role in the background; once its job runs in QEMU, pause the job (resume it with job-resume)."""
    variables.setdefault("backup_speed", 256 * 1024)  # slow enough to be caught running
    proc = role.start(**variables)
    wait_for(lambda: "qemu-qmp-backup-disk0" in vm.jobs() and role.holder_pid(), what="the backup's job")
    vm.qmp("job-pause", {"id": "qemu-qmp-backup-disk0"})
    vm.qmp("block-job-set-speed", {"device": "qemu-qmp-backup-disk0", "speed": 0})
    return proc


def test_two_runs_at_once(disk_vm, workdir, ansible):
    """A second run refuses at once, naming the first; a third waits for the lock; every point restores."""
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    vm.guest_write("vdisk0", 0, 8 * MiB, 0x81)
    first = start_paused(role, vm)
    pid = role.holder_pid()
    refused = role.run()
    waiting = threading.Thread(target=lambda: waited.update(role.run(backup_lock_timeout=120)))
    waited = {}
    waiting.start()
    time.sleep(2)
    assert not waited  # it waits while the first run holds the lock
    vm.qmp("job-resume", {"id": "qemu-qmp-backup-disk0"})
    output = first.communicate(timeout=120)[0]
    waiting.join(120)
    assert first.returncode == 0, output[-3000:]
    assert refused["rc"] != 0
    assert any("a backup of %s cannot start: a backup (pid %d on " % (role.folder, pid) in m and "holds its lock" in m
               for m in refused["failed"]), refused["failed"]
    assert waited["rc"] == 0, waited["stdout"][-3000:]
    assert (waited["result"]["level"], waited["result"]["sequence"]) == ("incremental", 1)
    assert len(role.manifests()) == 2
    ref = reference_copy(vm, "disk0", os.path.join(workdir, "ref.qcow2"), SIZE)
    chain = waited["result"]["chain"]
    for point in ("%s/0" % chain, "%s/1" % chain):
        restored = os.path.join(workdir, point.replace("/", "-") + ".qcow2")
        role.restore("disk0", restored, point=point)
        assert same_content(restored, ref), point  # nothing was written between the two
    assert_nothing_left(vm, role)


def test_controller_or_run_killed_mid_job(disk_vm, workdir, ansible):
    """The controller is killed: the run on the host stops by itself and undoes itself. The run itself is
    killed: the next run cleans up after it. Either way the chain goes on and restores."""
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    vm.guest_write("vdisk0", 0, 2 * MiB, 0x91)
    full = role.backup()
    vm.guest_write("vdisk0", 16 * MiB, 8 * MiB, 0x92)
    before = role.files()

    controller = start_paused(role, vm, backup_controller_timeout=3, backup_poll_interval=0.2)
    os.killpg(controller.pid, signal.SIGKILL)
    controller.wait()
    # Nobody follows it any more: it stops, gives the bitmap back and removes its files.
    wait_for(lambda: role.holder_pid() is None and "qemu-qmp-backup-disk0" not in vm.jobs(), timeout=30,
             what="the abandoned run to undo itself")
    assert role.files() == before
    assert_nothing_left(vm, role)
    assert chain_bitmaps(vm) == sorted([since(full["chain"], 0), "%s-%s-full" % (PREFIX, full["chain"])])
    assert vm.bitmaps()[("disk0", since(full["chain"], 0))]["count"] == 8 * MiB

    runner = start_paused(role, vm)
    os.kill(role.holder_pid(), signal.SIGKILL)
    output = runner.communicate(timeout=60)[0]
    assert runner.returncode != 0 and "ended without a result" in output, output[-3000:]
    assert "qemu-qmp-backup-disk0" in vm.jobs()  # the killed run's job is still in QEMU

    retry = role.run()
    assert retry["rc"] == 0, retry["stdout"][-3000:]
    result = retry["result"]
    assert (result["level"], result["chain"], result["sequence"]) == ("incremental", full["chain"], 1)
    assert "job qemu-qmp-backup-disk0" in result["cleaned"] and "block node qmpbk0" in result["cleaned"]
    assert "unfinished backup %s/0001-incremental" % full["chain"] in result["cleaned"]
    assert result["disks"][0]["bytes_copied"] == 8 * MiB
    assert_nothing_left(vm, role)
    ref = reference_copy(vm, "disk0", os.path.join(workdir, "ref.qcow2"), SIZE)
    role.restore("disk0", os.path.join(workdir, "restored.qcow2"))
    assert same_content(os.path.join(workdir, "restored.qcow2"), ref)


def image_data_offset(image):
    """A file offset of guest data the image itself holds."""
    out = subprocess.run(["qemu-img", "map", "--output=json", image], capture_output=True, text=True, check=True)
    extent = [e for e in json.loads(out.stdout) if e.get("data") and e.get("depth", 0) == 0 and "offset" in e][0]
    return extent["offset"], extent["start"]


def flip(path, offset):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def three_points(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    for index, offset in enumerate((0, 8 * MiB, 16 * MiB)):
        vm.guest_write("vdisk0", offset, MiB, 0xa0 + index)
        role.backup()
    chain = os.listdir(role.folder)
    chain = [c for c in chain if not c.startswith(".")][0]
    return role, os.path.join(role.folder, chain)


@pytest.mark.parametrize("damage", ["flip-full", "flip-incremental", "truncate-middle", "delete-manifest",
                                    "truncate-manifest"])
def test_damage_is_found_and_named(three_points, workdir, damage):
    role, chain_dir = three_points
    image = {"flip-full": "0000-full/disk0.qcow2", "flip-incremental": "0002-incremental/disk0.qcow2",
             "truncate-middle": "0001-incremental/disk0.qcow2"}.get(damage)
    if damage.startswith("flip"):
        offset, guest = image_data_offset(os.path.join(chain_dir, image))
        flip(os.path.join(chain_dir, image), offset + 100)
        named = os.path.join(chain_dir, image)
    elif damage == "truncate-middle":
        path = os.path.join(chain_dir, image)
        os.truncate(path, os.path.getsize(path) - 65536)
        named = path
    elif damage == "delete-manifest":
        named = os.path.join(chain_dir, "0001-incremental.json")
        os.unlink(named)
    else:
        named = os.path.join(chain_dir, "0002-incremental.json")
        os.truncate(named, os.path.getsize(named) // 2)

    restore = role.run(entry="restore", backup_restore_disk="disk0",
                       backup_restore_output=os.path.join(workdir, "out.qcow2"))
    assert restore["rc"] != 0 and any(named in m for m in restore["failed"]), (named, restore["failed"])
    assert not os.path.exists(os.path.join(workdir, "out.qcow2"))
    assert not glob.glob(os.path.join(workdir, ".out.qcow2.*"))
    verify = role.run(entry="verify")
    assert verify["rc"] != 0 and any(named in m for m in verify["failed"]), (named, verify["failed"])
    if damage.startswith("flip"):
        # Where: the guest bytes of the disk that image holds there.
        assert any("guest data of disk disk0 at %s" % human(guest) in m for m in verify["failed"]), verify["failed"]

    # The next backup does not build on a damaged chain, and deletes nothing of it.
    files = sorted(os.listdir(chain_dir))
    again = role.run()
    assert again["rc"] == 0, again["stdout"][-3000:]
    assert again["result"]["level"] == "full" and any(os.path.basename(chain_dir) in w for w in again["result"]["warnings"])
    assert sorted(os.listdir(chain_dir)) == files


def test_disk_rolled_back_to_an_older_copy_starts_a_new_chain(vm_factory, workdir, ansible):
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    vm = vm_factory(args=disk_args(image))
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    vm.guest_write("vdisk0", 0, MiB, 0xb1)
    role.backup()
    vm.qmp("quit")
    vm.wait_exit()
    shutil.copy(image, image + ".copy")  # carries the chain's bitmaps as they were then
    vm = vm_factory(name="vm2", args=disk_args(image))
    role.vm = vm
    vm.guest_write("vdisk0", 8 * MiB, MiB, 0xb2)
    assert role.backup()["level"] == "incremental"
    vm.qmp("quit")
    vm.wait_exit()
    os.replace(image + ".copy", image)  # rolled back
    vm = vm_factory(name="vm3", args=disk_args(image))
    role.vm = vm
    vm.guest_write("vdisk0", 20 * MiB, MiB, 0xb3)
    outcome = role.run()
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    assert outcome["result"]["level"] == "full"
    assert any("rolled back to an older copy" in w for w in outcome["result"]["warnings"]), outcome["result"]["warnings"]
    ref = reference_copy(vm, "disk0", os.path.join(workdir, "ref.qcow2"), SIZE)
    role.restore("disk0", os.path.join(workdir, "restored.qcow2"))
    assert same_content(os.path.join(workdir, "restored.qcow2"), ref)


def tree_rss(pid):
    """Resident memory (bytes) of ansible-playbook: its main process and its forks (not the short poll commands)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, encoding="utf-8") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            with open("/proc/%d/cmdline" % current, "rb") as handle:
                if b"ansible-playbook" not in handle.read():
                    continue
        except OSError:
            continue
        total += rss(current)
    return total


def rss(pid):
    try:
        with open("/proc/%d/status" % pid, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_a_thousand_polls_show_progress_in_constant_memory(disk_vm, workdir, ansible, record_property):
    if disk_vm.qmp("query-version")["qemu"]["major"] != 7:
        pytest.skip("the controller's loop does not depend on QEMU's version: followed once, with QEMU 7.2")
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    vm.guest_write("vdisk0", 0, 8 * MiB, 0xc1)
    proc = start_paused(role, vm, backup_poll_interval=0.01)  # it goes on once the polls are counted
    polls, memory = 0, {}
    for line in proc.stdout:
        if line.startswith("localhost: full backup 0 of chain") and "disk0" in line:
            polls += 1
            if polls in (10, 1000):
                memory[polls] = (tree_rss(proc.pid), rss(role.holder_pid()))
            if polls == 1000:
                vm.qmp("job-resume", {"id": "qemu-qmp-backup-disk0"})
    proc.wait(60)
    assert proc.returncode == 0 and polls >= 1000, polls
    controller_growth = memory[1000][0] - memory[10][0]
    worker_growth = memory[1000][1] - memory[10][1]
    record_property("controller_rss", memory)
    print("controller RSS at poll 10: %d KiB, at poll 1000: %d KiB; host-side run: %d KiB, %d KiB"
          % (memory[10][0] // 1024, memory[1000][0] // 1024, memory[10][1] // 1024, memory[1000][1] // 1024))
    assert controller_growth < 4 * MiB and worker_growth < 2 * MiB, memory
    assert len(role.manifests()) == 1


def playbook(role, name, variables=None, args=None):
    """Run one of the collection's playbooks: (the engine's result, what the playbook showed, the process)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "playbooks", name), encoding="utf-8") as handle:
        text = handle.read()
    records, proc = role.ansible.playbook(text, extra_vars=role.variables(**(variables or {})), args=args)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = next(r["result"] for r in records if r["action"] == "qemu.qmp.qmp_backup_chain")
    shown = next(r["result"]["msg"] for r in records if r["task"].startswith("Show what was"))
    return result, shown


def test_backup_playbook_shows_bytes_written_and_its_check_mode_the_plan(disk_vm, workdir, ansible):
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    full, shown = playbook(role, "backup.yml")
    # The job of a full backup goes through the whole disk; the image holds only what is allocated.
    manifest = check_manifest(full["manifest"])
    image = os.path.join(role.folder, full["chain"], full["disks"][0]["image"])
    allocated = os.stat(image).st_blocks * 512
    assert full["disks"][0]["bytes_copied"] == full["bytes_copied"] == SIZE
    assert full["disks"][0]["bytes_written"] == full["bytes_written"] == manifest["disks"][0]["bytes_written"] \
        == allocated
    assert 0 < full["bytes_written"] < SIZE // 16, full["bytes_written"]
    assert shown == full["msg"]
    assert shown.startswith("full backup 0 of chain %s in " % full["chain"])
    assert shown.endswith(": disk0 %s written (64.0 MiB copied by the job, zeros included)" % human(allocated))
    vm.guest_write("vdisk0", 4 * MiB, 3 * MiB, 0xd1)

    def state():
        return (vm.bitmaps(), sorted(vm.nodes()), vm.jobs(), role.files(),
                sorted(os.listdir(os.path.join(role.folder, full["chain"]))))
    before = state()
    plan, shown = playbook(role, "backup.yml", args=["--check"])
    assert state() == before
    assert (plan["level"], plan["chain"], plan["sequence"], plan["bytes_to_copy"]) == \
        ("incremental", full["chain"], 1, 3 * MiB)
    assert plan["bitmaps"] == {"read": since(full["chain"], 0), "add": [since(full["chain"], 1)],
                               "drop_after_commit": [since(full["chain"], 0)]}
    assert shown == "would take incremental backup 1 of chain %s (based on backup 0): disk0 3.0 MiB to copy" \
        % full["chain"]


@pytest.fixture
def one_point(disk_vm, workdir, ansible):
    """A VM with one full backup, and QEMU's own copy of the disk at that point."""
    vm = disk_vm
    role = BackupRole(ansible, vm, os.path.join(workdir, "backups"))
    vm.guest_write("vdisk0", 2 * MiB, 3 * MiB, 0x5a)
    role.backup()
    return role, reference_copy(vm, "disk0", os.path.join(workdir, "ref.qcow2"), SIZE)


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("target", ["victim", "missing"])
def test_restore_refuses_a_symlink_at_the_output_even_with_force(one_point, workdir, target):
    """Nothing is written through the symlink, and the symlink stays, with or without --check."""
    role, dummy = one_point
    victim = os.path.join(workdir, target)
    if target == "victim":
        with open(victim, "wb") as handle:
            handle.write(b"not to be overwritten\n" * 1000)
        before = read_bytes(victim)
    output = os.path.join(workdir, "restored.qcow2")
    os.symlink(victim, output)
    for args in (["--check"], None):
        restore = role.run(entry="restore", backup_restore_disk="disk0", backup_restore_output=output,
                           backup_restore_force=True, args=args)
        assert restore["rc"] != 0, (args, restore["stdout"][-3000:])
        assert any("output %s is a symlink" % output in m for m in restore["failed"]), (args, restore["failed"])
        assert os.path.islink(output) and os.readlink(output) == victim
        if target == "victim":
            assert read_bytes(victim) == before
        else:
            assert not os.path.lexists(victim)
    assert not glob.glob(os.path.join(workdir, ".restored.qcow2.*"))


def test_restored_image_has_the_backups_mode(one_point, workdir):
    role, ref = one_point
    output = os.path.join(workdir, "restored.qcow2")
    role.restore("disk0", output)
    # The mode of the files the backup writes (its manifest and its images).
    assert stat.S_IMODE(os.lstat(output).st_mode) == stat.S_IMODE(os.stat(role.manifests()[0]).st_mode) == 0o640
    images = glob.glob(os.path.join(role.folder, "**", "*.qcow2"), recursive=True)
    assert images and [stat.S_IMODE(os.stat(image).st_mode) for image in images] == [0o640] * len(images)
    assert not os.path.islink(output)
    assert same_content(output, ref)


# A qemu-img whose check of the restored image fails: the restore stops after writing the whole image.
FAILING_CHECK = """#!/bin/sh
if [ "$1" = check ]; then echo "qemu-img: injected: image corrupt" >&2; exit 3; fi
exec qemu-img "$@"
"""


def test_forced_restore_replaces_a_regular_file_and_the_next_restore_is_unchanged(one_point, workdir):
    """Without force an existing output with other data is refused; a failed forced restore leaves it as it was
    and no temporary file; a forced restore replaces it. Then the output holds the point: check mode (even with
    force) and a real run find so, and write nothing."""
    role, ref = one_point
    output = os.path.join(workdir, "restored.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", output, str(SIZE)], check=True)
    old = read_bytes(output)
    refused = role.run(entry="restore", backup_restore_disk="disk0", backup_restore_output=output)
    assert refused["rc"] != 0 and any(
        "%s exists and does not hold disk disk0 as of backup " % output in m
        and "its data differs from the backup's at guest offset 2.0 MiB" in m and "set force" in m
        for m in refused["failed"]), refused["failed"]
    wrapper = os.path.join(workdir, "qemu-img")
    with open(wrapper, "w", encoding="utf-8") as handle:
        handle.write(FAILING_CHECK)
    os.chmod(wrapper, 0o755)
    failed = role.run(entry="restore", backup_restore_disk="disk0", backup_restore_output=output,
                      backup_restore_force=True, backup_qemu_img=wrapper)
    assert failed["rc"] != 0 and any("injected: image corrupt" in m for m in failed["failed"]), failed["failed"]
    assert read_bytes(output) == old
    assert not glob.glob(os.path.join(workdir, ".restored.qcow2.*"))

    role.restore("disk0", output, backup_restore_force=True)
    assert not os.path.islink(output) and same_content(output, ref)
    assert stat.S_IMODE(os.stat(output).st_mode) == 0o640
    assert not glob.glob(os.path.join(workdir, ".restored.qcow2.*"))

    before = os.stat(output)
    point = "disk disk0 as of backup %s/0000-full" % os.path.basename(os.path.dirname(role.manifests()[0]))
    for args, force in ((["--check"], True), (None, False)):
        again, shown = playbook(role, "restore.yml", {"backup_restore_disk": "disk0", "backup_restore_output": output,
                                                      "backup_restore_force": force}, args=args)
        assert not again["changed"], (args, again)
        assert again["msg"] == "%s already holds %s: nothing to write" % (output, point)
        assert shown.endswith("was already in %s: nothing written" % output), shown
        after = os.stat(output)
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert not glob.glob(os.path.join(workdir, ".restored.qcow2.*"))
