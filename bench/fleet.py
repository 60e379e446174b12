#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A fleet on the two SSH hosts of the integration tests (tests/integration/two_hosts.py), as a user runs it:
the hypervisors' inventory (hypervisors.yml, ansible_pipelining on), the qemu.qmp.qmp inventory plugin
(fleet.qmp.yml, cache off, so every run discovers) and the collection's playbooks.

1. Fleet backup against single-VM runs. 20 VMs (10 per host), QEMUs started paused by the qemu.qmp.vm role
   (64 MiB of RAM), each with one 16 MiB qcow2 disk holding 4 MiB of data on the shared storage. Interleaved,
   per round: (a) the sum of 20 whole `ansible-playbook qemu.qmp.backup -l VM -e backup_level=full`
   processes, one per VM; (b) one `ansible-playbook qemu.qmp.backup_fleet -f 20 -e fleet_backup_budget=2
   -e backup_level=full` over the 20. Medians and the ratio b/a (goal: at most 0.6).
2. Inventory discovery with 20 VMs and then 200 (180 more paused QEMUs without disks, 32 MiB of RAM, started by
   the vm role): the wall time of `ansible-inventory --list` (cache off), and the qemu.qmp.qmp_host_info module's
   own time on one host (its `duration`, from `ansible host1 -m qemu.qmp.qmp_host_info`). Then a projection,
   from these measurements, to 5,000 VMs on 100 hosts with the plugin's default forks (20).

Needs root, openssh-server and util-linux (the two hosts); takes about 10 minutes with 3 rounds.

    python bench/fleet.py [rounds]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import COLLECTIONS, ROOT  # pylint: disable=wrong-import-order

sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

from harness import qemu_binary  # noqa: E402  pylint: disable=wrong-import-position,wrong-import-order
from two_hosts import SHARED_DIR, TwoHosts, unavailable_reason  # noqa: E402  pylint: disable=wrong-import-position

PER_HOST = 10
GROWN_PER_HOST = 100
BUDGET = 2
# The projection: 5,000 VMs on 100 hosts, the plugin's default forks.
PROJECTED_HOSTS = 100
PROJECTED_PER_HOST = 50
PLUGIN_FORKS = 20
# Addresses of their own, apart from those of the integration tests' workers.
ADDRESSES = ("127.0.0.250", "127.0.0.251")


def names(host, first, count):
    return ["bf%s-%03d" % (host[-1], index) for index in range(first, first + count)]


class Terminated(Exception):
    """SIGTERM, so that the hosts are stopped as on Ctrl-C."""


def on_sigterm(signum, frame):
    del signum, frame
    raise Terminated()


