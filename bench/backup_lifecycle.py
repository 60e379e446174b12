#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backups over their life, as a user runs them (ansible-playbook and the collection's playbooks):

1. A prune that folds a day of increments (24 incremental backups of 1 MiB each) into the full backup
   (1 GiB of data), `playbooks/prune.yml` with keep_last=1, against `qemu-img commit -b BASE TOP` of the
   same images done by hand. Each run on a fresh copy of the chain, interleaved.
2. The VM's QEMU up, and the tiny guest's first tick, with `playbooks/live_restore.yml`, against
   `playbooks/restore.yml` of the whole VM followed by its start (backup_restore_start), for a 4 GiB disk holding
   1 GiB of data. Interleaved. Under TCG the guest's boot takes most of the time to its first tick.

    python bench/backup_lifecycle.py [runs]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import COLLECTIONS, ROOT, qemu_binary  # pylint: disable=wrong-import-order

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient

GUEST = os.path.join(ROOT, ".cache", "guest")
MiB = 1024 * 1024


class Bench:
    def __init__(self, work):
        self.work = work
        self.run_dir = os.path.join(work, "run")
        self.backups = os.path.join(work, "backups")
        self.env = dict(os.environ, ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_NOCOLOR="true",
                        ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_LOCALHOST_WARNING="false",
                        ANSIBLE_INVENTORY_UNPARSED_WARNING="false")

    def playbook(self, path, **variables):
        cmd = ["ansible-playbook", "-i", "localhost,", "-c", "local", path]
        for key, value in variables.items():
            cmd += ["-e", json.dumps({key: value})]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError("%s failed:\n%s\n%s" % (path, proc.stdout[-3000:], proc.stderr[-2000:]))
        return time.perf_counter() - start

    def role(self, tasks_from, **variables):
        path = os.path.join(self.work, "play-%s.yml" % tasks_from)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump([{"hosts": "localhost", "gather_facts": False, "tasks": [
                {"ansible.builtin.include_role": {"name": variables.pop("_role", "qemu.qmp.backup"),
                                                  "tasks_from": tasks_from}}]}], handle)
        return self.playbook(path, **variables)

    def vm(self, state, disks=None):
        variables = {"_role": "qemu.qmp.vm", "vm_name": "lifebench", "vm_run_dir": self.run_dir,
                     "vm_state": state, "vm_shutdown_timeout": 0}
        if disks is not None:
            variables.update(vm_qemu_binary=qemu_binary(), vm_kernel=os.path.join(GUEST, "vmlinuz"),
                             vm_initrd=os.path.join(GUEST, "initrd.gz"), vm_disks=disks,
                             vm_extra_qmp_socket=os.path.join(self.run_dir, "lifebench.probe"),
                             vm_append="console=ttyS0 panic=-1 quiet qmpguest.disk=/dev/vda")
        return self.role("main", **variables)

    def backup(self, level="auto"):
        return self.role("main", backup_name="lifebench", backup_dir=self.backups, backup_level=level,
                         backup_qmp_socket=os.path.join(self.run_dir, "lifebench.qmp"), backup_poll_interval=1,
                         backup_definition_file=os.path.join(self.run_dir, "lifebench.json"))

    def hmp(self, command):
        with QMPClient(socket_path=os.path.join(self.run_dir, "lifebench.probe"), timeout=60) as client:
            return client.execute("human-monitor-command", {"command-line": command})

    def first_tick(self, started, timeout=300):
        """(seconds until the VM's QEMU runs (its QMP socket is there), seconds until the guest's first tick)."""
        log = os.path.join(self.run_dir, "lifebench.serial.log")
        socket = os.path.join(self.run_dir, "lifebench.qmp")
        deadline = time.monotonic() + timeout
        running = None
        while time.monotonic() < deadline:
            if running is None and os.path.exists(socket):
                running = time.perf_counter() - started
            try:
                with open(log, encoding="utf-8", errors="replace") as handle:
                    if "guest: tick " in handle.read():
                        return running, time.perf_counter() - started
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        raise RuntimeError("the guest printed no tick within %ds" % timeout)


