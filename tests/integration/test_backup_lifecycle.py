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
import shutil
import subprocess
import sys
import time

import pytest

from backup_helpers import MiB, qemu_img, reference_copy
from engine_inprocess import PRUNE_STEPS, Clock, run_module

from ansible_collections.qemu.qmp.plugins.module_utils.backup_retention import select
from harness import disk_args, make_image
from test_role_backup import BackupRole
from test_role_vm import RoleVM

SIZE = 8 * MiB
CLUSTER = 64 * 1024
UTC = datetime.timezone.utc
POLICY = {"keep_last": 2, "keep_hourly": 3, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 2}


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


def test_prune_check_mode_and_diff_show_the_folds_and_change_nothing(five_points):
    folder, references = five_points
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, "*", "*", "*.qcow2"))}
    plan = run_module({"dir": folder, "operation": "prune", "retention": {"keep_last": 2}}, check=True, diff=True)
    labels = sorted(references)
    assert plan["changed"] is True and plan["msg"].startswith("would ")
    assert plan["actions"] == ["fold %s into %s" % (labels[i], labels[i + 1].split("/")[1]) for i in range(3)]
    assert plan["diff"]["before"].split() == labels and plan["diff"]["after"].split() == labels[3:]
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, "*", "*", "*.qcow2"))} == before


@pytest.mark.parametrize("step", PRUNE_STEPS)
def test_prune_killed_at_each_step_then_rerun_keeps_every_point_restorable(five_points, workdir, step):
    """keep_last=2 folds points 0, 1 and 2 into 3: killed after each step of the first and of the last fold, a
    rerun finishes, and every kept point restores equal to its reference."""
    source, references = five_points
    labels = sorted(references)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
    for count in (1, 3):
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
