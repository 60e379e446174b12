# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backups for their whole life: incremental-forever chains pruned by a retention policy over sixty simulated
days, prunes killed at each step, and the catalog."""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from backup_helpers import MiB, qemu_img, reference_copy
from engine_inprocess import PRUNE_STEPS, Clock, run_module

from ansible_collections.qemu.qmp.plugins.module_utils.backup_retention import select
from harness import ROOT, disk_args, make_image, qemu_binary
from test_role_backup import BackupRole
from test_role_migrate import RECORD, SLOTS
from test_role_vm import RoleVM

SIZE = 8 * MiB
QEMU_10 = os.path.join(ROOT, ".cache", "qemu10", "bin", "qemu-system-x86_64")
IN_THE_QEMU_10_LANE = os.path.realpath(qemu_binary()) == os.path.realpath(QEMU_10)
# Pruning and restoring are qemu-img's work on the backup folder, the same qemu-img in both lanes: they run in
# the QEMU 7.2 lane. Live restore runs in both: a 64 MiB disk with QEMU 7.2, a 4 GiB one with QEMU 10.0.
prune_lane = pytest.mark.skipif(IN_THE_QEMU_10_LANE, reason="qemu-img's work on backups runs in the QEMU 7.2 lane")
CLUSTER = 64 * 1024
UTC = datetime.timezone.utc
POLICY = {"keep_last": 2, "keep_hourly": 3, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 2}


@pytest.fixture(autouse=True)
def no_qemu_left(workdir):
    """The VMs these tests start with the roles are stopped at the end even when a test fails: a guest left
    running would slow every test after it."""
    yield
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]).startswith(b"qemu-system") and any(workdir.encode() in a for a in argv):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


@pytest.fixture
def utc_host(monkeypatch):
    """The policy's periods are the host's local time: pin it, so the expected periods are known."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def small_vm(vm_factory, workdir):
    return vm_factory(args=disk_args(make_image(os.path.join(workdir, "disk0.qcow2"), str(SIZE))))


