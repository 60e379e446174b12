# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qemu.qmp.migrate role across two SSH hosts (tests/integration/two_hosts.py).

The guest goes on counting, its pause is measured from outside against the limit, the destination listens only
on its own address, TLS leaves nothing readable on the wire, backups go on, and faults leave the source running
alone with nothing on the destination.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from backup_helpers import MiB
from harness import GUEST_DIR, ROOT, qemu_binary
from test_role_migrate import SLOTS, records
from two_hosts import SHARED_DIR
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient

TICK = re.compile(r"guest: tick (\d+) ([0-9.]+)\r?\n")
QEMU_10 = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       ".cache", "qemu10", "bin", "qemu-system-x86_64")
LIMIT_S = 0.3
# What must never cross the wire in plain text with TLS on: the migration stream's magic ("QEVM"), the
# magic of a multifd channel, an NBD request, and the disk's data (a page of 0x5a bytes).
# The role's cross-host order is the same whatever the QEMU: these run once, in the QEMU 7.2 lane, which also
# moves a VM from QEMU 7.2 to 10.0 (each QEMU's side of the engine is tested in both lanes, on one host).
pytestmark = pytest.mark.skipif(os.path.realpath(qemu_binary()) == os.path.realpath(QEMU_10),
                                reason="cross-host migrations run in the QEMU 7.2 lane")
PLAIN_MARKS = {"migration stream": b"QEVM", "multifd channel": b"\x11\x22\x33\x44",
               "NBD request": b"\x25\x60\x95\x13", "disk data": b"\x5a" * 512}