def timed_background(bench, entry, variables):
    """Run an entry point of the backup role in a thread; return (thread, start time, errors)."""
    errors = []

    def target():
        try:
            bench.role(entry, **variables)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            errors.append(exc)
    thread = threading.Thread(target=target)
    started = time.perf_counter()
    thread.start()
    return thread, started, errors


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    work = tempfile.mkdtemp(prefix="qmplife", dir="/tmp")
    bench = Bench(work)
    try:
        os.makedirs(os.path.join(work, "vm"))
        disk = os.path.join(work, "vm", "disk0.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "4G"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1G 1G", disk], check=True,
                       capture_output=True)
        bench.vm("running", [{"path": disk, "node_name": "disk0"}])
        bench.hmp("stop")
        bench.backup("full")
        for hour in range(24):
            bench.hmp('qemu-io -d dev-disk0/virtio-backend "write -P 0x%02x %d 1M"' % (hour + 1, (2048 + 3 * hour) * MiB))
            bench.backup()
        bench.hmp("cont")
        bench.vm("absent")
        chain = [c for c in os.listdir(os.path.join(bench.backups, "lifebench")) if not c.startswith(".")][0]

        prune_times, commit_times = [], []
        for index in range(runs):
            copies = {}
            for kind in ("prune", "commit"):
                copies[kind] = os.path.join(work, "%s-%d" % (kind, index))
                shutil.copytree(os.path.join(bench.backups, "lifebench"), os.path.join(copies[kind], "lifebench"))
            prune_times.append(bench.role("prune", backup_name="lifebench", backup_dir=copies["prune"],
                                          backup_retention={"keep_last": 1}))
            folder = os.path.join(copies["commit"], "lifebench", chain)
            start = time.perf_counter()
            subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", "-b",
                            os.path.join(folder, "0000-full", "disk0.qcow2"),
                            os.path.join(folder, "0024-incremental", "disk0.qcow2")], check=True)
            subprocess.run(["sync"], check=True)
            commit_times.append(time.perf_counter() - start)
            for path in copies.values():
                shutil.rmtree(path)

        live_times, plain_times, live_running, plain_running = [], [], [], []
        for index in range(runs):
            for kind in ("live", "plain"):
                shutil.rmtree(bench.run_dir, ignore_errors=True)
                target = os.path.join(work, "%s-%d" % (kind, index))
                variables = {"backup_name": "lifebench", "backup_dir": bench.backups, "backup_restore_dir": target}
                if kind == "live":
                    entry, variables["backup_poll_interval"] = "live_restore", 1
                else:
                    entry, variables["backup_restore_start"] = "restore", True
                thread, started, errors = timed_background(bench, entry, variables)
                running, tick = bench.first_tick(started)
                (live_times if kind == "live" else plain_times).append(tick)
                (live_running if kind == "live" else plain_running).append(running)
                thread.join()
                if errors:
                    raise errors[0]
                bench.vm("absent")
                shutil.rmtree(target)
    finally:
        subprocess.run(["pkill", "-f", work], check=False)
        shutil.rmtree(work, ignore_errors=True)

    def line(what, mine, theirs, label):
        print("%-68s %7.2f s against %7.2f s (%s): ratio %.2f" % (
            what, statistics.median(mine), statistics.median(theirs), label,
            statistics.median(mine) / statistics.median(theirs)))
    print("runs: %d each, interleaved; medians" % runs)
    line("prune folding 24 incrementals into a 1 GiB full (playbook)", prune_times, commit_times,
         "qemu-img commit -b + sync")
    line("VM running (its QEMU up), 4 GiB disk with 1 GiB data: live restore", live_running, plain_running,
         "restore + start")
    line("first guest tick (TCG boot included): live restore", live_times, plain_times, "restore + start")


if __name__ == "__main__":
    main()
