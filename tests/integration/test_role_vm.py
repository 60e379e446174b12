# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qemu.qmp.vm role: starting, finding again, changing, stopping, and bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from harness import GUEST_DIR, VM, make_image, qemu_binary
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient


class RoleVM:
    """A VM defined for the role, with a second QMP socket for the test's own queries."""

    def __init__(self, ansible, workdir, name="rolevm", **overrides):
        self.ansible = ansible
        self.run_dir = os.path.join(workdir, "run")
        self.vars = {
            "vm_name": name,
            "vm_run_dir": self.run_dir,
            "vm_qemu_binary": qemu_binary(),
            "vm_kernel": os.path.join(GUEST_DIR, "vmlinuz"),
            "vm_initrd": os.path.join(GUEST_DIR, "initrd.gz"),
            "vm_append": "console=ttyS0 panic=-1 quiet",
            "vm_extra_qmp_socket": os.path.join(self.run_dir, name + ".probe"),
            "vm_shutdown_timeout": 30,
        }
        self.vars.update(overrides)
        self.name = name

    def apply(self, check=False, **extra):
        variables = dict(self.vars, **extra)
        play = [{"hosts": "localhost", "gather_facts": False, "roles": [{"role": "qemu.qmp.vm"}],
                 "post_tasks": [{"name": "result", "ansible.builtin.debug": {"var": "vm_result"}}]}]
        records, proc = self.ansible.playbook(json.dumps(play), extra_vars=variables,
                                              env={"ANSIBLE_CHECK_MODE": "1"} if check else None,
                                              args=["--check"] if check else None)
        failed = [r for r in records if r["status"] == "failed" and not r["result"].get("_rescued")]
        changed = any(r["result"].get("changed") for r in records if r["status"] == "ok")
        result = next((r["result"].get("vm_result") for r in records if r["task"] == "result"), None)
        return {"rc": proc.returncode, "changed": changed, "vm_result": result, "records": records,
                "failed": failed, "stdout": proc.stdout}

    def qmp(self, command, arguments=None):
        with QMPClient(socket_path=self.vars["vm_extra_qmp_socket"], timeout=10) as client:
            return client.execute(command, arguments)

    def files(self):
        return sorted(os.listdir(self.run_dir)) if os.path.isdir(self.run_dir) else []


@pytest.fixture
def role_vm(ansible, workdir):
    vm = RoleVM(ansible, workdir)
    yield vm
    vm.apply(vm_state="absent", vm_shutdown_timeout=0)


def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
        return handle.read().split()[2] != "Z"


def test_start_find_again_and_stop(role_vm):
    vm = role_vm
    check = vm.apply(check=True)
    assert check["rc"] == 0 and check["changed"] is True
    assert vm.files() == []

    first = vm.apply()
    assert first["rc"] == 0, first["stdout"]
    assert first["changed"] is True
    pid = first["vm_result"]["pid"]
    assert pid > 0 and alive(pid)
    assert first["vm_result"]["qmp_socket"] == os.path.join(vm.run_dir, "rolevm.qmp")
    assert vm.qmp("query-status")["status"] == "running"
    assert sorted(vm.files()) == ["rolevm.json", "rolevm.pid", "rolevm.probe", "rolevm.qmp", "rolevm.serial.log"]

    # Found again: nothing to do, the same process.
    again = vm.apply()
    assert again["rc"] == 0 and again["changed"] is False
    assert again["vm_result"]["pid"] == pid and again["vm_result"]["definition_changed"] is False
    assert vm.apply(check=True)["changed"] is False

    stop = vm.apply(vm_state="absent")
    assert stop["rc"] == 0 and stop["changed"] is True
    assert not alive(pid)
    assert vm.files() == ["rolevm.serial.log"]
    assert "guest: power button pressed" in open(os.path.join(vm.run_dir, "rolevm.serial.log"), encoding="utf-8").read()
    assert vm.apply(vm_state="absent")["changed"] is False


def test_changed_definition(role_vm):
    vm = role_vm
    pid = vm.apply()["vm_result"]["pid"]
    changed = vm.apply(vm_memory=320)
    assert changed["rc"] == 0 and changed["changed"] is False
    assert changed["vm_result"]["definition_changed"] is True
    assert changed["vm_result"]["pid"] == pid
    assert vm.qmp("query-memory-size-summary")["base-memory"] == 256 << 20

    restarted = vm.apply(vm_memory=320, vm_restart_on_change=True, vm_shutdown_timeout=0)
    assert restarted["rc"] == 0 and restarted["changed"] is True
    assert restarted["vm_result"]["pid"] != pid and not alive(pid)
    assert vm.qmp("query-memory-size-summary")["base-memory"] == 320 << 20
    assert vm.apply(vm_memory=320)["changed"] is False