class CrossHostVM:
    """A VM defined once for both hosts (group variables), moved between them by the migrate role."""

    def __init__(self, two_hosts, ansible, workdir, disk=True, shared=False, host_vars=None, **group_vars):
        self.hosts = two_hosts
        self.ansible = ansible
        self.name = "xm-" + os.path.basename(workdir)[-8:]
        folder = os.path.join(SHARED_DIR, self.name) if shared else "/var/lib/qemu-qmp/" + self.name
        self.disk = os.path.join(folder, "disk0.qcow2")
        self.backups = os.path.join(SHARED_DIR, "backups-" + self.name)
        variables = {
            "vm_name": self.name,
            "vm_qemu_binary": qemu_binary(),
            "vm_kernel": os.path.join(GUEST_DIR, "vmlinuz"),
            "vm_initrd": os.path.join(GUEST_DIR, "initrd.gz"),
            "vm_append": "console=ttyS0 panic=-1 quiet" + (
                " qmpguest.disk=/dev/vda qmpguest.slots=%d" % SLOTS if disk else ""),
            "vm_disks": [{"path": self.disk, "node_name": "disk0"}] if disk else [],
            "vm_shutdown_timeout": 0,
            "migrate_poll_interval": 0.5,
            "migrate_tls_throwaway_ca": True,
            "backup_dir": self.backups,
            "backup_name": self.name,
            "backup_poll_interval": 1,
            "ansible_pipelining": True,
        }
        variables.update(group_vars)
        self.inventory = two_hosts.write_inventory(os.path.join(workdir, "inventory.yml"), group_vars=variables,
                                                   host_vars=host_vars or {})
        if disk:
            self.hosts.host1.run(["mkdir", "-p", folder])
            self.hosts.host1.run(["qemu-img", "create", "-q", "-f", "qcow2", self.disk, "32M"])
            # Data the guest never touches, so the copy has more than the guest's records to carry.
            self.hosts.host1.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 16M", self.disk])

    def play(self, host, tasks, check=False, **variables):
        play = [{"hosts": host, "gather_facts": False, "vars": variables, "tasks": tasks}]
        records_, proc = self.ansible.playbook(json.dumps(play), args=["-i", self.inventory] + (
            ["--check"] if check else []))
        failed = [r["result"].get("msg", "") for r in records_ if r["status"] == "failed"
                  and not r["result"].get("_rescued")]
        return records_, proc, failed

    def role(self, host, name, fact, check=False, tasks_from="main", **variables):
        records_, proc, failed = self.play(host, [
            {"name": "role", "ansible.builtin.include_role": {"name": name, "tasks_from": tasks_from}},
            {"name": "result", "ansible.builtin.debug": {"var": fact}}], check=check, **variables)
        result = next((r["result"].get(fact) for r in records_ if r["task"] == "result"), None)
        changed = any(r["result"].get("changed") for r in records_ if r["status"] == "ok")
        return {"rc": proc.returncode, "result": result, "failed": failed, "changed": changed,
                "stdout": proc.stdout + proc.stderr}

    def start(self, host="host1", **variables):
        outcome = self.role(host, "qemu.qmp.vm", "vm_result", **variables)
        assert outcome["rc"] == 0, outcome["stdout"][-3000:]
        return outcome

    def migrate(self, source, destination, check=False, **variables):
        return self.role(source, "qemu.qmp.migrate", "migrate_result", check=check,
                         migrate_destination_host=destination, **variables)

    def outside(self, host, name):
        """A file of the VM in a host's /run/qemu-qmp, as the machine sees it."""
        return os.path.join(self.hosts[host].run_dir_outside, name)

    def qmp(self, host, command, arguments=None):
        with QMPClient(socket_path=self.outside(host, self.name + ".qmp"), timeout=10) as client:
            return client.execute(command, arguments)

    def serial(self, host):
        try:
            with open(self.outside(host, self.name + ".serial.log"), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def last_tick(self, host):
        ticks = [int(m.group(1)) for m in TICK.finditer(self.serial(host))]
        return max(ticks) if ticks else -1

    def wait_tick(self, host, tick, timeout=90):
        deadline = time.monotonic() + timeout
        while self.last_tick(host) < tick:
            assert time.monotonic() < deadline, "the guest on %s did not reach tick %d" % (host, tick)
            time.sleep(0.2)

    def image_outside(self, host):
        return os.path.join(self.hosts[host].lib_dir_outside, self.disk[len("/var/lib/qemu-qmp/"):])

    def stop_everywhere(self):
        for host in ("host1", "host2"):
            self.role(host, "qemu.qmp.vm", "vm_result", vm_state="absent")


class Watch(threading.Thread):
    """Host time and guest time of each tick from `since` on, on the source's and the destination's console."""

    def __init__(self, vm, source, destination, since):
        super().__init__(daemon=True)
        self.paths = {"source": vm.outside(source, vm.name + ".serial.log"),
                      "destination": vm.outside(destination, vm.name + ".serial.log")}
        self.since = since
        self.seen = {}
        self.running = True
        self.error = None

    def run(self):
        state = dict((where, (None, 0, "")) for where in self.paths)  # inode, offset, partial text
        try:
            while True:
                stopping = not self.running
                for where, path in self.paths.items():
                    state[where] = self.read(where, path, *state[where])
                if stopping:  # one last pass after stop(), so nothing written before it is missed
                    return
                time.sleep(0.005)
        except BaseException as error:  # pylint: disable=broad-exception-caught
            self.error = error

    def read(self, where, path, inode, offset, text):
        try:
            with open(path, "rb") as handle:
                now = os.fstat(handle.fileno()).st_ino
                if now != inode:
                    inode, offset, text = now, 0, ""  # a new log took the name
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            return inode, offset, text
        text += chunk.decode("utf-8", "replace")
        for match in TICK.finditer(text):
            if int(match.group(1)) >= self.since:
                self.seen.setdefault(int(match.group(1)), (where, time.monotonic(), float(match.group(2))))
        return inode, offset + len(chunk), text[text.rfind("\n") + 1:]

    def wait(self, where, count, timeout=90):
        """Until `count` ticks were seen on `where`'s console."""
        deadline = time.monotonic() + timeout
        while sum(1 for seen in list(self.seen.values()) if seen[0] == where) < count:
            assert self.error is None and self.is_alive(), "the console watch stopped: %r" % self.error
            assert time.monotonic() < deadline, "%d ticks not seen on the %s's console: %s" % (count, where, self.seen)
            time.sleep(0.1)

    def pause(self):
        """The guest's pause at the switch-over, seen from outside: host time less the guest's own time."""
        self.wait("destination", 2)
        self.running = False
        self.join()
        assert self.error is None, "the console watch failed: %r" % self.error
        ticks = sorted(self.seen)
        assert ticks == list(range(ticks[0], ticks[-1] + 1)), "ticks lost or repeated: %s" % ticks
        first = min(t for t in ticks if self.seen[t][0] == "destination")
        assert self.seen[first - 1][0] == "source", self.seen
        before, after = self.seen[first - 1], self.seen[first]
        return (after[1] - before[1]) - (after[2] - before[2])


class Listeners(threading.Thread):
    """Every TCP socket a QEMU inside the given hosts listens on while it runs (ss, as the machine
    sees all processes; QEMUs of anything else on the machine are not ours to judge)."""

    def __init__(self, hosts):
        super().__init__(daemon=True)
        self.hosts = hosts
        self.seen = set()
        self.running = True

    def run(self):
        while self.running:
            out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                pids = [int(p) for p in re.findall(r'"qemu-system[^"]*",pid=(\d+)', line)]
                if any(host.holds(pid) for pid in pids for host in self.hosts):
                    self.seen.add(line.split()[3])
            time.sleep(0.05)

    def stop(self):
        self.running = False
        self.join()
        return self.seen


class Capture(threading.Thread):
    """The TCP payload to and from one address on the loopback interface (a raw packet socket)."""

    def __init__(self, address, skip_ports=()):
        super().__init__(daemon=True)
        self.address = socket.inet_aton(address)
        self.skip = set(skip_ports)
        self.data = bytearray()
        self.packets = 0
        self.running = True
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 * MiB)  # SO_RCVBUFFORCE
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)

    def run(self):
        while self.running:
            try:
                frame = self.sock.recv(65600)
            except socket.timeout:
                continue
            ip = frame[14:]
            if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != 6 or self.address not in (ip[12:16], ip[16:20]):
                continue
            tcp = ip[(ip[0] & 15) * 4:]
            ports = struct.unpack("!HH", tcp[:4])
            if self.skip & set(ports):
                continue
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload and len(self.data) < 256 * MiB:
                self.packets += 1
                self.data += payload

    def stop(self):
        self.running = False
        self.join()
        self.sock.close()
        return dict((name, mark in self.data) for name, mark in PLAIN_MARKS.items())


