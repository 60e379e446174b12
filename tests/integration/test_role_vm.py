# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qemu.qmp.vm role: starting, finding again, changing, stopping, and bad input."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import stat
import subprocess
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

    def apply(self, check=False, tasks_from=None, **extra):
        variables = dict(self.vars, **extra)
        role = {"name": "qemu.qmp.vm"}
        if tasks_from:
            role["tasks_from"] = tasks_from
        play = [{"hosts": "localhost", "gather_facts": False,
                 "tasks": [{"name": "vm", "ansible.builtin.include_role": role},
                           {"name": "result", "ansible.builtin.debug": {"var": "vm_result"}}]}]
        records, proc = self.ansible.playbook(json.dumps(play), extra_vars=variables,
                                              env={"ANSIBLE_CHECK_MODE": "1"} if check else None,
                                              args=["--check"] if check else None)
        failed = [r for r in records if r["status"] == "failed" and not r["result"].get("_rescued")]
        changed = any(r["result"].get("changed") for r in records if r["status"] == "ok")
        result = next((r["result"].get("vm_result") for r in records if r["task"] == "result"), None)
        return {"rc": proc.returncode, "changed": changed, "vm_result": result, "records": records,
                "failed": failed, "stdout": proc.stdout, "stderr": proc.stderr}

    def qmp(self, command, arguments=None):
        with QMPClient(socket_path=self.vars["vm_extra_qmp_socket"], timeout=10) as client:
            return client.execute(command, arguments)

    def files(self):
        return sorted(os.listdir(self.run_dir)) if os.path.isdir(self.run_dir) else []

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def read(self, name):
        with open(self.path(name), encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait_serial(self, text, name=None, timeout=60):
        name = name or self.name + ".serial.log"
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.path(name)) and text in self.read(name)):
            assert time.monotonic() < deadline, "guest did not print %r into %s" % (text, name)
            time.sleep(0.1)

    def qemus(self):
        """Process ids of the QEMUs running this VM from this folder."""
        return [int(p) for p in os.listdir("/proc") if p.isdigit()
                and "-name\x00%s\x00" % self.name in _cmdline(p) and self.run_dir + "/" in _cmdline(p)]


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

    # A guest that has booted handles the power button (one still booting cannot: QEMU then quits).
    vm.wait_serial("guest: tick 1 ")
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


FILE_KEYS = ("qmp_socket", "extra_qmp_socket", "pidfile", "definition_file", "serial_log")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _recent(stamp):
    moment = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return abs((datetime.datetime.now(datetime.timezone.utc) - moment).total_seconds()) < 300


def _open_files(pid):
    fds = "/proc/%d/fd" % pid
    files = set()
    for fd in os.listdir(fds):
        try:
            files.add(os.readlink(os.path.join(fds, fd)))
        except FileNotFoundError:
            pass  # closed since the listing (QEMU opens and closes files of its own)
    return files