def digest_of(image, workdir):
    """SHA-256 of the disk's data as the guest sees it (the image flattened with its backing chain)."""
    raw = os.path.join(workdir, "flat.raw")
    result = qemu_img("convert", "-U", "-O", "raw", image, raw)
    assert result.returncode == 0, result.stderr
    with open(raw, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    os.unlink(raw)
    return digest


def reference_digest(vm, workdir):
    """The disk as it is now, copied by QEMU itself (a full backup job into a scratch image)."""
    path = reference_copy(vm, "disk0", os.path.join(workdir, "reference.qcow2"), SIZE)
    try:
        return digest_of(path, workdir)
    finally:
        os.unlink(path)


def manifests(folder):
    """{label: manifest} of every committed point under a VM's backup folder."""
    found = {}
    for path in glob.glob(os.path.join(folder, "*", "*.json")):
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        found["%s/%s" % (manifest["chain"], os.path.basename(path)[:-5])] = manifest
    return found


class Proof:
    """Restores kept points and compares each with its reference.

    A point holds its reference's data when it was proven so, or by induction: its own image files are the
    same as when it was proven (same inodes, sizes and times), and it is based on the same point, which holds
    its reference's data. So after a fold only the point that absorbed it is restored again."""

    def __init__(self, folder, workdir):
        self.folder = folder
        self.workdir = workdir
        self.proven = {}
        self.restores = 0

    def own_files(self, manifest):
        found = []
        for disk in manifest["disks"]:
            info = os.stat(os.path.join(self.folder, manifest["chain"], disk["image"]))
            found.append((disk["image"], info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(found)

    def check(self, references):
        found = manifests(self.folder)
        labels = dict(((m["chain"], m["sequence"]), l) for l, m in found.items())
        proven = {}
        for label, manifest in sorted(found.items(), key=lambda item: (item[1]["chain"], item[1]["sequence"])):
            base = None if manifest["based_on"] is None else labels[(manifest["chain"], manifest["based_on"])]
            key = (self.own_files(manifest), base)
            if self.proven.get(label) != key or (base is not None and base not in proven):
                top = os.path.join(self.folder, manifest["chain"], manifest["disks"][0]["image"])
                assert digest_of(top, self.workdir) == references[label], "point %s does not restore equal" % label
                self.restores += 1
            proven[label] = key
        self.proven = proven
        return found


def backup_args(vm, folder, **extra):
    args = {"socket": vm.socket, "dir": folder, "name": "vm1", "retention": POLICY, "poll_interval": 1}
    args.update(extra)
    return args


def moments():
    """Sixty days: a backup at 01:00 each day, and on every fifth day four more in the working hours (two in one
    hour, so the hourly rule has a duplicate to drop)."""
    start = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    for day in range(60):
        hours = [(1, 0)] + ([(10, 0), (11, 0), (12, 0), (12, 30)] if day % 5 == 2 else [])
        for hour, minute in hours:
            yield start + datetime.timedelta(days=day, hours=hour, minutes=minute)


@prune_lane
def test_sixty_days_of_incremental_forever_pruned_by_policy(small_vm, workdir, utc_host):
    vm = small_vm
    folder = os.path.join(workdir, "backups", "vm1")
    clock = Clock(None)
    references, finished, levels = {}, {}, []
    proof = Proof(folder, workdir)
    for index, moment in enumerate(moments()):
        clock.now = moment
        if index:
            vm.guest_write("vdisk0", (index * CLUSTER) % SIZE, CLUSTER, pattern=index % 251 + 1)
        before = set(manifests(folder))
        result = run_module(backup_args(vm, folder), clock=clock)
        assert not result.get("failed"), result.get("msg")
        label = "%s/%04d-%s" % (result["chain"], result["sequence"], result["level"])
        levels.append((result["level"], result["bytes_copied"]))
        references[label] = reference_digest(vm, workdir)
        finished[label] = moment
        # The kept set is what the policy's rules give for the points there were, the newest always kept.
        expected_rules = select([(l, finished[l]) for l in before | {label}], POLICY)
        expected = set(l for l, rule in expected_rules.items() if rule) | {label}
        found = proof.check(references)
        assert set(found) == expected, (moment, sorted(set(found) ^ expected))
        assert result["pruned"]["kept"] == dict((l, expected_rules.get(l) or "newest") for l in expected)
        for gone in set(finished) - expected:
            finished.pop(gone)
    # No full backup after the first: each incremental copied the one cluster written since the last.
    assert levels[0][0] == "full" and all(level == ("incremental", CLUSTER) for level in levels[1:]), levels
    # Folded points still are the points they were: the kept ones hold data from before every prune.
    kept = manifests(folder)
    assert len(kept) == len(finished) and len(set(m["chain"] for m in kept.values())) == 1
    base = min(kept.values(), key=lambda m: m["sequence"])
    assert base["based_on"] is None and base["folded"][0]["level"] == "full"

    # The catalog lists every point, with the rule that keeps it; check mode and a second prune change nothing.
    catalog = run_module({"dir": folder, "operation": "catalog", "retention": POLICY})
    points = [p for c in catalog["chains"] for p in c["points"]]
    assert sorted(p["point"] for p in points) == sorted(kept)
    assert all(p["kept_by"] for p in points) and catalog["changed"] is False
    assert catalog["table"][0].split() == ["point", "level", "finished", "disks", "data", "verified", "kept", "by"]
    for mode in (True, False):
        again = run_module({"dir": folder, "operation": "prune", "retention": POLICY}, check=mode, diff=True)
        assert again["changed"] is False and again["actions"] == [], again
    assert set(manifests(folder)) == set(kept)


def prune_copy(source, workdir, name):
    copy = os.path.join(workdir, name, "vm1")
    shutil.copytree(source, copy, symlinks=True)
    return copy


@pytest.fixture
def five_points(small_vm, workdir):
    """A chain of five points (a full, four incrementals) and each point's reference."""
    vm = small_vm
    folder = os.path.join(workdir, "backups", "vm1")
    references = {}
    for index in range(5):
        if index:
            vm.guest_write("vdisk0", index * 3 * CLUSTER, 2 * CLUSTER, pattern=0x10 + index)
        result = run_module(backup_args(vm, folder, retention={}))
        assert not result.get("failed"), result.get("msg")
        references["%s/%04d-%s" % (result["chain"], result["sequence"], result["level"])] = reference_digest(vm, workdir)
    return folder, references


@prune_lane
def test_prune_check_mode_and_diff_show_the_folds_and_change_nothing(five_points):
    folder, references = five_points
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, "*", "*", "*.qcow2"))}
    plan = run_module({"dir": folder, "operation": "prune", "retention": {"keep_last": 2}}, check=True, diff=True)
    labels = sorted(references)
    assert plan["changed"] is True and plan["msg"].startswith("would ")
    # One fold for the three points dropped in a row: one qemu-img commit into the oldest image.
    assert plan["actions"] == ["fold %s into %s" % (", ".join(labels[:3]), labels[3].split("/")[1])]
    assert plan["diff"]["before"].split() == labels and plan["diff"]["after"].split() == labels[3:]
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, "*", "*", "*.qcow2"))} == before


