# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_host_info on a host with real QEMUs: two VMs started by the vm role (one backed up by the backup role,
one whose QMP socket another client holds), a QEMU started otherwise, a stray socket that never greets, and
the files of QEMUs that are gone. What it reports is what QEMU and the files hold."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from harness import VM, make_image, qemu_binary
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient
from ansible_collections.qemu.qmp.plugins.module_utils.vm_process import process_started

TIMEOUT = 1  # seconds the module waits on each socket: the busy ones cost this much, all at once


def role_play(run, backups, image):
    """Start vmb, then vma (with a disk) with the vm role, and take a full backup of vma with the backup role."""
    common = {"vm_run_dir": run, "vm_qemu_binary": qemu_binary(), "vm_start_paused": True,
              "vm_supervisor": "daemon", "vm_memory": 128}
    vmb = dict(common, vm_name="vmb", vm_extra_qmp_socket=os.path.join(run, "vmb.extra.qmp"))
    vma = dict(common, vm_name="vma", vm_extra_qmp_socket=os.path.join(run, "vma.extra.qmp"),
               vm_disks=[{"path": image, "node_name": "disk0"}])
    backup = {"backup_qmp_socket": os.path.join(run, "vma.qmp"), "backup_name": "vma", "backup_dir": backups,
              "backup_definition_file": os.path.join(run, "vma.json"), "backup_poll_interval": 1}
    return [{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "start vmb", "ansible.builtin.include_role": {"name": "qemu.qmp.vm"}, "vars": vmb},
        {"name": "start vma", "ansible.builtin.include_role": {"name": "qemu.qmp.vm"}, "vars": vma},
        {"name": "back up vma", "ansible.builtin.include_role": {"name": "qemu.qmp.backup"}, "vars": backup},
        {"name": "backup result", "ansible.builtin.debug": {"var": "backup_result"}},
    ]}]


def info_play(args):
    return [{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "real", "qemu.qmp.qmp_host_info": args},
        {"name": "check", "qemu.qmp.qmp_host_info": args, "check_mode": True},
    ]}]


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def ask(path, command, arguments=None):
    with QMPClient(socket_path=path, timeout=10) as client:
        return client.execute(command, arguments)


def kill_role_vms(run):
    """SIGKILL the QEMUs the role started from `run` (their pid saved by the role, their command line naming `run`)."""
    for name in ("vma", "vmb"):
        try:
            pid = read_json(os.path.join(run, name + ".json"))["pid"]
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                if (run + "/").encode() not in handle.read():
                    continue
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


def expected_disks(path):
    """The disks as QEMU on socket `path` reports them, shaped as the module gives them."""
    disks = []
    nodes = dict((n["node-name"], n) for n in ask(path, "query-named-block-nodes"))
    for device in ask(path, "query-block"):
        inserted = device.get("inserted")
        if not inserted:
            continue
        node = nodes[inserted["node-name"]]
        while node["drv"] == "throttle":
            node = nodes[node["node-name"].replace("-thr", "")]
        qdev = device.get("qdev", "")
        disks.append({
            "device": device["device"] or (qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else qdev),
            "node_name": node["node-name"], "file": node["file"], "format": node["drv"],
            "virtual_size": node["image"]["virtual-size"],
            "bitmaps": sorted(({"name": b["name"], "count": b["count"], "granularity": b["granularity"],
                                "persistent": b["persistent"], "recording": b["recording"], "busy": b["busy"],
                                "inconsistent": bool(b.get("inconsistent", False))}
                               for b in node.get("dirty-bitmaps", []) if b.get("name")), key=lambda b: b["name"]),
        })
    return disks


def version_of(path):
    version = ask(path, "query-version")
    return "%(major)d.%(minor)d.%(micro)d" % version["qemu"], version["package"].strip()


class UnmanagedVM(VM):
    """A QEMU started without the role, its QMP socket named unlike its -name, its disk behind a throttle filter."""

    def __init__(self, folder, image):
        super().__init__(folder, name="vmu", args=[
            "-object", "throttle-group,id=tg0,x-bps-total=1000000000",
            "-blockdev", "driver=file,filename=%s,node-name=u0-file" % image,
            "-blockdev", "driver=qcow2,file=u0-file,node-name=u0",
            "-blockdev", "driver=throttle,file=u0,throttle-group=tg0,node-name=u0-thr",
            "-device", "virtio-blk-pci,drive=u0-thr,id=udisk",
            "-device", "ide-cd,id=cd0,bus=ide.0"])  # an empty drive: left out
        self.socket = os.path.join(folder, "some-socket.qmp")
        self.image = image