def test_result_names_the_files_that_exist(role_vm, ansible, workdir):
    vm = role_vm
    planned = vm.apply(check=True)["vm_result"]
    started = vm.apply()
    assert started["rc"] == 0, started["stdout"]
    result = started["vm_result"]
    assert result["run_dir"] == vm.run_dir
    for key in FILE_KEYS + ("run_dir", "moved_marker"):
        assert planned[key] == result[key], key
    # Every file the VM has is named, and every name is a file of the VM.
    assert sorted(result[key] for key in FILE_KEYS) == [vm.path(f) for f in vm.files()]
    assert result["serial_log"] == vm.path("rolevm.serial.log")
    assert result["moved_marker"] == vm.path("rolevm.moved") and result["moved"] is None
    assert not os.path.exists(result["moved_marker"])
    # Each is what its key says.
    with open(result["pidfile"], encoding="utf-8") as handle:
        assert int(handle.read()) == result["pid"] and vm.qemus() == [result["pid"]]
    with open(result["definition_file"], encoding="utf-8") as handle:
        assert json.load(handle)["command_line"] == result["command_line"]
    for key in ("qmp_socket", "extra_qmp_socket"):
        assert stat.S_ISSOCK(os.stat(result[key]).st_mode)
        with QMPClient(socket_path=result[key], timeout=10) as client:
            assert client.execute("query-name") == {"name": "rolevm"}
    assert result["serial_log"] in _open_files(result["pid"])
    vm.wait_serial("guest: tick 1 ")

    stopped = vm.apply(vm_state="absent", vm_shutdown_timeout=0)
    assert stopped["rc"] == 0 and stopped["vm_result"]["state"] == "absent" and stopped["vm_result"]["pid"] == 0
    for key in FILE_KEYS + ("run_dir", "moved_marker"):
        assert stopped["vm_result"][key] == result[key], key
    assert stopped["vm_result"]["moved"] is None
    assert vm.files() == ["rolevm.serial.log"] and vm.qemus() == []

    # A serial port on a socket has no log; no second QMP socket has no name.
    console = os.path.join(vm.run_dir, "plain.console")
    plain = RoleVM(ansible, workdir, name="plain", vm_serial={"type": "socket", "path": console},
                   vm_extra_qmp_socket="")
    try:
        started = plain.apply()
        assert started["rc"] == 0, started["stdout"]
        result = started["vm_result"]
        assert result["serial_log"] is None and result["extra_qmp_socket"] is None
        assert sorted([result["qmp_socket"], result["pidfile"], result["definition_file"], console]) == \
            [plain.path(f) for f in plain.files() if f.startswith("plain.")]
        assert stat.S_ISSOCK(os.stat(console).st_mode)
        with QMPClient(socket_path=result["qmp_socket"], timeout=10) as client:
            assert client.execute("query-name") == {"name": "plain"}
        stopped = plain.apply(vm_state="absent", vm_shutdown_timeout=0)["vm_result"]
        assert (stopped["serial_log"], stopped["extra_qmp_socket"]) == (None, None)
        assert stopped["qmp_socket"] == result["qmp_socket"] and stopped["pidfile"] == result["pidfile"]
    finally:
        plain.apply(vm_state="absent", vm_shutdown_timeout=0)
    assert [f for f in plain.files() if f.startswith("plain.")] == [] and plain.qemus() == []


def test_moved_marker_keeps_the_vm_from_starting_here_again(role_vm):
    vm = role_vm
    marker = vm.path("rolevm.moved")
    pid = vm.apply()["vm_result"]["pid"]

    # Check mode says what it would write, and neither writes nor stops anything.
    check = vm.apply(check=True, vm_state="absent", vm_moved_to="elsewhere")
    assert check["rc"] == 0 and check["changed"] is True
    assert check["vm_result"]["moved"]["to"] == "elsewhere" and _recent(check["vm_result"]["moved"]["at"])
    assert not os.path.exists(marker)
    assert vm.qemus() == [pid] and vm.qmp("query-status")["status"] == "running"

    moved = vm.apply(vm_state="absent", vm_moved_to="elsewhere", vm_shutdown_timeout=0)
    assert moved["rc"] == 0 and moved["changed"] is True, moved["stdout"]
    assert not alive(pid) and vm.qemus() == []
    assert vm.files() == ["rolevm.moved", "rolevm.serial.log"]
    with open(marker, encoding="utf-8") as handle:
        content = json.load(handle)
    assert content == {"vm": "rolevm", "moved_to": "elsewhere", "moved_at": content["moved_at"], "from": "localhost"}
    assert ISO_UTC.match(content["moved_at"]) and _recent(content["moved_at"])
    assert stat.S_IMODE(os.stat(marker).st_mode) == 0o640
    assert moved["vm_result"]["moved"] == {"to": "elsewhere", "at": content["moved_at"]}

    # The same again is unchanged and keeps its time; absent without vm_moved_to leaves the marker.
    for extra in ({"vm_moved_to": "elsewhere"}, {}):
        again = vm.apply(vm_state="absent", **extra)
        assert again["rc"] == 0 and again["changed"] is False
        assert again["vm_result"]["moved"] == {"to": "elsewhere", "at": content["moved_at"]}
        with open(marker, encoding="utf-8") as handle:
            assert json.load(handle) == content

    # Refused, in check mode too: nothing starts.
    message = ("VM rolevm moved to elsewhere at %s (marker %s): it runs there now. "
               "Set vm_start_moved: true to start it here anyway" % (content["moved_at"], marker))
    for check in (True, False):
        refused = vm.apply(check=check)
        assert refused["rc"] != 0
        assert [r["result"]["msg"] for r in refused["failed"]] == [message]
        assert vm.qemus() == [] and vm.files() == ["rolevm.moved", "rolevm.serial.log"]

    # vm_start_moved: check mode says the marker would go, and keeps it.
    check = vm.apply(check=True, vm_start_moved=True)
    assert check["rc"] == 0 and check["changed"] is True and check["vm_result"]["moved"] is None
    assert os.path.exists(marker) and vm.qemus() == []

    started = vm.apply(vm_start_moved=True)
    assert started["rc"] == 0 and started["changed"] is True, started["stdout"]
    assert started["vm_result"]["moved"] is None and not os.path.exists(marker)
    pid = started["vm_result"]["pid"]
    assert vm.qemus() == [pid] and vm.qmp("query-status")["status"] == "running"
    assert vm.apply()["changed"] is False

    # A marker beside a VM that runs here: a warning, and both are left as they are.
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(content, handle)
    beside = vm.apply()
    assert beside["rc"] == 0 and beside["changed"] is False
    assert "[WARNING]: VM rolevm runs on this host, but" in beside["stderr"], beside["stderr"]
    warned = [w for r in beside["records"] for w in r["result"].get("warnings", [])]
    assert any("says that it moved to elsewhere at %s" % content["moved_at"] in str(w) for w in warned), warned
    assert beside["vm_result"]["moved"] == {"to": "elsewhere", "at": content["moved_at"]}
    assert os.path.exists(marker) and vm.qemus() == [pid] and vm.qmp("query-status")["status"] == "running"