@prune_lane
@pytest.mark.parametrize("step, count", [(step, 1) for step in PRUNE_STEPS] + [("remove_point", 3)])
def test_prune_killed_at_each_step_then_rerun_keeps_every_point_restorable(five_points, workdir, step, count):
    """keep_last=2 folds points 0, 1 and 2 into 3 (one commit, then three removals): killed after each step, a
    rerun finishes, and every kept point restores equal to its reference."""
    source, references = five_points
    labels = sorted(references)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
    folder = prune_copy(source, workdir, "%s-%d" % (step, count))
    args = {"dir": folder, "operation": "prune", "retention": {"keep_last": 2}}
    killed = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "engine_inprocess.py"),
                             json.dumps(args), step, str(count)], env=env, capture_output=True, text=True,
                            check=False)
    assert killed.returncode == 9, (killed.stdout, killed.stderr)
    # Meanwhile a restore or a verify refuses, naming what to do.
    refused = run_module({"dir": folder, "operation": "verify"})
    assert refused.get("failed") and "run the prune again" in refused["msg"], refused
    rerun = run_module(args)
    assert not rerun.get("failed"), rerun.get("msg")
    assert rerun["actions"][0].startswith("finished an interrupted prune"), rerun["actions"]
    assert not os.path.exists(os.path.join(folder, ".prune.json"))
    found = Proof(folder, workdir).check(references)
    assert sorted(found) == labels[3:]
    verified = run_module({"dir": folder, "operation": "verify"})
    assert not verified.get("failed") and verified["problems"] == [], verified


