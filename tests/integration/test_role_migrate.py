# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qemu.qmp.migrate role: the guest goes on counting, disks arrive equal, backups go on, faults lose nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import types

import pytest

from backup_helpers import MiB
from harness import GUEST_DIR, make_image, qemu_binary
from test_role_backup import BackupRole, wait_for
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient

TICK = re.compile(r"guest: tick (\d+) ([0-9.]+)\r?\n")
RECORD = re.compile(rb"qemu\.qmp guest tick (\d+)\n")
SLOTS = 64


class Guest:
    """A VM defined for the qemu.qmp.vm role, moved by the qemu.qmp.migrate role."""

    def __init__(self, ansible, workdir, append="", disks=()):
        self.ansible = ansible
        # Tests run side by side: each VM has its own name.
        self.name = "mig-" + os.path.basename(workdir)[-8:]
        self.run_dir = os.path.join(workdir, "run")
        self.vars = {
            "vm_name": self.name,
            "vm_run_dir": self.run_dir,
            "vm_qemu_binary": qemu_binary(),
            "vm_kernel": os.path.join(GUEST_DIR, "vmlinuz"),
            "vm_initrd": os.path.join(GUEST_DIR, "initrd.gz"),
            "vm_append": ("console=ttyS0 panic=-1 quiet " + append).strip(),
            "vm_disks": list(disks),
            "vm_shutdown_timeout": 0,
            "migrate_poll_interval": 1,
            # The same QEMU on the same host: migrated only when asked.
            "migrate_force": True,
        }
        self.serial_log = os.path.join(self.run_dir, self.name + ".serial.log")

    def play(self, tasks, check=False, env=None, **extra):
        # Play variables, not extra vars: extra vars would outrank what the migrate role sets for the destination.
        play = [{"hosts": "localhost", "gather_facts": False, "vars": dict(self.vars, **extra), "tasks": tasks}]
        records, proc = self.ansible.playbook(json.dumps(play), args=["--check"] if check else None, env=env)
        failed = [r["result"].get("msg", "") for r in records
                  if r["status"] == "failed" and not r["result"].get("_rescued")]
        return records, proc, failed

    def start(self, **extra):
        dummy, proc, failed = self.play([{"name": "vm", "ansible.builtin.include_role": {"name": "qemu.qmp.vm"}}],
                                        **extra)
        assert proc.returncode == 0 and not failed, proc.stdout[-3000:]

    def stop(self):
        self.play([{"name": "vm", "ansible.builtin.include_role": {"name": "qemu.qmp.vm"}}], vm_state="absent")

    def migrate(self, check=False, env=None, **extra):
        records, proc, failed = self.play([
            {"name": "migrate", "ansible.builtin.include_role": {"name": "qemu.qmp.migrate"}},
            {"name": "result", "ansible.builtin.debug": {"var": "migrate_result"}}], check=check, env=env, **extra)
        result = next((r["result"].get("migrate_result") for r in records if r["task"] == "result"), None)
        changed = any(r["result"].get("changed") for r in records if r["status"] == "ok")
        return {"rc": proc.returncode, "result": result, "failed": failed, "changed": changed,
                "debug": [r["result"].get("msg") for r in records if r["action"] == "ansible.builtin.debug"],
                "stdout": proc.stdout + proc.stderr}

    def migrate_in_background(self, **extra):
        """Start the migrate role in an ansible-playbook of its own (its own process group); returns the Popen."""
        play = [{"hosts": "localhost", "gather_facts": False, "vars": dict(self.vars, **extra), "tasks": [
            {"name": "migrate", "ansible.builtin.include_role": {"name": "qemu.qmp.migrate"}}]}]
        path = os.path.join(self.ansible.workdir, "bg-%d.yml" % time.monotonic_ns())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(play))
        return subprocess.Popen(["ansible-playbook", "-i", "localhost,", "-c", "local", path],
                                env=self.ansible.env(path + ".jsonl"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def migration(self, socket_path):
        """query-migrate on `socket_path`, or {} when it does not answer."""
        try:
            with QMPClient(socket_path=socket_path, timeout=2) as client:
                return client.execute("query-migrate")
        except Exception:  # pylint: disable=broad-except
            return {}

    @property
    def socket(self):
        return os.path.join(self.run_dir, self.name + ".qmp")

    def qmp(self, command, arguments=None, socket_path=None):
        with QMPClient(socket_path=socket_path or self.socket, timeout=10) as client:
            return client.execute(command, arguments)

    def pid(self):
        with open(os.path.join(self.run_dir, self.name + ".pid"), encoding="utf-8") as handle:
            return int(handle.read())

    def qemus(self):
        """Process ids of the QEMUs running this VM (any instance)."""
        out = subprocess.run(["pgrep", "-f", "--", "-name %s " % self.name], capture_output=True, text=True,
                             check=False)
        return [int(p) for p in out.stdout.split()]

    def wait_serial(self, pattern, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.serial_log):
                with open(self.serial_log, encoding="utf-8", errors="replace") as handle:
                    if re.search(pattern, handle.read()):
                        return
            time.sleep(0.1)
        raise AssertionError("guest did not print %r" % pattern)


class SerialWatch(threading.Thread):
    """Notes, on the host's clock, when each tick appears on the source's and on the destination's console.

    Each log is opened once and read as it grows: the destination's log takes the
    source's name after the migration, and the source's stays readable through its
    open file."""

    def __init__(self, guest):
        super().__init__(daemon=True)
        self.paths = {"source": guest.serial_log}
        self.paths.update(("destination" + s, guest.serial_log + s) for s in (".incoming", ".incoming2"))
        self.files = {}
        self.text = {}
        self.seen = {}  # tick -> (where, host time, guest uptime)
        self.running = True
        self.files["source"] = open(guest.serial_log, "rb")  # pylint: disable=consider-using-with

    def run(self):
        while self.running:
            for where, path in self.paths.items():
                if where not in self.files and os.path.exists(path):
                    self.files[where] = open(path, "rb")  # pylint: disable=consider-using-with
            for where, handle in self.files.items():
                self.text[where] = self.text.get(where, "") + handle.read().decode("utf-8", "replace")
                for match in TICK.finditer(self.text[where]):
                    self.seen.setdefault(int(match.group(1)), (where, time.monotonic(), float(match.group(2))))
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.join()
        for handle in self.files.values():
            handle.close()

    def switch(self):
        """(last tick on the source, first on the destination, the guest's pause in seconds).

        Measured from outside the guest: the host time between the two ticks, less the guest's own time
        between them (the guest's clock stands still while QEMU holds it paused)."""
        ticks = sorted(self.seen)
        assert ticks == list(range(ticks[0], ticks[-1] + 1)), "ticks lost or repeated: %s" % ticks
        first = min(t for t in ticks if self.seen[t][0] != "source")
        assert max(t for t in ticks if self.seen[t][0] == "source") == first - 1
        before, after = self.seen[first - 1], self.seen[first]
        return first - 1, first, (after[1] - before[1]) - (after[2] - before[2])


def records(image):
    """{slot: tick} of the guest's records in a disk image, read while QEMU may hold it."""
    raw = image + ".raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, raw], check=True)
    with open(raw, "rb") as handle:
        data = handle.read()
    os.unlink(raw)
    found = {}
    for slot in range(SLOTS):
        match = RECORD.match(data[slot * 4096:slot * 4096 + 64])
        if match:
            found[slot] = int(match.group(1))
    return found, data[SLOTS * 4096:]


def slow_guest(guest, append="qmpguest.fill_mb=96 qmpguest.dirty_mb=16", ready=r"guest: dirtying"):
    """A started guest whose memory takes a while to migrate, and the second QMP socket the test watches it on
    (the migration holds the VM's own, as it would a tool's): (vm, socket)."""
    vm = guest(append=append)
    tools = os.path.join(vm.run_dir, vm.name + ".tools.qmp")
    vm.vars["vm_extra_qmp_socket"] = tools
    vm.start(vm_memory=256)
    vm.wait_serial(ready)
    return vm, tools


def when_under_way(vm, tools, act, timeout=120):
    """Call `act()` in a thread once the VM's migration has sent 4 MiB (read on the second QMP socket `tools`:
    the migration holds the VM's own); returns the thread."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = vm.migration(tools)
            if info.get("status") == "active" and info.get("ram", {}).get("transferred", 0) > 4 * MiB:
                act()
                return
            time.sleep(0.1)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def guest(ansible, workdir):
    made = []

    def make(**kwargs):
        made.append(Guest(ansible, workdir, **kwargs))
        return made[-1]
    yield make
    for one in made:
        one.stop()
        for pid in one.qemus():
            os.kill(pid, signal.SIGKILL)


def test_guest_goes_on_counting_on_the_new_qemu(guest):
    vm = guest()
    vm.start()
    vm.wait_serial(r"guest: tick 3 ")
    old_pid = vm.pid()

    check = vm.migrate(check=True)
    assert check["rc"] == 0, (check["failed"], check["stdout"][-3000:])
    assert vm.qemus() == [old_pid] and vm.qmp("query-status")["status"] == "running"

    watch = SerialWatch(vm)
    watch.start()
    outcome = vm.migrate()
    time.sleep(1.5)
    watch.stop()
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    result = outcome["result"]
    assert result["status"] == "completed" and result["storage"] == "shared" and result["downtime"] is not None
    assert result["tls"] is False and result["policy_steps"] == []
    # The old QEMU is gone; the new one has the VM's socket and pid, and runs the guest.
    assert vm.pid() == result["pid"] != old_pid and vm.qemus() == [result["pid"]]
    assert vm.qmp("query-status")["status"] == "running"
    # No tick lost, none repeated, and the guest's pause, seen from outside, within the limit + 100 ms.
    dummy, dummy, pause = watch.switch()
    assert pause <= 0.3 + 0.1, (pause, result["downtime"])

    # The vm role finds the moved VM as its own, unchanged; and it can move again.
    vm.start()
    again = vm.migrate()
    assert again["rc"] == 0, again["stdout"][-3000:]
    assert vm.qemus() == [again["result"]["pid"]] and vm.qmp("query-status")["status"] == "running"


def test_copied_storage_arrives_equal_while_the_guest_writes(guest, workdir):
    disk = make_image(os.path.join(workdir, "disk0.qcow2"), "32M")
    # Data the guest never touches, so the copy has more than the guest's records to carry.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 16M", disk], check=True, capture_output=True)
    vm = guest(append="qmpguest.disk=/dev/vda qmpguest.slots=%d" % SLOTS,
               disks=[{"path": disk, "node_name": "disk0"}])
    vm.start()
    vm.wait_serial(r"guest: tick 3 ")
    moved = os.path.join(workdir, "moved")
    os.mkdir(moved)
    watch = SerialWatch(vm)
    watch.start()
    outcome = vm.migrate(migrate_storage="copy", migrate_disk_dir=moved)
    time.sleep(1.5)
    watch.stop()
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    assert outcome["result"]["storage"] == "copy"
    # The mirrors finished inside the pause: the guest's pause stays within the limit + 100 ms.
    dummy, dummy, pause = watch.switch()
    assert pause <= 0.3 + 0.1 and outcome["result"]["paused_before_switchover"] < 300, (pause, outcome["result"])
    # The destination uses the copy; stop it so the disk holds still.
    copy = os.path.join(moved, "disk0.qcow2")
    nodes = dict((n["node-name"], n) for n in vm.qmp("query-named-block-nodes"))
    assert nodes["disk0-file"]["file"] == copy
    assert not [n for n in nodes if n.startswith("qemu-qmp-copy")] and vm.qmp("query-block-jobs") == []
    vm.qmp("stop")
    before, rest_before = records(disk)
    after, rest_after = records(copy)
    assert rest_before == rest_after
    # Every record is the source's, except those the guest wrote after the switch-over (later ticks).
    last_on_source = max(before.values())
    assert last_on_source >= 3
    for slot, tick in before.items():
        assert after.get(slot) == tick or after.get(slot, -1) > last_on_source, (slot, tick, after.get(slot))


def test_backup_chain_goes_on_after_migration(guest, workdir, ansible):
    disk = make_image(os.path.join(workdir, "disk0.qcow2"), "32M")
    vm = guest(append="qmpguest.disk=/dev/vda qmpguest.slots=%d" % SLOTS,
               disks=[{"path": disk, "node_name": "disk0"}])
    vm.start()
    vm.wait_serial(r"guest: tick 2 ")
    backups = BackupRole(ansible, types.SimpleNamespace(socket=vm.socket), os.path.join(workdir, "backups"), name=vm.name)
    first = backups.backup()
    assert first["level"] == "full"
    vm.wait_serial(r"guest: tick 8 ")

    outcome = vm.migrate()
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    vm.wait_serial(r"guest: tick %d " % (max(records(disk)[0].values()) + 2))
    second = backups.backup()
    assert second["level"] == "incremental" and not second["warnings"]

    # Stopped, the disk is the disk at the second backup plus what the guest wrote since.
    vm.qmp("stop")
    restored = os.path.join(workdir, "restored.qcow2")
    backups.restore("disk0", restored)
    now, dummy = records(disk)
    at_backup, dummy = records(restored)
    at_full, dummy = records(os.path.join(workdir, "backups", vm.name, first["chain"], "0000-full", "disk0.qcow2"))
    assert max(at_backup.values()) > max(at_full.values())
    last_backed_up = max(at_backup.values())
    for slot, tick in now.items():
        assert at_backup.get(slot) == tick or tick > last_backed_up, (slot, tick, at_backup.get(slot))


def test_destination_killed_mid_migration_then_rerun(guest):
    vm, tools = slow_guest(guest)
    old_pid = vm.pid()
    incoming_pidfile = os.path.join(vm.run_dir, vm.name + ".incoming.pid")

    def kill_destination():
        with open(incoming_pidfile, encoding="utf-8") as handle:
            os.kill(int(handle.read()), signal.SIGKILL)
    killer = when_under_way(vm, tools, kill_destination)
    # Slow enough to be killed in the middle.
    outcome = vm.migrate(migrate_parameters={"max-bandwidth": 8 * MiB}, migrate_timeout=300)
    killer.join()
    assert outcome["rc"] != 0
    assert any("it goes on running" in m for m in outcome["failed"]), outcome["failed"]
    # The source runs as before, alone; nothing of the destination is left.
    assert vm.qemus() == [old_pid] and vm.qmp("query-status")["status"] == "running"
    assert sorted(os.listdir(vm.run_dir)) == sorted([vm.name + s for s in (".json", ".pid", ".qmp", ".tools.qmp",
                                                                           ".serial.log")])

    again = vm.migrate()
    assert again["rc"] == 0, again["stdout"][-3000:]
    assert vm.qemus() == [again["result"]["pid"]] and vm.qmp("query-status")["status"] == "running"


def test_a_vm_that_does_not_run_is_refused(guest):
    vm = guest()
    outcome = vm.migrate()
    assert outcome["rc"] != 0 and vm.qemus() == []
    assert any("does not run on localhost: cannot connect" in m for m in outcome["failed"]), outcome["failed"]


def test_the_same_qemu_is_left_alone_unless_forced(guest, workdir):
    vm = guest(disks=[{"path": make_image(os.path.join(workdir, "disk0.qcow2"), "16M"), "node_name": "disk0"}])
    vm.start()
    pid = vm.pid()
    for check in (True, False):
        outcome = vm.migrate(check=check, migrate_force=False)
        assert outcome["rc"] == 0 and not outcome["changed"], outcome["stdout"][-3000:]
        assert outcome["result"]["status"] == "unchanged"
        assert any("nothing to migrate" in (m or "") for m in outcome["debug"])
    assert vm.qemus() == [pid]
    # Copied storage on the same host needs another folder: refused before anything starts.
    outcome = vm.migrate(migrate_storage="copy")
    assert outcome["rc"] != 0 and any("onto itself" in m for m in outcome["failed"]), outcome["failed"]
    assert vm.qemus() == [pid] and vm.qmp("query-status")["status"] == "running"


@pytest.mark.parametrize("old_qemu", ["postmigrate", "gone"])
def test_playbook_killed_mid_migration_then_rerun_adopts_the_destination(guest, old_qemu):
    """ansible-playbook dies while the VM migrates; the migration goes on on the host and completes. The rerun
    finds the VM on the destination QEMU, makes it the VM's own and stops the old one; also when the old one
    is gone by then (a run killed after it stopped the old QEMU, before the new one took the VM's names)."""
    # No memory dirtied: at 8 MiB/s it completes by itself, well within the run's controller timeout.
    vm, tools = slow_guest(guest, append="qmpguest.fill_mb=64", ready=r"guest: tick 2 ")
    old_pid = vm.pid()
    watch = SerialWatch(vm)
    watch.start()
    controller = vm.migrate_in_background(migrate_parameters={"max-bandwidth": 8 * MiB}, migrate_timeout=300)
    when_under_way(vm, tools, lambda: os.killpg(controller.pid, signal.SIGKILL)).join()
    output = controller.communicate(timeout=60)[0]
    assert controller.returncode == -signal.SIGKILL, output[-3000:]
    wait_for(lambda: vm.migration(tools).get("status") == "completed", timeout=120,
             what="the migration to complete without its controller")
    # The VM has left the source; the destination, not adopted yet, runs it.
    incoming = os.path.join(vm.run_dir, vm.name + ".incoming.qmp")
    assert vm.qmp("query-status", socket_path=tools)["status"] == "postmigrate"
    assert vm.qmp("query-status", socket_path=incoming)["status"] == "running"
    assert len(vm.qemus()) == 2
    if old_qemu == "gone":
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: old_pid not in vm.qemus(), what="the old QEMU to end")

    again = vm.migrate()
    assert again["rc"] == 0, again["stdout"][-3000:]
    result = again["result"]
    assert result["status"] == "completed" and result["resumed"] is True and again["changed"], result
    assert any("runs on %s" % incoming in (m or "") for m in again["debug"]), again["debug"]
    # One QEMU runs the VM, under the VM's own names, and the guest goes on counting.
    assert vm.qemus() == [result["pid"]] and result["pid"] != old_pid and vm.pid() == result["pid"]
    assert result["qmp_socket"] == vm.socket and vm.qmp("query-status")["status"] == "running"
    last = max(watch.seen)
    vm.wait_serial(r"guest: tick %d " % (last + 2))
    watch.stop()
    watch.switch()  # no tick lost, none repeated
    assert not [f for f in os.listdir(vm.run_dir) if ".incoming" in f], os.listdir(vm.run_dir)

    # A third run finds nothing left to finish, and migrates as usual.
    third = vm.migrate()
    assert third["rc"] == 0, third["stdout"][-3000:]
    assert third["result"].get("resumed") is not True and vm.qemus() == [third["result"]["pid"]]


def test_source_killed_mid_migration(guest):
    """The source QEMU dies in the middle: the VM runs nowhere, and the role says so."""
    vm, tools = slow_guest(guest)
    old_pid = vm.pid()
    killer = when_under_way(vm, tools, lambda: os.kill(old_pid, signal.SIGKILL))
    outcome = vm.migrate(migrate_parameters={"max-bandwidth": 8 * MiB}, migrate_timeout=300)
    killer.join()
    assert outcome["rc"] != 0
    message = outcome["failed"][-1]
    assert "goes on running" not in message, message
    assert "the source QEMU (pid %d, %s on localhost) is gone, killed or crashed" % (old_pid, vm.socket) in message, message
    assert "is not running anywhere" in message and "had not received the whole VM" in message, message
    assert "qemu.qmp.vm" in message, message
    # No QEMU is left, and nothing of the destination.
    assert vm.qemus() == []
    assert not [f for f in os.listdir(vm.run_dir) if ".incoming" in f], os.listdir(vm.run_dir)

    # A rerun says the same, and the vm role starts the VM again.
    again = vm.migrate()
    assert again["rc"] != 0 and any("is not running anywhere" in m for m in again["failed"]), again["failed"]
    vm.start()
    assert vm.qmp("query-status")["status"] == "running" and len(vm.qemus()) == 1


def test_migration_run_killed_mid_migration(guest, workdir):
    """The run on the host that drives the migration is killed: QEMU goes on migrating by itself. The role reads
    the source, cancels that migration, and says that the VM goes on running there."""
    vm, tools = slow_guest(guest)
    old_pid = vm.pid()
    runs = os.path.join(workdir, "runs")

    def kill_run():
        for name in os.listdir(runs):
            with open(os.path.join(runs, name, "status.json"), encoding="utf-8") as handle:
                os.kill(json.load(handle)["pid"], signal.SIGKILL)
    killer = when_under_way(vm, tools, kill_run)
    outcome = vm.migrate(env={"QMP_RUNS_DIR": runs}, migrate_parameters={"max-bandwidth": 8 * MiB},
                         migrate_timeout=300)
    killer.join()
    assert outcome["rc"] != 0
    message = outcome["failed"][-1]
    assert "and it goes on running on localhost (%s)" % vm.socket in message, message
    assert "ended without a result" in message and "The source QEMU (%s on localhost) is running" % vm.socket \
        in message, message
    # The migration QEMU went on with is cancelled; the source runs alone, nothing of the destination is left.
    assert vm.migration(tools)["status"] == "cancelled"
    assert vm.qemus() == [old_pid] and vm.qmp("query-status")["status"] == "running"
    assert not [f for f in os.listdir(vm.run_dir) if ".incoming" in f], os.listdir(vm.run_dir)
