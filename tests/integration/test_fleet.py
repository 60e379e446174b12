# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A fleet of 20 VMs on the two SSH hosts (tests/integration/two_hosts.py): the qemu.qmp.qmp inventory
plugin, the qemu.qmp.backup_fleet playbook and the qemu.qmp.evacuate playbook.

One scenario, in order, on the same VMs: the inventory lists them (a busy and a dead socket among them, the
cache used on a second run); the fleet backup backs up every VM but one whose backup folder is read-only,
never more than two backups at once on a host (counted in QEMU while it runs); the evacuation moves every
VM of host1 to host2 with never more than two migrations leaving host1 at once, and the guests go on.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import yaml

from harness import GUEST_DIR, ROOT, qemu_binary
from two_hosts import SHARED_DIR
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient, QMPError

QEMU_10 = os.path.join(ROOT, ".cache", "qemu10", "bin", "qemu-system-x86_64")
# The plugin, the playbooks and the host-side budget are the same whatever the QEMU (both QEMUs' sides of
# the engines are tested in both lanes): the fleet runs once, in the QEMU 10.0 lane, with the newest
# ansible-core, whose inventory internals the plugin uses. The QEMU 7.2 lane has the cross-host migrations,
# whose guest pauses are measured: they are not run beside 20 VMs.
pytestmark = pytest.mark.skipif(os.path.realpath(qemu_binary()) != os.path.realpath(QEMU_10),
                                reason="the fleet runs in the QEMU 10.0 lane")
PER_HOST = 10
BUDGET = 2
# These two run the tiny guest, which counts on its console; the others are QEMUs started paused.
GUESTS = ("fl1-00", "fl1-01")
READ_ONLY = "fl1-03"
TICK = re.compile(r"guest: tick (\d+)")
BACKUPS = "/var/lib/qemu-qmp/backups"
MiB = 1024 * 1024
# Jobs and migrations that are under way, as QEMU reports them.
RUNNING_JOB = ("created", "running", "paused", "ready", "waiting", "pending", "standby")
MIGRATING = ("setup", "active", "device", "pre-switchover", "postcopy-active", "wait-unplug", "cancelling")


def names(host):
    return ["fl%s-%02d" % (host[-1], index) for index in range(PER_HOST)]