def _wait(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_migration_destination_starts_and_adopt_removes_the_marker(ansible, workdir):
    # Two run folders stand for two hosts, a and b.
    here = RoleVM(ansible, os.path.join(workdir, "a"), vm_shutdown_timeout=0)
    there = RoleVM(ansible, os.path.join(workdir, "b"), vm_shutdown_timeout=0)
    try:
        # The VM ran on b once and moved to a: b has the marker (written although nothing ran on b).
        marked = there.apply(vm_state="absent", vm_moved_to="a")
        assert marked["rc"] == 0 and marked["changed"] is True, marked["stdout"]
        assert there.files() == ["rolevm.moved"]
        assert here.apply()["rc"] == 0
        here.wait_serial("guest: tick 2 ")

        # Back to b: the destination starts, the marker stays until the VM arrived.
        dest = there.apply(vm_incoming=True)
        assert dest["rc"] == 0, dest["stdout"]
        assert dest["vm_result"]["moved"]["to"] == "a" and os.path.exists(there.path("rolevm.moved"))
        assert "-incoming" in _cmdline(dest["vm_result"]["pid"]).split("\x00")
        assert there.qmp("query-status")["status"] == "inmigrate"
        uri = "unix:" + os.path.join(workdir, "migrate.sock")
        there.qmp("migrate-incoming", {"uri": uri})
        here.qmp("migrate", {"uri": uri})
        _wait(lambda: here.qmp("query-migrate")["status"] == "completed", "the migration did not complete")
        _wait(lambda: there.qmp("query-status")["status"] == "running", "the VM does not run on b")

        # a stops its QEMU and marks the VM as moved to b.
        left = here.apply(vm_state="absent", vm_moved_to="b")
        assert left["rc"] == 0 and here.qemus() == []
        with open(here.path("rolevm.moved"), encoding="utf-8") as handle:
            assert json.load(handle)["moved_to"] == "b"

        # b adopts the VM: the marker goes (check mode only says so).
        check = there.apply(check=True, tasks_from="adopt", vm_adopt_instance="")
        assert check["rc"] == 0 and check["vm_result"]["moved"] is None, check["stdout"]
        assert os.path.exists(there.path("rolevm.moved"))
        adopted = there.apply(tasks_from="adopt", vm_adopt_instance="")
        assert adopted["rc"] == 0 and adopted["changed"] is True, adopted["stdout"]
        result = adopted["vm_result"]
        assert result["moved"] is None and not os.path.exists(there.path("rolevm.moved"))
        assert there.qemus() == [result["pid"]] and there.qmp("query-status")["status"] == "running"
        names = {"qmp_socket": "rolevm.qmp", "extra_qmp_socket": "rolevm.probe", "pidfile": "rolevm.pid",
                 "definition_file": "rolevm.json", "serial_log": "rolevm.serial.log", "moved_marker": "rolevm.moved"}
        assert dict((key, result[key]) for key in names) == dict((key, there.path(n)) for key, n in names.items())
        assert sorted(result[key] for key in FILE_KEYS) == [there.path(f) for f in there.files()]
        with open(result["definition_file"], encoding="utf-8") as handle:
            assert "-incoming" not in json.load(handle)["command_line"]
        there.wait_serial("guest: tick ")

        # The role finds the VM on b as its own, unchanged; on a it refuses to start it.
        found = there.apply()
        assert found["changed"] is False and found["vm_result"]["pid"] == result["pid"]
        assert found["vm_result"]["definition_changed"] is False and found["vm_result"]["moved"] is None
        refused = here.apply()
        assert refused["rc"] != 0 and here.qemus() == []
        assert any("VM rolevm moved to b at " in r["result"]["msg"] for r in refused["failed"])
    finally:
        for one in (here, there):
            one.apply(vm_state="absent")


def test_serial_log_of_the_qemu_before_is_kept(role_vm):
    vm = role_vm
    log = vm.path("rolevm.serial.log")
    vm.apply()
    vm.wait_serial("guest: tick 2 ")
    assert vm.apply(vm_state="absent", vm_shutdown_timeout=0)["rc"] == 0
    first = vm.read("rolevm.serial.log")
    assert "guest: tick 2 " in first

    # Check mode renames nothing.
    check = vm.apply(check=True)
    assert check["rc"] == 0 and check["changed"] is True
    assert vm.files() == ["rolevm.serial.log"] and vm.read("rolevm.serial.log") == first

    for start in range(2):
        started = vm.apply()
        assert started["rc"] == 0, started["stdout"]
        pid = started["vm_result"]["pid"]
        # The log of the QEMU before is kept whole; the new QEMU writes a new log.
        assert vm.read("rolevm.serial.log.previous") == first, start
        assert log in _open_files(pid) and log + ".previous" not in _open_files(pid)
        vm.wait_serial("guest: tick 1 ")
        assert not vm.read("rolevm.serial.log").startswith(first)
        assert vm.files() == ["rolevm.json", "rolevm.pid", "rolevm.probe", "rolevm.qmp", "rolevm.serial.log",
                              "rolevm.serial.log.previous"]
        assert vm.apply(vm_state="absent", vm_shutdown_timeout=0)["rc"] == 0
        # The next start replaces the older .previous with this log.
        first = vm.read("rolevm.serial.log")


# -- The role acts only on what it proved is this VM's QEMU ----------------------------

def _warnings(result):
    return " ".join(" ".join(r["result"].get("warnings", [])) for r in result["records"]) + result["stderr"]


def _plant_pidfile(vm, pid):
    os.makedirs(vm.run_dir, exist_ok=True)
    with open(vm.path(vm.name + ".pid"), "w", encoding="utf-8") as handle:
        handle.write("%d\n" % pid)


@pytest.fixture
def bystander():
    """A process that is not a QEMU, to be named by a stale pidfile."""
    process = subprocess.Popen(["sleep", "600"])
    yield process
    process.kill()
    process.wait()


def test_a_stale_pidfile_naming_another_process_leaves_it_alone(ansible, workdir, bystander):
    vm = RoleVM(ansible, workdir)
    _plant_pidfile(vm, bystander.pid)
    stopped = vm.apply(vm_state="absent")
    assert stopped["rc"] == 0, stopped["stdout"]
    assert alive(bystander.pid)
    assert "names process %d, which is not VM rolevm's QEMU (sleep 600): that process is left alone" \
        % bystander.pid in _warnings(stopped)
    assert vm.files() == []  # the stale pidfile itself is gone

    # A start that fails (its rescue stops what it started) leaves it alone too.
    _plant_pidfile(vm, bystander.pid)
    failed = vm.apply(vm_kernel="/nonexistent/vmlinuz")
    assert failed["rc"] != 0
    assert any("could not open kernel file" in r["result"]["msg"] for r in failed["failed"])
    assert alive(bystander.pid) and vm.qemus() == []


def test_another_qemu_of_the_same_name_in_the_pidfile_is_left_alone(role_vm, workdir):
    """The pid's command line names the VM, but its start time is not the one the role saved."""
    vm = role_vm
    pid = vm.apply()["vm_result"]["pid"]
    os.kill(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.05)
    other = VM(os.path.join(workdir), name="rolevm").start()  # -name rolevm, another folder
    try:
        _plant_pidfile(vm, other.process.pid)
        stopped = vm.apply(vm_state="absent", vm_shutdown_timeout=0)
        assert stopped["rc"] == 0, stopped["stdout"]
        assert other.alive() and other.status() == "prelaunch"
        assert "names process %d, which is not VM rolevm's QEMU" % other.process.pid in _warnings(stopped)
    finally:
        other.kill()


def test_a_busy_qmp_socket_never_starts_the_vm_twice(role_vm):
    vm = role_vm
    started = vm.apply()["vm_result"]
    socket_path = started["qmp_socket"]
    with QMPClient(socket_path=socket_path, timeout=10) as holder:  # another client holds the socket
        holder.execute("query-status")
        again = vm.apply()
        assert again["rc"] != 0
        messages = " ".join(r["result"]["msg"] for r in again["failed"])
        assert "another client holds its QMP socket %s" % socket_path in messages, messages
        assert vm.qemus() == [started["pid"]]
        assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
    # The VM kept its socket: QEMU answers there again once the other client left.
    with QMPClient(socket_path=socket_path, timeout=10) as client:
        assert client.execute("query-name") == {"name": "rolevm"}
    assert vm.apply()["changed"] is False and vm.qemus() == [started["pid"]]


def test_a_busy_socket_of_a_qemu_the_role_did_not_start_is_in_use(ansible, workdir):
    other = VM(workdir, name="other").start()
    try:
        with QMPClient(socket_path=other.socket, timeout=10) as holder:
            holder.execute("query-status")
            vm = RoleVM(ansible, workdir, vm_qmp_socket=other.socket)
            for state in ("running", "absent"):
                result = vm.apply(vm_state=state)
                assert result["rc"] != 0
                messages = " ".join(r["result"]["msg"] for r in result["failed"])
                assert "%s is in use" % other.socket in messages, messages
            assert vm.qemus() == [] and stat.S_ISSOCK(os.stat(other.socket).st_mode)
        assert other.qmp("query-name") == {"name": "other"}
    finally:
        other.kill()


def test_a_postmigrate_qemu_does_not_count_as_running(role_vm):
    vm = role_vm
    pid = vm.apply()["vm_result"]["pid"]
    vm.qmp("migrate", {"uri": "exec:cat > /dev/null"})
    _wait(lambda: vm.qmp("query-migrate").get("status") == "completed", "the migration to complete")
    result = vm.apply()
    assert result["rc"] != 0
    messages = " ".join(r["result"]["msg"] for r in result["failed"])
    assert "(pid %d, %s) is postmigrate" % (pid, vm.path("rolevm.qmp")) in messages, messages
    assert vm.qemus() == [pid]
    stopped = vm.apply(vm_state="absent", vm_shutdown_timeout=0)
    assert stopped["rc"] == 0 and vm.qemus() == []


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", "."])
def test_a_name_that_is_not_plain_is_refused(ansible, workdir, name):
    vm = RoleVM(ansible, workdir, name=name, vm_extra_qmp_socket="")
    result = vm.apply()
    assert result["rc"] != 0
    messages = " ".join(r["result"]["msg"] for r in result["failed"])
    assert "must be a plain name" in messages, messages
    # Nothing was made, in the run folder or beside it (where "../outside" points).
    assert not os.path.exists(vm.run_dir)
    assert [f for f in os.listdir(workdir) if not f.startswith("results-")] == []


def test_an_existing_run_folder_keeps_its_mode_and_an_unsafe_one_is_refused(ansible, workdir):
    shared = os.path.join(workdir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    vm = RoleVM(ansible, workdir, vm_run_dir=shared, vm_extra_qmp_socket="")
    try:
        started = vm.apply()
        assert started["rc"] == 0, started["stdout"]
        assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    finally:
        vm.apply(vm_state="absent", vm_shutdown_timeout=0)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777

    os.chmod(shared, 0o777)
    refused = vm.apply()
    assert refused["rc"] != 0
    messages = " ".join(r["result"]["msg"] for r in refused["failed"])
    assert "is writable by every user and has no sticky bit" in messages, messages
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o777 and vm.qemus() == []

    fresh = os.path.join(workdir, "fresh", "run")
    # Writing a moved marker makes the folder too.
    fresh_vm = RoleVM(ansible, workdir, vm_run_dir=fresh, vm_extra_qmp_socket="")
    made = fresh_vm.apply(vm_state="absent", vm_moved_to="elsewhere")
    assert made["rc"] == 0 and stat.S_IMODE(os.stat(fresh).st_mode) == 0o750


def test_no_serial_port(role_vm):
    vm = role_vm
    started = vm.apply(vm_serial=None)
    assert started["rc"] == 0, started["stdout"]
    assert started["vm_result"]["serial_log"] is None
    assert "serial0" not in [c["label"] for c in vm.qmp("query-chardev")]
    assert not [f for f in vm.files() if "serial" in f]
    assert vm.apply(vm_serial=None)["changed"] is False