@prune_lane
def test_whole_vm_restore_starts_the_vm_from_the_manifest_alone(ansible, workdir):
    """A two-disk VM started by the vm role, backed up twice; then its disks are lost and the inventory forgets it.
    The restore entry point writes both disks (four ways) and starts the VM from the definition in the manifest."""
    os.makedirs(os.path.join(workdir, "vm"))
    disks = [make_image(os.path.join(workdir, "vm", name + ".qcow2"), "32M") for name in ("disk0", "disk1")]
    vm = RoleVM(ansible, workdir, name="lifevm", vm_disks=[
        {"path": disks[0], "node_name": "disk0"}, {"path": disks[1], "node_name": "disk1", "bus": "scsi"}],
        vm_append="console=ttyS0 panic=-1 quiet qmpguest.disk=/dev/vda")
    assert vm.apply()["rc"] == 0
    vm.wait_serial("guest: tick 2 ")
    backups = os.path.join(workdir, "backups")
    vm.socket = vm.path("lifevm.qmp")
    role = BackupRole(ansible, vm, backups)
    references = {}
    for level in ("full", "incremental"):
        vm.qmp("stop")
        outcome = role.run(backup_name="lifevm", backup_level=level,
                           backup_definition_file=vm.path("lifevm.json"))
        assert outcome["rc"] == 0 and outcome["result"]["level"] == level, outcome["stdout"][-3000:] + outcome["stderr"]
        for node, path in zip(("disk0", "disk1"), disks):
            references[node] = os.path.join(workdir, "%s-%s.raw" % (node, level))
            assert qemu_img("convert", "-U", "-O", "raw", path, references[node]).returncode == 0
        vm.qmp("cont")
        vm.wait_serial("guest: tick %d " % (vm.read("lifevm.serial.log").count("guest: tick") + 2))
    # The loss: the VM stops, its disks and its files are gone.
    assert vm.apply(vm_state="absent")["rc"] == 0
    shutil.rmtree(os.path.dirname(disks[0]))
    shutil.rmtree(vm.run_dir)

    restored = os.path.join(workdir, "restored")
    variables = {"backup_name": "lifevm", "backup_dir": backups, "backup_restore_dir": restored,
                 "backup_poll_interval": 1}
    changed = []
    for check in (True, False, True, False):
        run = RestorePlay(ansible).run(variables, check=check)
        assert run["rc"] == 0, run["stdout"][-3000:]
        changed.append(run["result"]["changed"])
        if check and changed[-1]:
            assert not os.path.exists(restored)
    assert changed == [True, True, False, False]
    for node in ("disk0", "disk1"):
        assert qemu_img("compare", "-q", os.path.join(restored, node + ".qcow2"), references[node]).returncode == 0
    # Started from the manifest alone: no vm_ variable is given.
    started = RestorePlay(ansible).run(dict(variables, backup_restore_start=True))
    assert started["rc"] == 0, started["stdout"][-3000:]
    assert started["result"]["definition"]["name"] == "lifevm"
    files = dict((n["node-name"], n["file"]) for n in vm.qmp("query-named-block-nodes") if n["node-name"] in ("disk0", "disk1"))
    assert files == dict((n, os.path.join(restored, n + ".qcow2")) for n in ("disk0", "disk1"))
    ticks = vm.read("lifevm.serial.log").count("guest: tick")
    vm.wait_serial("guest: tick %d " % (ticks + 1))
    # Restoring again while the VM runs from those images is refused, naming why.
    again = RestorePlay(ansible).run(variables)
    assert again["rc"] != 0 and "open in a running QEMU" in again["stdout"], again["stdout"][-3000:]
    assert vm.apply(vm_state="absent")["rc"] == 0


class RestorePlay:
    def __init__(self, ansible):
        self.ansible = ansible

    def run(self, variables, check=False):
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": [
            {"name": "restore", "ansible.builtin.include_role": {"name": "qemu.qmp.backup", "tasks_from": "restore"}},
            {"name": "result", "ansible.builtin.debug": {"var": "backup_restore_result"}}]}]
        records, proc = self.ansible.playbook(json.dumps(play), extra_vars=variables,
                                              args=["--check"] if check else None)
        result = next((r["result"] for r in records if r["task"] == "result"), {})
        return {"rc": proc.returncode, "stdout": proc.stdout, "result": result.get("backup_restore_result")}


def files_digest(folder):
    """SHA-256 of every backup image and manifest under a VM's backup folder (not the lock or the records)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "*.json")) + glob.glob(os.path.join(folder, "*", "*", "*"))):
        with open(path, "rb") as handle:
            found[path] = hashlib.sha256(handle.read()).hexdigest()
    return found


def head_records(image, workdir):
    """{slot: tick} of the guest's records, read from the start of a disk image only."""
    raw = os.path.join(workdir, "head.raw")
    result = qemu_img("dd", "-U", "-f", "qcow2", "-O", "raw", "bs=4096", "count=%d" % SLOTS, "if=" + image, "of=" + raw)
    assert result.returncode == 0, result.stderr
    with open(raw, "rb") as handle:
        data = handle.read()
    found = {}
    for slot in range(SLOTS):
        match = RECORD.match(data[slot * 4096:slot * 4096 + 64])
        if match:
            found[slot] = int(match.group(1))
    return found, raw