class Fleet:
    def __init__(self, hosts, ansible, workdir):
        self.hosts = hosts
        self.ansible = ansible
        self.workdir = workdir
        self.inventory = hosts.write_inventory(os.path.join(workdir, "hypervisors.yml"),
                                               group_vars={"ansible_pipelining": True})
        self.cache = os.path.join(workdir, "inventory-cache")
        self.plugin = os.path.join(workdir, "fleet.qmp.yml")
        # The plugin's own example, as written but for where its cache goes.
        config = yaml.safe_load(plugin_example())
        assert config["cache"] is True and config["hypervisors"] == ["qemu_hosts"]
        config["cache_connection"] = self.cache
        with open(self.plugin, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        self.reports = os.path.join(workdir, "reports")

    def run(self, argv, timeout=600):
        env = self.ansible.env(os.path.join(self.workdir, "results-%d.jsonl" % time.monotonic_ns()))
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)

    def inventory_list(self, flush=False):
        proc = self.run(["ansible-inventory", "-i", self.inventory, "-i", self.plugin, "--list"]
                        + (["--flush-cache"] if flush else []))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return plain(json.loads(proc.stdout)), proc.stderr

    def playbook(self, name, *args):
        return self.run(["ansible-playbook", "-i", self.inventory, "-i", self.plugin, "--flush-cache", "-f", "12",
                         "qemu.qmp." + name, "-e", "fleet_report_dir=" + self.reports] + list(args))

    def start(self, extra=None):
        """Start the VMs with the vm role: PER_HOST on each host, each with one disk on the shared storage."""
        disks = os.path.join(self.hosts.shared, "fleet")
        os.makedirs(disks, exist_ok=True)
        plan = dict((host.name, names(host.name)) for host in self.hosts)
        for name in sum(plan.values(), []) + list(extra or []):
            path = os.path.join(disks, name + ".qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x%02x 0 4M" % (len(name) * 7 % 256), path],
                           check=True, capture_output=True)
        if extra:
            plan["host2"] = plan["host2"] + list(extra)
        guests = json.dumps(list(GUESTS))
        play = [{"hosts": "qemu_hosts", "gather_facts": False, "vars": {"fleet_plan": plan}, "tasks": [{
            "name": "start", "ansible.builtin.include_role": {"name": "qemu.qmp.vm"},
            "loop": "{{ fleet_plan[inventory_hostname] }}", "loop_control": {"loop_var": "fleet_vm"},
            "vars": {
                "vm_name": "{{ fleet_vm }}", "vm_qemu_binary": qemu_binary(),
                "vm_memory": "{{ 256 if fleet_vm in %s else 64 }}" % guests,
                "vm_start_paused": "{{ fleet_vm not in %s }}" % guests,
                "vm_kernel": "{{ '%s' if fleet_vm in %s else '' }}" % (os.path.join(GUEST_DIR, "vmlinuz"), guests),
                "vm_initrd": "{{ '%s' if fleet_vm in %s else '' }}" % (os.path.join(GUEST_DIR, "initrd.gz"), guests),
                "vm_append": "console=ttyS0 panic=-1 quiet",
                "vm_extra_qmp_socket": "/run/qemu-qmp/{{ fleet_vm }}.mon.qmp",
                "vm_disks": [{"path": SHARED_DIR + "/fleet/{{ fleet_vm }}.qcow2", "node_name": "disk0"}],
                "vm_shutdown_timeout": 0,
            }}]}]
        records, proc = self.ansible.playbook(json.dumps(play), args=["-i", self.inventory])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

    def outside(self, host, name):
        return os.path.join(self.hosts[host].run_dir_outside, name)

    def monitor(self, host, name, command, arguments=None):
        """Ask a VM's QEMU on its second QMP socket (the first is the engines')."""
        with QMPClient(socket_path=self.outside(host, name + ".mon.qmp"), timeout=10) as client:
            return client.execute(command, arguments)

    def ticks(self, host, name):
        try:
            with open(self.outside(host, name + ".serial.log"), encoding="utf-8", errors="replace") as handle:
                found = [int(m.group(1)) for m in TICK.finditer(handle.read())]
        except FileNotFoundError:
            return -1
        return max(found) if found else -1

    def wait_ticks(self, host, name, tick, timeout=90):
        deadline = time.monotonic() + timeout
        while self.ticks(host, name) < tick:
            assert time.monotonic() < deadline, "the guest of %s on %s did not reach tick %d" % (name, host, tick)
            time.sleep(0.2)

    def report(self, operation):
        found = sorted(glob.glob(os.path.join(self.reports, operation + "-*.json")))
        assert found, "no %s report in %s" % (operation, self.reports)
        with open(found[-1], encoding="utf-8") as handle:
            return json.load(handle)


class Counter(threading.Thread):
    """Counts, over and over while it runs, what QEMU reports under way on each host: `count(reply)` of each
    VM's answer to `command` on its monitor socket. Keeps the highest sum per host, and every sample."""

    def __init__(self, fleet, where, command, count):
        super().__init__(daemon=True)
        self.fleet, self.where, self.command, self.count = fleet, where, command, count
        self.most = dict((host, 0) for host in where)
        self.samples = 0
        self.stopping = threading.Event()
        self.errors = []

    def run(self):
        while not self.stopping.is_set():
            for host, vms in self.where.items():
                busy = 0
                for name in vms:
                    try:
                        busy += self.count(self.fleet.monitor(host, name, self.command))
                    except (QMPError, OSError):
                        pass  # not there (yet, or any more)
                self.most[host] = max(self.most[host], busy)
            self.samples += 1

    def stop(self):
        self.stopping.set()
        self.join(30)
        return self.most


@pytest.fixture
def fleet(two_hosts, ansible, workdir):
    made = Fleet(two_hosts, ansible, workdir)
    yield made
    for host in two_hosts:
        host.run("umount %s/%s 2>/dev/null; pkill -KILL -f -- '-name fl[12]-' ; "
                 "rm -rf /run/qemu-qmp/fl* /run/qemu-qmp/budget %s" % (BACKUPS, READ_ONLY, BACKUPS), check=False)
    subprocess.run(["rm", "-rf", os.path.join(two_hosts.shared, "fleet")], check=False)