def test_disks_have_node_names(role_vm, workdir):
    vm = role_vm
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "64M")
    data = make_image(os.path.join(workdir, "data.raw"), "16M", "raw")
    result = vm.apply(vm_disks=[{"path": image, "node_name": "disk0"},
                                {"path": data, "node_name": "data", "format": "raw", "bus": "scsi"}],
                      vm_append="console=ttyS0 panic=-1 quiet qmpguest.disk=/dev/vda")
    assert result["rc"] == 0, result["stdout"]
    nodes = dict((n["node-name"], n) for n in vm.qmp("query-named-block-nodes"))
    assert (nodes["disk0"]["drv"], nodes["disk0"]["file"]) == ("qcow2", image)
    assert (nodes["data"]["drv"], nodes["data"]["file"]) == ("raw", data)
    devices = dict((b["qdev"], b["inserted"]["node-name"]) for b in vm.qmp("query-block") if b.get("inserted"))
    assert devices["/machine/peripheral/dev-disk0/virtio-backend"] == "disk0"
    assert "data" in devices.values()
    # The tiny guest writes its ticks into the first disk.
    deadline = time.monotonic() + 30
    while "guest: writing to /dev/vda" not in open(os.path.join(vm.run_dir, "rolevm.serial.log"),
                                                   encoding="utf-8").read():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_vm_that_died_is_started_again(role_vm):
    vm = role_vm
    pid = vm.apply()["vm_result"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    result = vm.apply()
    assert result["rc"] == 0 and result["changed"] is True
    assert result["vm_result"]["pid"] != pid
    assert vm.qmp("query-status")["status"] == "running"


@pytest.mark.parametrize("overrides, qemu_says", [
    ({"vm_kernel": "/nonexistent/vmlinuz"}, "could not open kernel file '/nonexistent/vmlinuz'"),
    ({"vm_disks": [{"path": "/nonexistent/disk.qcow2", "node_name": "disk0"}]},
     "Could not open '/nonexistent/disk.qcow2': No such file or directory"),
    ({"vm_extra_args": ["-no-such-option"]}, "-no-such-option: invalid option"),
])
def test_bad_input_fails_with_qemus_error_and_leaves_nothing(ansible, workdir, overrides, qemu_says):
    vm = RoleVM(ansible, workdir, **overrides)
    result = vm.apply()
    assert result["rc"] != 0
    messages = [r["result"]["msg"] for r in result["failed"]]
    assert any(m.startswith("VM rolevm did not start: ") and qemu_says in m for m in messages), messages
    assert [f for f in vm.files() if not f.endswith(".serial.log")] == []
    # Tests run side by side, with VMs of the same name: this test's own are in its folder.
    assert not any("-name\x00rolevm\x00" in _cmdline(p) and workdir in _cmdline(p)
                   for p in os.listdir("/proc") if p.isdigit())


def _cmdline(pid):
    try:
        with open("/proc/%s/cmdline" % pid, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def test_port_in_use(ansible, workdir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        vm = RoleVM(ansible, workdir, vm_extra_args=["-qmp", "tcp:127.0.0.1:%d,server=on,wait=off" % port])
        result = vm.apply()
    assert result["rc"] != 0
    assert any("Address already in use" in r["result"]["msg"] for r in result["failed"])
    assert [f for f in vm.files() if not f.endswith(".serial.log")] == []


def test_socket_of_another_qemu(ansible, workdir):
    other = VM(workdir, name="other").start()
    try:
        vm = RoleVM(ansible, workdir, vm_qmp_socket=other.socket)
        result = vm.apply()
        assert result["rc"] != 0
        assert any("is in use by another QEMU" in r["result"]["msg"] for r in result["failed"])
        # The other QEMU still owns its socket.
        assert other.qmp("query-status")["status"] == "prelaunch"
        with QMPClient(socket_path=other.socket, timeout=5) as client:
            assert client.execute("query-name") == {"name": "other"}
    finally:
        other.kill()


def test_two_vms_in_one_play_each_get_their_own_files(ansible, workdir):
    """Nothing the role publishes for one VM leaks into the next VM's definition."""
    base = RoleVM(ansible, workdir).vars
    base.pop("vm_extra_qmp_socket")
    tasks = []
    for name in ("first", "second"):
        tasks += [{"name": "start " + name, "ansible.builtin.include_role": {"name": "qemu.qmp.vm"},
                   "vars": {"vm_name": name}},
                  {"name": "result " + name, "ansible.builtin.debug": {"var": "vm_result"}}]
    tasks += [{"name": "stop " + name, "ansible.builtin.include_role": {"name": "qemu.qmp.vm"},
               "vars": {"vm_name": name, "vm_state": "absent", "vm_shutdown_timeout": 0}} for name in ("first", "second")]
    play = [{"hosts": "localhost", "gather_facts": False, "vars": base, "tasks": tasks}]
    records, proc = ansible.playbook(json.dumps(play))
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = dict((r["task"].split()[1], r["result"]["vm_result"]) for r in records if r["task"].startswith("result "))
    assert results["first"]["qmp_socket"] == os.path.join(base["vm_run_dir"], "first.qmp")
    assert results["second"]["qmp_socket"] == os.path.join(base["vm_run_dir"], "second.qmp")
    assert results["first"]["pid"] != results["second"]["pid"]
    assert os.listdir(base["vm_run_dir"]) == [] or all(f.endswith(".serial.log") for f in os.listdir(base["vm_run_dir"]))