class Fleet:
    def __init__(self, hosts, work):
        self.hosts = hosts
        self.work = work
        self.inventory = hosts.write_inventory(os.path.join(work, "hypervisors.yml"), group_vars={"ansible_pipelining": True})
        self.plugin = os.path.join(work, "fleet.qmp.yml")
        with open(self.plugin, "w", encoding="utf-8") as handle:
            json.dump({"plugin": "qemu.qmp.qmp", "hypervisors": ["qemu_hosts"], "cache": False}, handle)
        self.reports = os.path.join(work, "reports")
        self.env = dict(os.environ, ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_NOCOLOR="true",
                        ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_LOCALHOST_WARNING="false",
                        ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_RETRY_FILES_ENABLED="false")
        self.failures = []
        self.warnings = {}  # each warning Ansible gave, with the first run that gave it

    def run(self, argv, env=None, timeout=900):
        """(seconds, CompletedProcess) of a whole process."""
        start = time.perf_counter()
        proc = subprocess.run(argv, env=dict(self.env, **(env or {})), capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=ROOT)
        return time.perf_counter() - start, proc

    def checked(self, what, argv, env=None):
        seconds, proc = self.run(argv, env=env)
        for text in proc.stderr.splitlines():
            if text.startswith(("[WARNING]", "[DEPRECATION WARNING]")) and text not in self.warnings:
                self.warnings[text] = what
        if proc.returncode != 0:
            self.failures.append(what)
            print("FAILED (rc %d): %s\n  %s\n--- last lines ---\n%s\n%s\n---" % (
                proc.returncode, what, " ".join(argv), "\n".join(proc.stdout.splitlines()[-25:]),
                "\n".join(proc.stderr.splitlines()[-15:])), flush=True)
        return seconds, proc

    def start_vms(self, plan, memory, disks):
        """Start the VMs of `plan` ({host: [names]}) with the vm role, one playbook, a loop per host."""
        variables = {
            "vm_name": "{{ fleet_vm }}", "vm_qemu_binary": qemu_binary(), "vm_memory": memory,
            "vm_start_paused": True, "vm_shutdown_timeout": 0,
            "vm_disks": [{"path": SHARED_DIR + "/bench/{{ fleet_vm }}.qcow2", "node_name": "disk0"}] if disks else [],
        }
        play = [{"hosts": "qemu_hosts", "gather_facts": False, "vars": {"fleet_plan": plan}, "tasks": [{
            "name": "start", "ansible.builtin.include_role": {"name": "qemu.qmp.vm"},
            "loop": "{{ fleet_plan[inventory_hostname] }}", "loop_control": {"loop_var": "fleet_vm"},
            "vars": variables}]}]
        path = os.path.join(self.work, "start-%d.yml" % sum(len(v) for v in plan.values()))
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(play, handle)
        seconds, proc = self.run(["ansible-playbook", "-i", self.inventory, path])
        if proc.returncode != 0:
            raise RuntimeError("starting the VMs failed:\n%s\n%s" % (proc.stdout[-3000:], proc.stderr[-2000:]))
        return seconds

    def single_backup(self, name):
        return self.checked("backup of %s" % name, ["ansible-playbook", "-i", self.inventory, "-i", self.plugin,
                                                    "qemu.qmp.backup", "-l", name, "-e", "backup_level=full"])[0]

    def fleet_backup(self):
        return self.checked("backup_fleet", ["ansible-playbook", "-i", self.inventory, "-i", self.plugin,
                                             "qemu.qmp.backup_fleet", "-f", "20", "-e", "fleet_backup_budget=%d" % BUDGET,
                                             "-e", "backup_level=full", "-e", "fleet_report_dir=" + self.reports])[0]

    def inventory_list(self, expected):
        """Seconds of one `ansible-inventory --list`; checks that it lists `expected` answering VMs."""
        seconds, proc = self.checked("ansible-inventory --list", ["ansible-inventory", "-i", self.inventory, "-i",
                                                                  self.plugin, "--list"])
        if proc.returncode == 0:
            listed = json.loads(proc.stdout)
            answering = len(listed.get("qmp_answering", {}).get("hosts", []))
            if answering != expected:
                self.failures.append("ansible-inventory listed %d answering VMs, not %d" % (answering, expected))
                print("ansible-inventory listed %d answering VMs, not %d; stderr:\n%s" % (
                    answering, expected, proc.stderr[-2000:]), flush=True)
        return seconds

    def host_info(self, expected):
        """(wall seconds of `ansible host1 -m qemu.qmp.qmp_host_info`, the module's own duration)."""
        seconds, proc = self.checked("ansible host1 -m qemu.qmp.qmp_host_info", [
            "ansible", "host1", "-i", self.inventory, "-m", "qemu.qmp.qmp_host_info"],
            env={"ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal"})
        if proc.returncode != 0:
            return seconds, float("nan")
        # The minimal callback: "host1 | SUCCESS => {" and the result as indented JSON.
        marker = "host1 | SUCCESS => "
        result = json.JSONDecoder().raw_decode(proc.stdout, proc.stdout.index(marker) + len(marker))[0]
        if len(result["vms"]) != expected:
            self.failures.append("qmp_host_info found %d VMs on host1, not %d" % (len(result["vms"]), expected))
        return seconds, result["duration"]

    def ansible_start(self):
        """Seconds of Ansible's own start, with no host reached: ansible-inventory without the plugin, and the
        `ansible` command line the plugin runs (here with --list-hosts)."""
        inventory = self.checked("ansible-inventory (no plugin)", ["ansible-inventory", "-i", self.inventory, "--list"])[0]
        adhoc = self.checked("ansible --list-hosts", ["ansible", "qemu_hosts", "-i", self.inventory, "--list-hosts"])[0]
        return inventory + adhoc


def make_disks(hosts, vms):
    folder = os.path.join(hosts.shared, "bench")
    os.makedirs(folder, exist_ok=True)
    for name in vms:
        path = os.path.join(folder, name + ".qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", path], check=True, capture_output=True)


