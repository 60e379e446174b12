# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_info against a real QEMU: what it reports is what QEMU holds."""

from __future__ import annotations

import os
import re

from harness import VM, changed_flags, make_image, schema_of


def test_reports_what_qemu_holds(vm_factory, workdir, ansible):
    image = make_image(os.path.join(workdir, "disk.qcow2"))
    vm = vm_factory(args=[
        "-blockdev", "driver=file,filename=%s,node-name=disk0-file" % image,
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-chardev", "ringbuf,id=ring0",
    ])
    vm.qmp("block-dirty-bitmap-add", {"node": "disk0", "name": "bm0", "granularity": 65536})
    vm.qmp("block-dirty-bitmap-add", {"node": "disk0", "name": "bm1", "disabled": True})

    records = ansible.four_ways("qmp_info", {"socket": vm.socket}, vm=vm)
    assert changed_flags(records) == [False, False, False, False]
    info = records[1]["result"]

    version = vm.qmp("query-version")
    assert info["version"] == {"major": version["qemu"]["major"], "minor": version["qemu"]["minor"],
                               "micro": version["qemu"]["micro"], "package": version["package"].strip()}
    assert info["status"] == "prelaunch" and info["running"] is False
    assert sorted(n["node-name"] for n in info["block_nodes"]) == ["disk0", "disk0-file"]
    bitmaps = sorted(info["bitmaps"], key=lambda b: b["name"])
    assert bitmaps == [
        {"name": "bm0", "node": "disk0", "count": 0, "granularity": 65536, "recording": True,
         "busy": False, "persistent": False, "inconsistent": False},
        {"name": "bm1", "node": "disk0", "count": 0, "granularity": 65536, "recording": False,
         "busy": False, "persistent": False, "inconsistent": False},
    ]
    assert info["jobs"] == []
    assert info["migration"]["status"] == "none"
    assert info["migration"]["capabilities"]["events"] is False
    assert "ring0" in [c["label"] for c in info["chardevs"]]
    assert info["machine"] + "-machine" == vm.qmp("qom-get", {"path": "/machine", "property": "type"})
    assert info["name"] == "vm"

    schema = schema_of(vm)
    features = info["features"]
    assert features["backup_bitmap_mode"] is schema.has_argument("blockdev-backup", "bitmap-mode") is True
    assert features["migrate_channels"] is schema.has_argument("migrate", "channels")
    assert "dirty-bitmaps" in features["migration_capabilities"]
    # Nothing in QEMU changed.
    assert len(vm.qmp("query-named-block-nodes")) == 2


def test_gather_subset_and_schema_cache(vm, ansible):
    first = ansible.run("qmp_info", {"socket": vm.socket, "gather": ["features"]}, vm=vm)
    assert [c["execute"] for c in first["qmp_commands"]] == ["query-qmp-schema"]
    assert set(first) >= {"features"} and "status" not in first and "version" not in first
    # The second run of the same QEMU binary reads the schema from the disk cache.
    second = ansible.run("qmp_info", {"socket": vm.socket, "gather": ["features", "status"]}, vm=vm)
    assert [c["execute"] for c in second["qmp_commands"]] == ["query-status"]
    assert second["features"] == first["features"]
    assert os.listdir(ansible.schema_cache)


def test_socket_from_environment_and_module_defaults(vm, ansible):
    result = ansible.run("qmp_info", {"gather": ["status"]}, vm=vm, env={"QMP_SOCKET": vm.socket})
    assert result["status"] == "prelaunch"
    play = """
- hosts: localhost
  gather_facts: false
  module_defaults:
    group/qemu.qmp.qmp:
      socket: %s
  tasks:
    - qemu.qmp.qmp_info: {gather: [status]}
    - qemu.qmp.qmp_vm: {state: running}
    - qemu.qmp.qmp_command: {command: query-status}
""" % vm.socket
    records, proc = ansible.playbook(play, vm=vm)
    assert [r["status"] for r in records] == ["ok", "ok", "ok"], proc.stdout
    assert records[2]["result"]["result"]["status"] == "running"
    assert vm.status() == "running"