@pytest.fixture
def cross_vm(two_hosts, ansible, workdir):
    made = []

    def make(**kwargs):
        made.append(CrossHostVM(two_hosts, ansible, workdir, **kwargs))
        return made[-1]
    yield make
    for vm in made:
        vm.stop_everywhere()
        for host in two_hosts:
            host.run(["rm", "-rf", os.path.dirname(vm.disk), vm.backups], check=False)


def test_copied_storage_there_and_back_over_tls(cross_vm, two_hosts, workdir):
    vm = cross_vm()
    vm.start("host1")
    vm.wait_tick("host1", 2)
    # Check mode shows the plan and changes nothing on either host.
    plan = vm.migrate("host1", "host2", check=True)
    assert plan["rc"] == 0, plan["stdout"][-3000:]
    assert plan["result"]["status"] == "planned" and plan["result"]["plan"]["tls"] is True
    assert plan["result"]["plan"]["destination"]["host"] == "host2"
    assert two_hosts.host2.qemu_pids() == [] and not os.path.exists(vm.image_outside("host2"))

    full = vm.role("host1", "qemu.qmp.backup", "backup_result")
    assert full["rc"] == 0 and full["result"]["level"] == "full", full["stdout"][-3000:]
    vm.wait_tick("host1", vm.last_tick("host1") + 2)

    watch = Watch(vm, "host1", "host2", since=vm.last_tick("host1"))
    listeners = Listeners(two_hosts)
    capture = Capture(two_hosts.host2.address, skip_ports=[two_hosts.host2.port])
    for thread in (watch, listeners, capture):
        thread.start()
    outcome = vm.migrate("host1", "host2")
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    vm.wait_tick("host2", vm.last_tick("host2") + 2)
    seen_plain, listening = capture.stop(), listeners.stop()
    pause = watch.pause()
    result = outcome["result"]
    assert result["status"] == "completed" and result["storage"] == "copy" and result["tls"] is True
    # The guest's pause, seen from outside, within the limit + 100 ms.
    assert pause <= LIMIT_S + 0.1, (pause, result)
    # The destination listened only on its own address, and nothing readable crossed the wire.
    assert listening and all(a.startswith(two_hosts.host2.address + ":") for a in listening), listening
    assert capture.packets > 100 and not any(seen_plain.values()), (capture.packets, seen_plain)
    # The source is gone, and its host knows where the VM went; no certificate is left on either host.
    assert two_hosts.host1.qemu_pids() == [] and len(two_hosts.host2.qemu_pids()) == 1
    with open(vm.outside("host1", vm.name + ".moved"), encoding="utf-8") as handle:
        assert json.load(handle)["moved_to"] == "host2"
    assert not [n for h in ("host1", "host2") for n in os.listdir(two_hosts[h].run_dir_outside) if n.endswith(".tls")]

    # A second run is unchanged; the vm role on the old host refuses to start the VM again.
    again = vm.migrate("host1", "host2")
    assert again["rc"] == 0 and again["result"]["status"] == "unchanged" and not again["changed"], again["stdout"]
    refused = vm.role("host1", "qemu.qmp.vm", "vm_result")
    assert refused["rc"] != 0 and any("moved to host2" in m for m in refused["failed"]), refused["failed"]
    assert two_hosts.host1.qemu_pids() == []

    # The backup chain goes on on the new host: an incremental that restores to the disk at that point.
    incremental = vm.role("host2", "qemu.qmp.backup", "backup_result")
    assert incremental["rc"] == 0 and incremental["result"]["level"] == "incremental", incremental["stdout"][-3000:]
    vm.qmp("host2", "stop")
    restored = os.path.join(vm.backups, "restored.qcow2")
    restore = vm.role("host2", "qemu.qmp.backup", "backup_restore_result", tasks_from="restore",
                      backup_restore_disk="disk0", backup_restore_output=restored)
    assert restore["rc"] == 0, restore["stdout"][-3000:]
    now, rest_now = records(vm.image_outside("host2"))
    at_backup, rest_backup = records(os.path.join(two_hosts.shared, os.path.relpath(restored, SHARED_DIR)))
    assert rest_now == rest_backup and max(at_backup.values()) > 2
    for slot, tick in now.items():
        assert at_backup.get(slot) == tick or tick > max(at_backup.values()), (slot, tick, at_backup.get(slot))
    vm.qmp("host2", "cont")

    # And back: the stale image on host1 is replaced, the old log kept, the moved marker gone.
    watch = Watch(vm, "host2", "host1", since=vm.last_tick("host2"))
    watch.start()
    back = vm.migrate("host2", "host1")
    assert back["rc"] == 0 and back["result"]["status"] == "completed", back["stdout"][-3000:]
    vm.wait_tick("host1", vm.last_tick("host1") + 2)
    pause = watch.pause()
    assert pause <= LIMIT_S + 0.1, (pause, back["result"])
    assert two_hosts.host2.qemu_pids() == [] and len(two_hosts.host1.qemu_pids()) == 1
    assert not os.path.exists(vm.outside("host1", vm.name + ".moved"))
    assert os.path.exists(vm.outside("host1", vm.name + ".serial.log.previous"))
    vm.qmp("host1", "stop")
    host1_records, dummy = records(vm.image_outside("host1"))
    host2_records, dummy = records(vm.image_outside("host2"))
    assert max(host1_records.values()) >= max(host2_records.values())