def test_fleet_inventory_backup_and_evacuation(fleet):
    hosts = fleet.hosts
    fleet.start(extra=["fl2-busy", "fl2-dead"])
    for name in GUESTS:
        fleet.wait_ticks("host1", name, 1)

    # -- the inventory ----------------------------------------------------------------------------------
    # fl2-busy: a client holds its QMP socket; fl2-dead: its QEMU was killed, its files are left.
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(fleet.outside("host2", "fl2-busy.qmp"))
    kill_vm(hosts.host2, "fl2-dead")
    begin = time.monotonic()
    listed, warnings = fleet.inventory_list()
    first_seconds = time.monotonic() - begin
    hostvars = listed["_meta"]["hostvars"]
    every = names("host1") + names("host2")
    assert sorted(listed["qmp_vms"]["hosts"]) == sorted(every + ["fl2-busy", "fl2-dead"]), listed["qmp_vms"]
    assert sorted(listed["qmp_answering"]["hosts"]) == sorted(every)
    assert sorted(listed["qmp_unreachable"]["hosts"]) == ["fl2-busy", "fl2-dead"]
    assert hostvars["fl2-busy"]["qmp_state"] == "busy" and "greeting" in hostvars["fl2-busy"]["qmp_state_msg"]
    assert hostvars["fl2-dead"]["qmp_state"] == "dead", hostvars["fl2-dead"]
    # The example's compose, groups and keyed_groups.
    assert sorted(listed["never_backed_up"]["hosts"]) == sorted(every + ["fl2-busy", "fl2-dead"])
    assert all(hostvars[name]["backup_level"] == "full" for name in every)
    version = fleet.monitor("host1", "fl1-00", "query-version")["qemu"]
    assert sorted(listed["qemu_%(major)d_%(minor)d_%(micro)d" % version]["hosts"]) == sorted(every)
    # One hypervisor's VM, then the other's: forks spread a play over both.
    order = listed["qmp_vms"]["hosts"]
    assert [hostvars[name]["qmp_hypervisor"] for name in order[:4]] == ["host1", "host2", "host1", "host2"]
    for host in hosts:
        assert sorted(listed["qmp_on_" + host.name]["hosts"]) == sorted(
            names(host.name) + (["fl2-busy", "fl2-dead"] if host.name == "host2" else []))
        for name in names(host.name):
            variables = hostvars[name]
            version = fleet.monitor(host.name, name, "query-version")["qemu"]
            status = fleet.monitor(host.name, name, "query-status")["status"]
            assert variables["qmp_hypervisor"] == host.name
            assert variables["ansible_host"] == host.address and variables["ansible_port"] == host.port
            assert variables["qmp_socket"] == "/run/qemu-qmp/%s.qmp" % name
            assert variables["qmp_state"] == status == ("running" if name in GUESTS else "prelaunch")
            assert variables["qmp_qemu_version"] == "%(major)d.%(minor)d.%(micro)d" % version
            assert variables["qmp_managed"] is True
            assert [(d["node_name"], d["file"]) for d in variables["qmp_disks"]] == [
                ("disk0", SHARED_DIR + "/fleet/%s.qcow2" % name)]
            assert variables["qmp_last_backup"] is None
            assert variables["vm_disks"] == [{"path": SHARED_DIR + "/fleet/%s.qcow2" % name, "node_name": "disk0"}]
            assert variables["vm_name"] == name and variables["vm_start_paused"] is (name not in GUESTS)
    # The second run reads the cache: the same discovery, though the busy socket is free again by now.
    holder.close()
    begin = time.monotonic()
    cached, dummy = fleet.inventory_list()
    cached_seconds = time.monotonic() - begin
    assert cached["_meta"]["hostvars"]["fl2-busy"]["qmp_state"] == "busy"
    assert all(cached["_meta"]["hostvars"][n]["qmp_discovered_at"] == hostvars[n]["qmp_discovered_at"] for n in every)
    assert os.listdir(fleet.cache)
    fresh, dummy = fleet.inventory_list(flush=True)
    assert fresh["_meta"]["hostvars"]["fl2-busy"]["qmp_state"] == "prelaunch"
    print("inventory: %.2fs, from its cache %.2fs" % (first_seconds, cached_seconds))
    assert "fl2-" not in warnings, warnings
    # The fleet is the 20 from here on.
    kill_vm(hosts.host2, "fl2-busy")
    hosts.host2.run("rm -f /run/qemu-qmp/fl2-busy* /run/qemu-qmp/fl2-dead*")

    # -- the fleet backup -------------------------------------------------------------------------------
    hosts.host1.run("mkdir -p {0} && mount --bind {0} {0} && mount -o remount,bind,ro {0}".format(
        BACKUPS + "/" + READ_ONLY))
    counter = Counter(fleet, dict((h.name, names(h.name)) for h in hosts), "query-block-jobs",
                      lambda jobs: sum(1 for job in jobs if job["type"] == "backup"))
    counter.start()
    proc = fleet.playbook("backup_fleet", "-e", "fleet_backup_budget=%d" % BUDGET, "-e", "fleet_junit=true",
                          "-e", "backup_speed=%d" % (8 * MiB))
    most = counter.stop()
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "1 of 20 VMs failed: %s" % READ_ONLY in output, output[-3000:]
    report = fleet.report("backup_fleet")
    rows = dict((row["vm"], row) for row in report["vms"])
    assert sorted(rows) == sorted(every) and report["failed"] == [READ_ONLY]
    assert "Read-only file system" in rows[READ_ONLY]["msg"], rows[READ_ONLY]
    for name in every:
        if name == READ_ONLY:
            continue
        assert rows[name]["result"] == "ok" and rows[name]["level"] == "full", rows[name]
    # Never more than the budget at once on a host, and the budget was reached: the count can see it.
    assert most == {"host1": BUDGET, "host2": BUDGET}, (most, counter.samples)
    assert any(row.get("waited_seconds", 0) > 0 for row in rows.values())
    with open(glob.glob(os.path.join(fleet.reports, "backup_fleet-*.xml"))[0], encoding="utf-8") as handle:
        junit = handle.read()
    assert 'tests="20" failures="1"' in junit and 'name="%s"' % READ_ONLY in junit
    assert "VM" in output and "WAITED_SECONDS" in output
    # What QEMU and the disks hold: each VM's bitmap, and a backup equal to its (unchanged) disk.
    for host in hosts:
        for name in names(host.name):
            bitmaps = [b["name"] for d in fleet.monitor(host.name, name, "query-block")
                       for b in (d.get("inserted") or {}).get("dirty-bitmaps", [])]
            assert bool(bitmaps) is (name != READ_ONLY), (name, bitmaps)
    images = host_images(hosts.host2, "fl2-05")
    assert len(images) == 1
    hosts.host2.run(["qemu-img", "compare", "-U", SHARED_DIR + "/fleet/fl2-05.qcow2", images[0]])

    # -- the evacuation ---------------------------------------------------------------------------------
    before = dict((name, fleet.ticks("host1", name)) for name in GUESTS)
    counter = Counter(fleet, {"host1": names("host1")}, "query-migrate",
                      lambda info: 1 if info.get("status") in MIGRATING else 0)
    counter.start()
    proc = fleet.playbook("evacuate", "-e", "evacuate_host=host1", "-e", "evacuate_budget=%d" % BUDGET,
                          "-e", "migrate_storage=shared", "-e", "migrate_tls=false",
                          "-e", json.dumps({"migrate_parameters": {"max-bandwidth": 16 * MiB}}))
    most = counter.stop()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    report = fleet.report("evacuate")
    assert sorted(row["vm"] for row in report["vms"]) == sorted(names("host1"))
    assert all(row["result"] == "ok" and row["to"] == "host2" for row in report["vms"]), report["vms"]
    assert most["host1"] <= BUDGET, most
    assert any(row["waited_seconds"] > 0 for row in report["vms"]), report["vms"]
    assert not [pid for pid, argv in hosts.host1.processes() if any(a.startswith("fl1-") for a in argv)]
    for name in names("host1"):
        status = fleet.monitor("host2", name, "query-status")["status"]
        assert status == ("running" if name in GUESTS else "prelaunch"), (name, status)
    for name in GUESTS:
        fleet.wait_ticks("host2", name, before[name] + 2)
    # The inventory finds them there.
    after, dummy = fleet.inventory_list(flush=True)
    assert sorted(after["qmp_on_host2"]["hosts"]) == sorted(every)
    assert "qmp_on_host1" not in after or not after["qmp_on_host1"].get("hosts")


def plugin_example():
    """The inventory file in the plugin's EXAMPLES."""
    with open(os.path.join(ROOT, "plugins", "inventory", "qmp.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    return next(node.value.value for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "EXAMPLES")


def plain(value):
    """ansible-inventory's --list marks the plugin's values as unsafe (never templated): read them as they are."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return dict((key, plain(item)) for key, item in value.items())
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def kill_vm(host, name):
    """SIGKILL a VM's QEMU (seen from outside the host), as a crash would."""
    for pid, argv in host.processes():
        if "-name" in argv and argv[argv.index("-name") + 1].split(",")[0] == name:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while host.holds(pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def host_images(host, name):
    """The images of a VM's backups on a host."""
    found = host.run("find %s/%s -name '*.qcow2'" % (BACKUPS, name)).stdout.split()
    return sorted(found)