def test_jobs_are_normalised(vm, workdir, ansible):
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "src", "size": 1 << 30})
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "dst", "size": 1 << 30})
    # A slow backup stays running; a blockdev-create job concludes and waits to be dismissed.
    vm.qmp("blockdev-backup", {"job-id": "slow", "device": "src", "target": "dst", "sync": "full",
                               "speed": 1, "auto-dismiss": False})
    vm.qmp("blockdev-create", {"job-id": "mkfile", "options": {
        "driver": "file", "filename": os.path.join(workdir, "new.img"), "size": 1 << 20}})
    vm.wait_job("mkfile", "concluded")

    jobs = dict((j["id"], j) for j in ansible.run("qmp_info", {"socket": vm.socket, "gather": ["jobs"]},
                                                  vm=vm)["jobs"])
    assert set(jobs) == {"slow", "mkfile"}
    assert jobs["mkfile"]["type"] == "create" and jobs["mkfile"]["status"] == "concluded"
    assert jobs["mkfile"]["error"] is None and jobs["mkfile"]["block_job"] is False
    assert jobs["slow"]["type"] == "backup" and jobs["slow"]["block_job"] is True
    assert jobs["slow"]["status"] in ("running", "created") and jobs["slow"]["total"] == 1 << 30
    assert jobs["slow"]["auto_dismiss"] is False
    # QEMU's own view agrees.
    assert sorted(j["id"] for j in vm.qmp("query-jobs")) == ["mkfile", "slow"]


class ChosenVM(VM):
    """A QEMU with the machine type `machine`, and no -name when `name` is None."""

    def __init__(self, workdir, name, machine, **kwargs):
        super().__init__(workdir, name=name or "nameless", **kwargs)
        self.machine = machine
        self.named = name is not None

    def command_line(self):
        cmd = super().command_line()
        cmd[cmd.index("-machine") + 1] = self.machine
        if not self.named:
            at = cmd.index("-name")
            del cmd[at:at + 2]
        return cmd


def _alias(vm, alias):
    """The versioned machine type that `alias` stands for in this QEMU."""
    names = [m["name"] for m in vm.qmp("query-machines") if m.get("alias") == alias]
    return str(names[0])


def test_machine_and_name(vm, workdir, ansible):
    records = ansible.four_ways("qmp_info", {"socket": vm.socket, "gather": ["machine", "name"]}, vm=vm)
    assert changed_flags(records) == [False, False, False, False]
    q35 = _alias(vm, "q35")
    assert re.match(r"^pc-q35-\d+\.\d+$", q35)
    for record in records:
        info = record["result"]
        # QEMU was started with -machine q35: the type is the versioned one the alias stands for.
        assert (info["machine"], info["name"]) == (q35, "vm")
        assert info["qmp_commands"] == [
            {"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"}},
            {"execute": "query-name"}]
        assert not set(info) & {"version", "status", "features", "block_nodes", "bitmaps", "jobs", "migration",
                                "chardevs"}
    assert vm.qmp("qom-get", {"path": "/machine", "property": "type"}) in [q35 + "-machine"]

    # Without -name there is no name; another machine type is read the same way.
    nameless = ChosenVM(workdir, None, "pc").start()
    try:
        assert nameless.qmp("query-name") == {}
        info = ansible.run("qmp_info", {"socket": nameless.socket, "gather": ["machine", "name"]}, vm=nameless)
        pc = _alias(nameless, "pc")
        assert info["name"] is None and info["machine"] in [pc]
        assert pc not in [q35]
        assert re.match(r"^pc-i440fx-\d+\.\d+$", info["machine"])
        machine = info["machine"]
    finally:
        nameless.kill()

    # A QEMU started with the reported type emulates that very machine.
    again = ChosenVM(workdir, "again", machine).start()
    try:
        info = ansible.run("qmp_info", {"socket": again.socket, "gather": ["all"]}, vm=again)
        assert (info["machine"], info["name"]) == (machine, "again")
        assert again.qmp("query-name") == {"name": "again"}
    finally:
        again.kill()