def measure_discovery(fleet, runs, per_host):
    """Medians of: ansible-inventory --list, the module's wall and own time on host1."""
    listing, wall, duration = [], [], []
    for dummy in range(runs):
        listing.append(fleet.inventory_list(2 * per_host))
        seconds, own = fleet.host_info(per_host)
        wall.append(seconds)
        duration.append(own)
    return {"list": statistics.median(listing), "adhoc": statistics.median(wall), "module": statistics.median(duration),
            "lists": listing, "modules": duration}


def line(a, b, x):
    """The value at x of the line through (a[0], a[1]) and (b[0], b[1]); and its (fixed part, slope)."""
    slope = (b[1] - a[1]) / (b[0] - a[0])
    fixed = a[1] - slope * a[0]
    return fixed + slope * x, fixed, slope


def run_all(hosts, work, runs):
    fleet = Fleet(hosts, work)
    first = dict((host.name, names(host.name, 0, PER_HOST)) for host in hosts)
    vms = [name for pair in zip(*first.values()) for name in pair]
    make_disks(hosts, vms)
    seconds = fleet.start_vms(first, 64, disks=True)
    print("started 20 paused VMs (64 MiB, one 16 MiB qcow2 disk with 4 MiB of data each) with the vm role: %.1f s"
          % seconds, flush=True)

    # -- 1. the fleet backup against single-VM runs -------------------------------------------------------
    one_listing = fleet.inventory_list(len(vms))
    singles, fleets = [], []
    for index in range(runs):
        each = [fleet.single_backup(name) for name in vms]
        singles.append(sum(each))
        fleets.append(fleet.fleet_backup())
        print("  round %d: 20 single-VM runs %.1f s (each %.1f to %.1f s), fleet run %.1f s" % (
            index + 1, singles[-1], min(each), max(each), fleets[-1]), flush=True)
    single, whole = statistics.median(singles), statistics.median(fleets)
    print()
    print("1. fleet backup against single-VM runs: 20 VMs on 2 hosts, full backups of 4 MiB each, "
          "%d rounds, interleaved; medians" % runs)
    print("   one `ansible-inventory --list` (cache off) discovering the 20:           %6.2f s" % one_listing)
    print("   (a) sum of 20 `ansible-playbook qemu.qmp.backup -l VM` processes:         %6.1f s   rounds: %s" % (
        single, " ".join("%.1f" % s for s in singles)))
    print("   (b) one `ansible-playbook qemu.qmp.backup_fleet -f 20` (budget %d/host):   %6.1f s   rounds: %s" % (
        BUDGET, whole, " ".join("%.1f" % s for s in fleets)))
    print("   ratio b/a: %.2f (goal: at most 0.6)" % (whole / single), flush=True)

    # -- 2. discovery with 20 VMs, then 200 ------------------------------------------------------------------
    ansible_start = statistics.median([fleet.ansible_start() for dummy in range(runs)])
    small = measure_discovery(fleet, runs, PER_HOST)
    grown = dict((host.name, names(host.name, PER_HOST, GROWN_PER_HOST - PER_HOST)) for host in hosts)
    seconds = fleet.start_vms(grown, 32, disks=False)
    print()
    print("started 180 more paused VMs (32 MiB, no disks) with the vm role, one playbook, a loop of 90 per host: "
          "%.1f s" % seconds, flush=True)
    large = measure_discovery(fleet, runs, GROWN_PER_HOST)

    print()
    print("2. inventory discovery (qemu.qmp.qmp, cache off), 2 hosts; medians of %d runs; all measured" % runs)
    print("   %-66s %10s %10s" % ("", "20 VMs", "200 VMs"))
    rows = [
        ("total: `ansible-inventory --list` wall time (s)", small["list"], large["list"], "%10.2f"),
        ("per host: the module's own time on host1 (`duration`, s)", small["module"], large["module"], "%10.3f"),
        ("per VM: module time / VMs on the host (ms)", 1000 * small["module"] / PER_HOST,
         1000 * large["module"] / GROWN_PER_HOST, "%10.2f"),
        ("`ansible host1 -m qemu.qmp.qmp_host_info` wall time (s)", small["adhoc"], large["adhoc"], "%10.2f"),
    ]
    for label, left, right, fmt in rows:
        print("   %-66s " % label + fmt % left + " " + fmt % right)
    print("   growth from 20 to 200 VMs: total x%.2f (+%.2f s, %.1f ms per added VM); module x%.2f (+%.3f s)" % (
        large["list"] / small["list"], large["list"] - small["list"], 1000 * (large["list"] - small["list"]) / 180,
        large["module"] / small["module"], large["module"] - small["module"]))
    print("   Ansible's start, no host reached (ansible-inventory without the plugin + `ansible --list-hosts`): %.2f s"
          % ansible_start)
    print("   runs: list %s | %s s; module %s | %s s" % (
        " ".join("%.2f" % s for s in small["lists"]), " ".join("%.2f" % s for s in large["lists"]),
        " ".join("%.3f" % s for s in small["modules"]), " ".join("%.3f" % s for s in large["modules"])), flush=True)

    # -- the projection ----------------------------------------------------------------------------------------
    module_at, module_fixed, module_slope = line((PER_HOST, small["module"]), (GROWN_PER_HOST, large["module"]),
                                                 PROJECTED_PER_HOST)
    # One discovery here is one round: both hosts at once (forks 20 > 2 hosts).
    round_at, round_fixed, round_slope = line((PER_HOST, small["list"] - ansible_start),
                                              (GROWN_PER_HOST, large["list"] - ansible_start), PROJECTED_PER_HOST)
    waves = math.ceil(PROJECTED_HOSTS / PLUGIN_FORKS)
    total = ansible_start + waves * round_at
    # Not per wave: the controller reads every VM's result and adds its host once, for all 5,000 VMs. What the
    # round's slope holds beyond the module's is that work for the 2 hosts' VMs (and their results' transfer).
    controller_per_vm = max(0.0, round_slope - module_slope) / len(hosts.hosts)
    total_upper = total + (PROJECTED_HOSTS * PROJECTED_PER_HOST - waves * len(hosts.hosts) * PROJECTED_PER_HOST) * \
        controller_per_vm
    print()
    print("   projection to %d VMs on %d hosts (%d VMs per host), plugin forks %d: PROJECTED, not measured" % (
        PROJECTED_HOSTS * PROJECTED_PER_HOST, PROJECTED_HOSTS, PROJECTED_PER_HOST, PLUGIN_FORKS))
    print("     measured: module time per host at 10 and 100 VMs/host; ansible-inventory wall time at 10 and 100 "
          "VMs/host (one round of 2 hosts); Ansible's start")
    print("     module per host  m(n) = %.3f s + %.2f ms x n  (line through (10, %.3f) and (100, %.3f)) -> m(50) = %.3f s"
          % (module_fixed, 1000 * module_slope, small["module"], large["module"], module_at))
    print("     round per host   r(n) = ansible-inventory wall - Ansible's start = %.2f s + %.2f ms x n  "
          "(ssh + module + results) -> r(50) = %.2f s, of it ssh and the rest %.2f s" % (
              round_fixed, 1000 * round_slope, round_at, round_at - module_at))
    print("     waves = ceil(%d hosts / %d forks) = %d" % (PROJECTED_HOSTS, PLUGIN_FORKS, waves))
    print("     total = Ansible's start + waves x r(50) = %.2f + %d x %.2f = %.1f s" % (ansible_start, waves, round_at, total))
    print("     assumes a wave of 20 hosts takes what a round of 2 takes here (each host on its own CPUs, the controller "
          "not slowed by 20 ssh sessions at once)")
    print("     not in the formula: the controller's work per VM (%.2f ms per VM here, from r's slope beyond m's) is "
          "done for all %d VMs, not per wave: up to %.1f s with it" % (
              1000 * controller_per_vm, PROJECTED_HOSTS * PROJECTED_PER_HOST, total_upper))
    if fleet.warnings:
        print()
        print("Ansible's warnings (each once, with the first run that gave it):")
        for text, what in fleet.warnings.items():
            print("   %s: %s" % (what, text[:300]))
    return fleet.failures


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    reason = unavailable_reason()
    if reason:
        sys.exit("bench/fleet.py: %s" % reason)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)
    base = tempfile.mkdtemp(prefix="qbf", dir="/tmp")
    work = tempfile.mkdtemp(prefix="qbfw", dir="/tmp")
    hosts = TwoHosts(base, addresses=ADDRESSES)
    failures = []
    try:
        hosts.start()
        failures = run_all(hosts, work, runs)
    finally:
        try:
            hosts.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
        print()
        print("stopped the hosts: %d QEMUs sent SIGTERM, in %.1f s" % (len(hosts.stopped_qemus), hosts.stop_seconds or 0))
    print("whole benchmark: %.0f s" % (time.monotonic() - began))
    if failures:
        print("FAILED: %s" % "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