@pytest.fixture
def host(workdir):
    """The folders of the host: run (the vm role's), others (sockets of QEMUs started otherwise), backups."""
    folders = {name: os.path.join(workdir, name) for name in ("run", "others", "backups")}
    os.mkdir(folders["others"])
    started = []
    yield folders, started
    for vm in started:
        vm.kill()
    kill_role_vms(folders["run"])


def test_lists_every_vm_of_the_host(host, workdir, ansible):
    folders, started = host
    run, others, backups = folders["run"], folders["others"], folders["backups"]
    image = make_image(os.path.join(workdir, "vma-disk0.qcow2"), "32M")
    records, proc = ansible.playbook(json.dumps(role_play(run, backups, image)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    backup = next(r["result"]["backup_result"] for r in records if r["task"] == "backup result")
    assert backup["level"] == "full"

    # Started otherwise: a QEMU whose socket is in `others`, with a bitmap and a concluded job.
    vmu = UnmanagedVM(others, make_image(os.path.join(workdir, "vmu-disk.qcow2"), "16M"))
    started.append(vmu)
    vmu.start()
    vmu.qmp("block-dirty-bitmap-add", {"node": "u0", "name": "bm-u", "granularity": 131072})
    vmu.qmp("blockdev-create", {"job-id": "mkfile", "options": {
        "driver": "file", "filename": os.path.join(workdir, "new.img"), "size": 1 << 20}})
    vmu.wait_job("mkfile", "concluded")

    # A VM whose QEMU was killed, its files as the role writes them, its socket left behind.
    vmd = VM(workdir, name="vmd")
    started.append(vmd)
    vmd.start()
    saved_vmd = {"pid": vmd.process.pid, "started": process_started(vmd.process.pid), "command_line": vmd.command_line(),
                 "definition": {"name": "vmd", "instance": "", "qmp_socket": vmd.socket, "run_dir": run}}
    with open(os.path.join(run, "vmd.json"), "w", encoding="utf-8") as handle:
        json.dump(saved_vmd, handle)
    vmd.kill()
    assert os.path.exists(vmd.socket)
    # A same-host migration's destination of vmb whose QEMU is gone, and files that are no VM.
    saved_vmb = read_json(os.path.join(run, "vmb.json"))
    definition = dict(saved_vmb["definition"], instance=".incoming", extra_qmp_socket="",
                      qmp_socket=os.path.join(run, "vmb.incoming.qmp"))
    incoming = dict(saved_vmb, pid=saved_vmd["pid"], started=saved_vmd["started"], definition=definition)
    with open(os.path.join(run, "vmb.incoming.json"), "w", encoding="utf-8") as handle:
        json.dump(incoming, handle)
    with open(os.path.join(run, "notes.json"), "w", encoding="utf-8") as handle:
        json.dump({"definition": "not a VM"}, handle)

    # A stray socket that accepts connections and never greets, named by its file.
    stray = socket.socket(socket.AF_UNIX)
    stray.bind(os.path.join(others, "stray.qmp"))
    stray.listen(8)
    # Another client holds vmb's QMP socket: QEMU greets it, and nobody else.
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(os.path.join(run, "vmb.qmp"))
    assert b'"QMP"' in holder.recv(4096)

    expected_a = {
        "state": ask(os.path.join(run, "vma.extra.qmp"), "query-status")["status"],
        "disks": expected_disks(os.path.join(run, "vma.extra.qmp")),
        "jobs": [{"id": j["id"], "type": j["type"], "status": j["status"]}
                 for j in ask(os.path.join(run, "vma.extra.qmp"), "query-jobs")],
    }
    expected_u = {"state": vmu.status(), "disks": expected_disks(vmu.probe_socket),
                  "jobs": [{"id": j["id"], "type": j["type"], "status": j["status"]} for j in vmu.qmp("query-jobs")]}
    not_a_folder = os.path.join(workdir, "a-file")
    open(not_a_folder, "w", encoding="utf-8").close()
    args = {"run_dirs": [run, not_a_folder, os.path.join(workdir, "missing")], "socket_dirs": [others, run],
            "backup_dir": backups, "timeout": TIMEOUT}
    try:
        records, proc = ansible.playbook(json.dumps(info_play(args)), vm=vmu)
    finally:
        holder.close()
        stray.close()
    assert [r["status"] for r in records] == ["ok", "ok"], proc.stdout[-3000:]
    real, check = records[0]["result"], records[1]["result"]
    assert real["changed"] is False and check["changed"] is False
    assert real["vms"] == check["vms"]
    assert real["hostname"] == socket.gethostname()
    # The busy sockets each cost the timeout, at the same time.
    assert TIMEOUT <= real["duration"] < TIMEOUT + 1.5, real["duration"]
    assert any("a-file is not a folder" in w for w in real.get("warnings", [])), real.get("warnings")

    vms = real["vms"]
    assert [(v["name"], v["instance"]) for v in vms] == [
        ("stray", ""), ("vma", ""), ("vmb", ""), ("vmb", ".incoming"), ("vmd", ""), ("vmu", "")], vms
    by_name = dict(((v["name"], v["instance"]), v) for v in vms)

    # vma: started by the role, answers, backed up.
    vma, saved_a = by_name[("vma", "")], read_json(os.path.join(run, "vma.json"))
    qemu_version, package = version_of(os.path.join(run, "vma.extra.qmp"))
    assert vma == dict(vma, name="vma", instance="", qmp_socket=os.path.join(run, "vma.qmp"),
                       extra_qmp_socket=os.path.join(run, "vma.extra.qmp"), run_dir=run,
                       definition_file=os.path.join(run, "vma.json"), managed=True, pid=saved_a["pid"],
                       state_msg="", qemu_version=qemu_version, qemu_package=package,
                       definition=saved_a["definition"], backups=1, backup_msg="", **expected_a)
    with open(os.path.join(run, "vma.pid"), encoding="utf-8") as handle:
        assert int(handle.read()) == vma["pid"]
    assert expected_a["state"] == "prelaunch" and vma["jobs"] == []
    disk = vma["disks"][0]
    assert len(vma["disks"]) == 1 and disk["device"] == "dev-disk0" and disk["node_name"] == "disk0"
    assert disk["file"] == image and disk["format"] == "qcow2" and disk["virtual_size"] == 32 << 20
    chain = backup["chain"]
    assert [b["name"] for b in disk["bitmaps"]] == sorted(["qemu-qmp-backup-%s-0000" % chain,
                                                           "qemu-qmp-backup-%s-full" % chain])
    assert all(b["persistent"] and b["recording"] and not b["busy"] for b in disk["bitmaps"])
    manifest = read_json(os.path.join(backups, "vma", chain, "0000-full.json"))
    assert vma["last_backup"] == {"label": chain + "/0000-full", "chain": chain, "level": "full",
                                  "finished": manifest["finished"],
                                  "dir": os.path.join(backups, "vma", chain, "0000-full")}

    # vmb: started by the role; another client holds its socket.
    vmb, saved_b = by_name[("vmb", "")], read_json(os.path.join(run, "vmb.json"))
    assert vmb == dict(vmb, managed=True, state="busy", pid=saved_b["pid"], qemu_version=None, qemu_package=None,
                       disks=None, jobs=None, definition=saved_b["definition"], last_backup=None, backups=0,
                       extra_qmp_socket=os.path.join(run, "vmb.extra.qmp"))
    assert vmb["state_msg"] == ("%s accepts connections but sends no QMP greeting within %g s: another client "
                                "holds it" % (os.path.join(run, "vmb.qmp"), TIMEOUT))
    # Its QEMU was still asked on the extra socket, and is paused as the role started it.
    assert ask(os.path.join(run, "vmb.extra.qmp"), "query-status")["status"] == "prelaunch"
    dest = by_name[("vmb", ".incoming")]
    assert dest["state"] == "dead" and dest["pid"] is None and dest["managed"] is True
    assert dest["definition_file"] == os.path.join(run, "vmb.incoming.json") and dest["definition"] == incoming["definition"]
    assert dest["state_msg"] == "%s does not exist: no QEMU runs there" % os.path.join(run, "vmb.incoming.qmp")

    # vmd: its QEMU was killed; its socket refuses.
    vmd_entry = by_name[("vmd", "")]
    assert vmd_entry == dict(vmd_entry, managed=True, state="dead", pid=None, qmp_socket=vmd.socket, disks=None,
                             jobs=None, definition=saved_vmd["definition"], last_backup=None, backups=0)
    assert "refuses connections" in vmd_entry["state_msg"]

    # vmu: started otherwise, named by QEMU; its format node is under a throttle filter; the empty CD is left out.
    qemu_version, package = version_of(vmu.probe_socket)
    vmu_entry = by_name[("vmu", "")]
    assert vmu_entry == dict(vmu_entry, managed=False, definition=None, definition_file="", qmp_socket=vmu.socket,
                             run_dir=others, extra_qmp_socket="", pid=vmu.process.pid, state_msg="",
                             qemu_version=qemu_version, qemu_package=package, last_backup=None, backups=0,
                             **expected_u)
    assert vmu_entry["disks"] == [{
        "device": "udisk", "node_name": "u0", "file": vmu.image, "format": "qcow2", "virtual_size": 16 << 20,
        "bitmaps": [{"name": "bm-u", "count": 0, "granularity": 131072, "persistent": False, "recording": True,
                     "busy": False, "inconsistent": False}]}]
    assert vmu_entry["jobs"] == [{"id": "mkfile", "type": "create", "status": "concluded"}]

    # stray: never greets; named by its file; its listener is this test.
    assert by_name[("stray", "")] == dict(by_name[("stray", "")], managed=False, state="busy", pid=os.getpid(),
                                          qemu_version=None, disks=None, definition=None)

    # Every connection was closed: the sockets serve the next client at once.
    for path in (os.path.join(run, "vma.qmp"), vmu.socket, os.path.join(run, "vmb.qmp")):
        with QMPClient(socket_path=path, timeout=2) as client:
            assert client.execute("query-status")["status"] == "prelaunch"


def test_twenty_vms_in_well_under_a_second(workdir, ansible):
    """A host of 20 paused VMs of the role: every one listed, answering, in well under a second of the module's own
    time (Python's and Ansible's start aside)."""
    run = os.path.join(workdir, "run")
    os.mkdir(run)
    vms = [VM(workdir, name="vm%02d" % index) for index in range(20)]
    try:
        for vm in vms:  # all at once: the harness starts one after the other
            with open(vm.stderr_log, "wb") as err:
                vm.process = subprocess.Popen(vm.command_line(), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + 30
        for vm in vms:
            while not (os.path.exists(vm.socket) and os.path.exists(vm.probe_socket)):
                assert vm.process.poll() is None and time.monotonic() < deadline, vm.stderr()
                time.sleep(0.02)
            with open(os.path.join(run, vm.name + ".json"), "w", encoding="utf-8") as handle:
                json.dump({"pid": vm.process.pid, "started": process_started(vm.process.pid),
                           "command_line": vm.command_line(),
                           "definition": {"name": vm.name, "instance": "", "qmp_socket": vm.socket,
                                          "extra_qmp_socket": vm.probe_socket, "run_dir": run}}, handle)
        result = ansible.run("qmp_host_info", {"run_dirs": [run], "backup_dir": "", "socket_dirs": [workdir]},
                             vm=vms[0])
    finally:
        for vm in vms:
            vm.kill()
    assert result["changed"] is False and result["msg"] == "20 VMs, 20 prelaunch", result["msg"]
    assert [v["name"] for v in result["vms"]] == [vm.name for vm in vms]
    assert [v["pid"] for v in result["vms"]] == [vm.process.pid for vm in vms]
    assert all(v["managed"] and v["disks"] == [] and v["jobs"] == [] for v in result["vms"])
    # Each command once per VM, each VM asked once.
    assert result["qmp_commands"] == [{"execute": c, "repeated": 20}
                                      for c in ("query-status", "query-name", "query-block", "query-jobs")]
    assert result["duration"] < 1.0, result["duration"]
