# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every module's EXAMPLES run as written, against a real QEMU.

Only paths differ: the QMP socket, and the folders /run/qemu, /var/lib/backup and
/var/lib/qemu (folders of the test).
A few modules' examples act on something the VM must have first (a running job);
the test adds that in front of them, as SETUP.
"""

from __future__ import annotations

import ast
import json
import os

import yaml

from harness import ROOT, FakeGuestAgent, disk_args, make_image, qemu_binary

EXAMPLE_SOCKET = "/run/qemu/vm1.qmp"
EXAMPLE_DIRS = ("/run/qemu", "/var/lib/backup", "/var/lib/qemu")
# Block modules before the job that uses them; the VM's own end comes last.
ORDER = ["qmp_info", "qmp_command", "qmp_blockdev", "qmp_bitmap", "qmp_job", "qmp_backup", "qmp_backup_chain", "qmp_nbd",
         "qmp_chardev", "qmp_device", "qmp_object", "qmp_vm"]
# Modules whose examples need a VM of their own (they end it, or need two).
OWN_TEST = ["qmp_migrate", "qmp_migration", "qmp_vm_process"]
SETUP = {
    "qmp_backup": [
        {"name": "setup: a full and an incremental target for the examples, as big as disk0",
         "qemu.qmp.qmp_blockdev": {
             "socket": EXAMPLE_SOCKET, "node_name": "target0", "create": {"size": "64M"},
             "options": {"driver": "qcow2", "backing": None,
                         "file": {"driver": "file", "filename": "/var/lib/backup/ex-full.qcow2"}}}},
        {"qemu.qmp.qmp_blockdev": {
            "socket": EXAMPLE_SOCKET, "node_name": "target1",
            "create": {"size": "64M", "backing_file": "/var/lib/backup/ex-full.qcow2"},
            "options": {"driver": "qcow2", "backing": None,
                        "file": {"driver": "file", "filename": "/var/lib/backup/ex-inc.qcow2"}}}},
    ],
    "qmp_nbd": [
        {"name": "setup: a disabled bitmap for the export example",
         "qemu.qmp.qmp_bitmap": {"socket": EXAMPLE_SOCKET, "node": "disk0", "name": "backup", "recording": False}},
    ],
    "qmp_job": [
        {"name": "setup: a target and a backup job for the example to wait on",
         "qemu.qmp.qmp_command": {"socket": EXAMPLE_SOCKET, "command": "blockdev-add",
                                  "arguments": {"driver": "null-co", "node-name": "sink", "size": 67108864}}},
        {"qemu.qmp.qmp_command": {"socket": EXAMPLE_SOCKET, "command": "blockdev-backup", "arguments": {
            "job-id": "backup-disk0", "device": "disk0", "target": "sink", "sync": "full", "auto-dismiss": False}}},
    ],
}


def examples(module):
    with open(os.path.join(ROOT, "plugins", "modules", module + ".py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXAMPLES":
            return node.value.value
    raise AssertionError("%s has no EXAMPLES" % module)


def modules():
    found = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "plugins", "modules")) if f.endswith(".py"))
    return [m for m in ORDER if m in found] + [m for m in found if m not in ORDER and m not in OWN_TEST]


def example_play(module, replacements):
    text = json.dumps(SETUP.get(module, []) + yaml.safe_load(examples(module)))
    for path, replacement in replacements.items():
        text = text.replace(path, replacement)
    return {"name": "examples of " + module, "hosts": "localhost", "gather_facts": False, "tasks": json.loads(text)}


def test_migrate_examples_run_as_written(vm_factory, workdir, ansible):
    """The migration examples move a VM from /run/qemu/vm1.qmp to /run/qemu/vm1-new.qmp."""
    run = os.path.join(workdir, "run-qemu")
    os.mkdir(run)
    source = vm_factory("vm1", guest=True, paused=False)
    dest = vm_factory("vm1new", guest=True, paused=False, args=["-incoming", "defer"])
    source.wait_serial("guest: ready")
    play = example_play("qmp_migrate", {EXAMPLE_SOCKET: source.socket, "/run/qemu/vm1-new.qmp": dest.socket,
                                        "/run/qemu/": run + "/"})
    records, proc = ansible.playbook(json.dumps([play]), vm=source)
    failed = [r for r in records if r["status"] == "failed"]
    assert not failed, json.dumps(failed, indent=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert source.status() == "postmigrate" and dest.status() == "running"


def test_migration_examples_run_as_written(vm_factory, workdir, ansible):
    """The migration engine's examples copy vm1's disk into vm1-new's and move the VM there."""
    images = [make_image(os.path.join(workdir, name)) for name in ("disk0.qcow2", "disk0-new.qcow2")]
    source = vm_factory("vm1", guest=True, paused=False, args=disk_args(images[0], node="disk0", device="disk0"))
    dest = vm_factory("vm1new", guest=True, paused=False,
                      args=disk_args(images[1], node="disk0", device="disk0") + ["-incoming", "defer"])
    source.wait_serial("guest: ready")
    play = example_play("qmp_migration", {EXAMPLE_SOCKET: source.socket, "/run/qemu/vm1-new.qmp": dest.socket})
    records, proc = ansible.playbook(json.dumps([play]), vm=source)
    failed = [r for r in records if r["status"] == "failed"]
    assert not failed, json.dumps(failed, indent=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert source.status() == "postmigrate" and dest.status() == "running"


def _alive(pid):
    """Whether process `pid` runs (a zombie, which its parent did not reap yet, does not)."""
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_vm_process_examples_run_as_written(workdir, ansible):
    """The examples start a VM in /run/qemu (a folder of the test) and stop it again."""
    run = os.path.join(workdir, "run-qemu")
    play = example_play("qmp_vm_process", {"/run/qemu": run, "qemu-system-x86_64": qemu_binary()})
    records, proc = ansible.playbook(json.dumps([play]))
    failed = [r for r in records if r["status"] == "failed"]
    assert not failed, json.dumps(failed, indent=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started, stopped = [r["result"] for r in records if r["task"] != "Show its process"]
    assert started["changed"] and started["pid"] > 0 and started["status"] in ("running", "prelaunch")
    assert stopped["changed"] and stopped["state"] == "absent" and not _alive(started["pid"])
    assert os.listdir(run) == ["vm1.serial.log"]


def test_examples_run_as_written(vm_factory, workdir, ansible):
    disk = make_image(os.path.join(workdir, "disk0.qcow2"))
    dirs = {}
    for path in EXAMPLE_DIRS:
        dirs[path] = os.path.join(workdir, path.strip("/").replace("/", "-"))
        os.mkdir(dirs[path])
    vm = vm_factory(guest=True, paused=False, args=disk_args(disk, node="disk0", device="disk0") + [
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"])
    vm.wait_serial("guest: ready")
    agent = FakeGuestAgent(os.path.join(dirs["/run/qemu"], "vm1.qga"))
    agent.start()
    plays = []
    for module in modules():
        text = examples(module)
        assert EXAMPLE_SOCKET in text, "%s's examples should use %s" % (module, EXAMPLE_SOCKET)
        tasks = SETUP.get(module, []) + yaml.safe_load(text)
        text = json.dumps(tasks).replace(EXAMPLE_SOCKET, vm.socket)
        for path, replacement in dirs.items():
            text = text.replace(path + "/", replacement + "/")
        tasks = json.loads(text)
        plays.append({"name": "examples of " + module, "hosts": "localhost", "gather_facts": False,
                      "tasks": tasks})
    records, proc = ansible.playbook(json.dumps(plays), vm=vm)
    failed = [r for r in records if r["status"] == "failed"]
    assert not failed, json.dumps(failed, indent=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The last qmp_vm example quit QEMU (after the guest powered off).
    assert vm.wait_exit(20) == 0
    assert "guest-fsfreeze-freeze" in agent.commands
