#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Module overhead: `ansible -m qemu.qmp.qmp_info` against `ansible -m ansible.builtin.ping`.

Runs both on localhost, interleaved, and prints medians and their ratio (the
goal is at most 1.15). Also shows that a second qmp_info run against the same
QEMU does not call query-qmp-schema (the schema comes from the disk cache).
    python bench/module_overhead.py [runs]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import COLLECTIONS, ThrowawayQEMU  # pylint: disable=wrong-import-order


def ansible(env, module, args):
    start = time.perf_counter()
    proc = subprocess.run(["ansible", "localhost", "-m", module, "-a", args], env=env,
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError("%s failed:\n%s\n%s" % (module, proc.stdout, proc.stderr))
    return elapsed, json.loads(proc.stdout.split("=>", 1)[1])


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with ThrowawayQEMU() as qemu, tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_PYTHON_INTERPRETER=sys.executable,
                   ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
                   ANSIBLE_NOCOLOR="true", QMP_SCHEMA_CACHE=cache_dir)
        args = "socket=%s" % qemu.socket
        dummy, first = ansible(env, "qemu.qmp.qmp_info", args)
        dummy, second = ansible(env, "qemu.qmp.qmp_info", args)
        ansible(env, "ansible.builtin.ping", "")  # warm the same caches for both
        info_times, ping_times = [], []
        for dummy in range(runs):
            info_times.append(ansible(env, "qemu.qmp.qmp_info", args)[0])
            ping_times.append(ansible(env, "ansible.builtin.ping", "")[0])
    first_cmds = [c["execute"] for c in first["qmp_commands"]]
    second_cmds = [c["execute"] for c in second["qmp_commands"]]
    info, ping = statistics.median(info_times), statistics.median(ping_times)
    print("first qmp_info run sent:  %s" % ", ".join(first_cmds))
    print("second qmp_info run sent: %s" % ", ".join(second_cmds))
    print("second run calls query-qmp-schema: %s" % ("query-qmp-schema" in second_cmds))
    print("ansible -m qemu.qmp.qmp_info  median %6.0f ms  (n=%d, all facts)" % (info * 1000, runs))
    print("ansible -m ansible.builtin.ping median %6.0f ms  (n=%d)" % (ping * 1000, runs))
    print("ratio qmp_info / ping: %.3f (goal <= 1.15)" % (info / ping))


if __name__ == "__main__":
    main()
