#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qemu.qmp.vm role's cost: `ansible-playbook` starting the tiny guest, running again with
nothing to do, and stopping it, against a one-task playbook running ansible.builtin.ping.

    python bench/vm_role.py [runs] [other collections path]

With a second collections path (a folder holding ansible_collections/qemu/qmp, e.g. an older
release), both collections run interleaved, and the ratios between them are printed too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import COLLECTIONS, ROOT, qemu_binary  # pylint: disable=wrong-import-order

GUEST = os.path.join(ROOT, ".cache", "guest")
STEPS = ("start", "unchanged", "stop")


def playbook(env, path, state):
    start = time.perf_counter()
    proc = subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", path, "-e", "vm_state=" + state],
                          env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError("%s failed:\n%s\n%s" % (path, proc.stdout[-3000:], proc.stderr[-3000:]))
    return elapsed


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    collections = {"this": COLLECTIONS}
    if len(sys.argv) > 2:
        collections["other"] = os.path.abspath(sys.argv[2])
    times = dict((name, dict((step, []) for step in STEPS)) for name in collections)
    ping_times = []
    with tempfile.TemporaryDirectory(prefix="qmpbench") as work:
        role_play = os.path.join(work, "vm.yml")
        with open(role_play, "w", encoding="utf-8") as handle:
            json.dump([{"hosts": "localhost", "gather_facts": False,
                        "vars": {"vm_name": "bench", "vm_run_dir": os.path.join(work, "run"),
                                 "vm_qemu_binary": qemu_binary(), "vm_kernel": os.path.join(GUEST, "vmlinuz"),
                                 "vm_initrd": os.path.join(GUEST, "initrd.gz"),
                                 "vm_append": "console=ttyS0 panic=-1 quiet", "vm_shutdown_timeout": 0},
                        "tasks": [{"ansible.builtin.include_role": {"name": "qemu.qmp.vm"}}]}], handle)
        ping_play = os.path.join(work, "ping.yml")
        with open(ping_play, "w", encoding="utf-8") as handle:
            json.dump([{"hosts": "localhost", "gather_facts": False, "tasks": [{"ansible.builtin.ping": {}}]}], handle)
        base = dict(os.environ, ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_NOCOLOR="true",
                    ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
        for dummy in range(runs):
            for name, path in collections.items():
                env = dict(base, ANSIBLE_COLLECTIONS_PATH=path)
                for step, state in zip(STEPS, ("running", "running", "absent")):
                    times[name][step].append(playbook(env, role_play, state))
            ping_times.append(playbook(dict(base, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS), ping_play, "running"))
    ping = statistics.median(ping_times)
    print("one-task ping playbook        median %6.2f s (n=%d)" % (ping, runs))
    for name in collections:
        for step in STEPS:
            median = statistics.median(times[name][step])
            print("vm role %-5s %-10s       median %6.2f s  (%.1fx ping)" % (name, step, median, median / ping))
    if "other" in collections:
        for step in STEPS:
            ratio = statistics.median(times["this"][step]) / statistics.median(times["other"][step])
            print("this / other, %-10s       %.2f" % (step, ratio))


if __name__ == "__main__":
    main()