def test_shared_storage_both_ways_in_plain_tcp(cross_vm, two_hosts):
    vm = cross_vm(shared=True, migrate_tls=False, migrate_storage="shared")
    vm.start("host1")
    vm.wait_tick("host1", 2)
    # The playbook in check mode prints the plan and changes nothing.
    proc = subprocess.run(["ansible-playbook", "-i", vm.inventory, "playbooks/migrate.yml", "--check", "-l", "host1",
                           "-e", "migrate_destination_host=host2"], cwd=ROOT, env=vm.ansible.env(os.devnull),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "would move VM %s" % vm.name in proc.stdout, proc.stdout[-3000:] + proc.stderr
    assert two_hosts.host2.qemu_pids() == [] and vm.qmp("host1", "query-status")["status"] == "running"
    capture = Capture(two_hosts.host2.address, skip_ports=[two_hosts.host2.port])
    capture.start()
    watch = Watch(vm, "host1", "host2", since=vm.last_tick("host1"))
    watch.start()
    there = vm.migrate("host1", "host2")
    assert there["rc"] == 0 and there["result"]["storage"] == "shared", there["stdout"][-3000:]
    vm.wait_tick("host2", vm.last_tick("host2") + 2)
    seen_plain = capture.stop()
    pause = watch.pause()
    assert there["result"]["tls"] is False and pause <= LIMIT_S + 0.1, (pause, there["result"])
    # Without TLS the stream is readable on the wire: the capture sees what the TLS test must not.
    assert seen_plain["migration stream"], (capture.packets, seen_plain)
    back = vm.migrate("host2", "host1")
    assert back["rc"] == 0 and back["result"]["status"] == "completed", back["stdout"][-3000:]
    vm.wait_tick("host1", vm.last_tick("host1") + 2)
    assert two_hosts.host2.qemu_pids() == [] and len(two_hosts.host1.qemu_pids()) == 1
    assert vm.qmp("host1", "query-status")["status"] == "running"


@pytest.mark.skipif(not os.path.exists(QEMU_10) or qemu_binary() == QEMU_10,
                    reason="needs QEMU 10.0 beside the QEMU under test")
def test_the_destination_uses_its_own_qemu_binary(cross_vm, two_hosts):
    vm = cross_vm(shared=True, migrate_tls=False, migrate_storage="shared",
                  host_vars={"host2": {"vm_qemu_binary": QEMU_10}})
    vm.start("host1")
    vm.wait_tick("host1", 2)
    plan = vm.migrate("host1", "host2", check=True)
    assert plan["result"]["plan"]["destination"]["qemu_binary"] == QEMU_10, plan["result"]
    outcome = vm.migrate("host1", "host2")
    assert outcome["rc"] == 0, outcome["stdout"][-3000:]
    assert vm.qmp("host2", "query-version")["qemu"]["major"] == 10
    vm.wait_tick("host2", vm.last_tick("host2") + 2)
    # The vm role on host2 finds the VM as its own: unchanged, the definition the same.
    found = vm.role("host2", "qemu.qmp.vm", "vm_result")
    assert found["rc"] == 0 and not found["changed"] and not found["result"]["definition_changed"], found["stdout"]


def test_faults_leave_the_source_running_alone(cross_vm, two_hosts):
    vm = cross_vm(vm_memory=256, vm_append="console=ttyS0 panic=-1 quiet qmpguest.fill_mb=96 qmpguest.dirty_mb=16")
    vm.start("host1")
    vm.wait_tick("host1", 1)
    pid = two_hosts.host1.qemu_pids()

    def host2_clean():
        names = [n for n in os.listdir(two_hosts.host2.run_dir_outside) if n.startswith(vm.name)]
        return two_hosts.host2.qemu_pids() == [] and names == [] and not os.path.exists(vm.image_outside("host2"))

    # The NBD port taken on the destination's address: refused before anything moves.
    with socket.socket() as taken:
        taken.bind((two_hosts.host2.address, 0))
        taken.listen()
        outcome = vm.migrate("host1", "host2", migrate_nbd_port=taken.getsockname()[1])
    assert outcome["rc"] != 0 and any("goes on running" in m for m in outcome["failed"]), outcome["failed"]
    assert any("cannot serve the disk copies" in m for m in outcome["failed"]), outcome["failed"]
    assert two_hosts.host1.qemu_pids() == pid and vm.qmp("host1", "query-status")["status"] == "running"
    assert host2_clean()

    # The destination killed in the middle of the disk copy.
    def kill_destination():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                copied = os.stat(vm.image_outside("host2")).st_blocks * 512
            except FileNotFoundError:
                copied = 0
            if copied > 4 * MiB and two_hosts.host2.qemu_pids():
                for qemu in two_hosts.host2.qemu_pids():
                    os.kill(qemu, 9)
                return
            time.sleep(0.05)
    killer = threading.Thread(target=kill_destination, daemon=True)
    killer.start()
    outcome = vm.migrate("host1", "host2", migrate_copy_speed=2 * MiB)
    killer.join()
    assert outcome["rc"] != 0 and any("goes on running" in m for m in outcome["failed"]), outcome["failed"]
    assert two_hosts.host1.qemu_pids() == pid and vm.qmp("host1", "query-status")["status"] == "running"
    assert vm.qmp("host1", "query-block-jobs") == []
    assert not [n["node-name"] for n in vm.qmp("host1", "query-named-block-nodes")
                if n["node-name"].startswith("qemu-qmp-copy")]
    assert host2_clean()
    # And a rerun moves it.
    tick = vm.last_tick("host1")
    again = vm.migrate("host1", "host2")
    assert again["rc"] == 0 and again["result"]["status"] == "completed", again["stdout"][-3000:]
    vm.wait_tick("host2", tick + 2)