class FirstTick(threading.Thread):
    """When (wall clock) the guest printed its first tick into a serial log that does not exist yet."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.at = None
        self.running = True

    def run(self):
        while self.running and self.at is None:
            try:
                with open(self.path, encoding="utf-8", errors="replace") as handle:
                    if "guest: tick " in handle.read():
                        self.at = time.time()
            except FileNotFoundError:
                pass
            time.sleep(0.02)


# The copy's speed limit counts every byte it goes through, holes included: the big disk copies unlimited.
@pytest.mark.parametrize("size, speed", [
    pytest.param("64M", 256 * 1024, marks=pytest.mark.skipif(IN_THE_QEMU_10_LANE, reason="runs in the QEMU 7.2 lane")),
    pytest.param("4G", 0, marks=pytest.mark.skipif(not IN_THE_QEMU_10_LANE, reason="runs in the QEMU 10.0 lane"))])
def test_live_restore_runs_the_guest_at_once_and_copies_while_it_writes(ansible, workdir, size, speed):
    os.makedirs(os.path.join(workdir, "vm"))
    disks = [make_image(os.path.join(workdir, "vm", "disk0.qcow2"), size),
             make_image(os.path.join(workdir, "vm", "disk1.qcow2"), "16M")]
    vm = RoleVM(ansible, workdir, name="livevm", vm_disks=[
        {"path": disks[0], "node_name": "disk0"}, {"path": disks[1], "node_name": "disk1"}],
        vm_append="console=ttyS0 panic=-1 quiet qmpguest.disk=/dev/vda")
    begin = time.time()
    assert vm.apply()["rc"] == 0
    plain = os.stat(vm.path("livevm.qmp")).st_mtime - begin  # a plain start by the vm role, QEMU up
    vm.wait_serial("guest: tick 2 ")
    vm.qmp("human-monitor-command", {"command-line": 'qemu-io -d dev-disk1/virtio-backend "write -P 0x5a 1M 3M"'})
    vm.socket = vm.path("livevm.qmp")
    backups = os.path.join(workdir, "backups")
    role = BackupRole(ansible, vm, backups)
    for level in ("full", "incremental"):
        vm.qmp("stop")
        outcome = role.run(backup_name="livevm", backup_level=level, backup_definition_file=vm.path("livevm.json"))
        assert outcome["rc"] == 0, outcome["stdout"][-3000:]
        if level == "full":
            vm.qmp("cont")
            vm.wait_serial("guest: tick %d " % (vm.read("livevm.serial.log").count("guest: tick") + 2))
    point, dummy = head_records(disks[0], workdir)
    references = [os.path.join(workdir, "reference-%d.qcow2" % i) for i in range(2)]
    for disk, reference in zip(disks, references):
        assert qemu_img("convert", "-U", "-O", "qcow2", disk, reference).returncode == 0
    before = files_digest(os.path.join(backups, "livevm"))
    assert vm.apply(vm_state="absent")["rc"] == 0
    shutil.rmtree(os.path.dirname(disks[0]))
    shutil.rmtree(vm.run_dir)

    restored = os.path.join(workdir, "restored")
    stamp = os.path.join(workdir, "task-started")
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "stamp", "ansible.builtin.file": {"path": stamp, "state": "touch"}},
        {"name": "live", "ansible.builtin.include_role": {"name": "qemu.qmp.backup", "tasks_from": "live_restore"}},
        {"name": "result", "ansible.builtin.debug": {"var": "backup_live_restore_result"}}]}]
    variables = {"backup_name": "livevm", "backup_dir": backups, "backup_restore_dir": restored,
                 "backup_poll_interval": 0.5, "backup_speed": speed}
    # Check mode shows the images it would create, and creates nothing.
    planned, checked = ansible.playbook(json.dumps(play), extra_vars=variables, args=["--check"])
    prepared = [r["result"] for r in planned if r.get("action") == "qemu.qmp.qmp_backup_chain" and r["status"] == "ok"]
    assert checked.returncode == 0 and len(prepared) == 1, checked.stdout[-3000:]
    assert prepared[0]["changed"] and prepared[0]["msg"].startswith("would restore VM livevm"), prepared
    assert not os.path.exists(restored) and not os.path.exists(vm.run_dir)
    first = FirstTick(vm.path("livevm.serial.log"))
    first.start()
    if speed:
        # The copy crawls until the guest has ticked (however long its boot takes on a loaded machine), then
        # goes at full speed: the guest surely runs and writes while the copy runs.
        threading.Thread(target=unthrottle_after_first_tick, args=(vm, first), daemon=True).start()
    records, proc = ansible.playbook(json.dumps(play), extra_vars=variables)
    copied = time.time()
    first.join(120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    copy = next(r["result"] for r in records if r["task"] == "result")["backup_live_restore_result"]
    # The guest ran within seconds of the task starting, whatever the disk's size, and went on while the copy ran.
    # The VM's QEMU runs (its QMP socket is there) within 5 s of the task starting, whatever the disk's size;
    # on a loaded machine, within 2 s more than a plain start of the same VM took. The guest's own boot under
    # TCG then takes as long as a plain start's (bench/backup_lifecycle.py).
    started = os.stat(vm.path("livevm.qmp")).st_mtime - os.stat(stamp).st_mtime
    assert started < max(5, plain + 2), (started, plain)
    assert copy["changed"] and copy["verified"], copy
    if speed:  # the slow copy: the guest ran, and wrote its records, while it went on
        assert first.at < copied, (first.at, copied)
    deadline = time.monotonic() + 60
    while vm.read("livevm.serial.log").count("guest: tick") < 3:  # records written since the restore
        assert time.monotonic() < deadline
        time.sleep(0.1)
    vm.qmp("stop")
    final = [os.path.join(restored, n + ".qcow2") for n in ("disk0", "disk1")]
    for image in final:
        assert image_backing(image) is None, image
    # The final images hold the point plus exactly the guest's writes since: outside its records, disk0 is the
    # point's; each record is the point's, or a newer tick.
    now, head = head_records(final[0], workdir)
    # The guest counts from 0 again after a boot: each record is the point's, or one it printed since.
    printed = set(int(t) for t in re.findall(r"guest: tick (\d+) ", vm.read("livevm.serial.log")))
    assert set(now) >= set(point) and max(printed) - 1 in now.values(), (point, now, printed)
    assert all(tick == point.get(slot) or tick in printed for slot, tick in now.items()), (point, now, printed)
    expected = os.path.join(workdir, "expected.qcow2")
    assert qemu_img("convert", "-O", "qcow2", references[0], expected).returncode == 0
    wrote = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -s %s 0 %d" % (head, SLOTS * 4096), expected],
                           capture_output=True, text=True, check=False)
    assert wrote.returncode == 0, wrote.stderr
    assert qemu_img("compare", "-U", expected, final[0]).returncode == 0
    assert qemu_img("compare", "-U", references[1], final[1]).returncode == 0
    # The backup is as it was.
    assert files_digest(os.path.join(backups, "livevm")) == before
    vm.qmp("cont")
    assert vm.apply(vm_state="absent")["rc"] == 0


def unthrottle_after_first_tick(vm, first, timeout=180):
    deadline = time.monotonic() + timeout
    while first.at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for node in ("disk0", "disk1"):
        try:
            vm.qmp("block-job-set-speed", {"device": "qemu-qmp-restore-" + node, "speed": 0})
        except Exception:  # pylint: disable=broad-exception-caught
            pass  # that disk's copy has ended


def image_backing(path):
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return info.get("backing-filename")
