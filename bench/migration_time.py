#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Live migration time: the qemu.qmp.migrate role's defaults against QEMU's own, side by side.

The tiny guest with 1 GiB of RAM, 512 MiB of it random data, and 64 MiB of it
rewritten all the time while it migrates, over a unix socket on this host.
For each setting a fresh source and destination; QEMU's own total time and
downtime are reported, medians over the runs, and each setting's ratio to
QEMU's defaults. The role's settings are read from roles/migrate/defaults.
    python bench/migration_time.py [runs] [setting ...]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from common import ROOT, qemu_binary, wait_for_text  # pylint: disable=wrong-import-order

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient

GUEST = os.environ.get("QMP_TEST_GUEST", os.path.join(ROOT, ".cache", "guest"))
APPEND = "console=ttyS0 panic=-1 quiet qmpguest.fill_mb=512 qmpguest.dirty_mb=64"


def role_defaults():
    with open(os.path.join(ROOT, "roles", "migrate", "defaults", "main.yml"), encoding="utf-8") as handle:
        defaults = yaml.safe_load(handle)
    return defaults["migrate_capabilities"], defaults["migrate_parameters"], defaults["migrate_downtime_limit"]


def settings():
    caps, params, downtime = role_defaults()
    params = dict(params, **{"downtime-limit": downtime})
    return {
        "QEMU defaults": ({}, {}, False),
        "role defaults": (caps, params, False),
        # As the role sets them with migrate_converge: postcopy: post-copy instead of multifd.
        "role defaults + post-copy": (dict(caps, **{"postcopy-ram": True, "multifd": False}), params, True),
    }


class VM:
    def __init__(self, folder, name, incoming=False):
        self.socket = os.path.join(folder, name + ".qmp")
        self.serial = os.path.join(folder, name + ".serial")
        cmd = [qemu_binary(), "-machine", "q35", "-accel", "tcg", "-m", "1024", "-display", "none", "-nodefaults",
               "-kernel", os.path.join(GUEST, "vmlinuz"), "-initrd", os.path.join(GUEST, "initrd.gz"),
               "-append", APPEND, "-chardev", "file,id=s0,path=%s" % self.serial, "-serial", "chardev:s0",
               "-qmp", "unix:%s,server=on,wait=off" % self.socket]
        if incoming:
            cmd += ["-incoming", "defer"]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        while not os.path.exists(self.socket):
            time.sleep(0.02)
        self.qmp = QMPClient(socket_path=self.socket, timeout=600)
        self.qmp.connect()

    def wait_serial(self, text, timeout=180):
        wait_for_text(self.serial, text, timeout)

    def configure(self, caps, params):
        if caps:
            self.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": k, "state": v} for k, v in caps.items()]})
        if params:
            self.qmp.execute("migrate-set-parameters", params)

    def close(self):
        self.qmp.close()
        self.process.kill()
        self.process.wait()


def migrate_once(caps, params, postcopy):
    folder = tempfile.mkdtemp(prefix="qmpmig", dir="/tmp")
    source, dest = VM(folder, "src"), VM(folder, "dst", incoming=True)
    try:
        source.wait_serial("guest: tick 2 ")
        for vm in (source, dest):
            vm.configure(caps, params)
        uri = "unix:" + os.path.join(folder, "migrate.sock")
        dest.qmp.execute("migrate-incoming", {"uri": uri})
        source.qmp.execute("migrate", {"uri": uri})
        switched = False
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            info = source.qmp.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if postcopy and not switched and (info.get("ram") or {}).get("dirty-sync-count", 0) > 1:
                source.qmp.execute("migrate-start-postcopy")
                switched = True
            time.sleep(0.1)
        while info.get("status") == "completed" and not info.get("total-time"):
            time.sleep(0.05)
            info = source.qmp.execute("query-migrate")
        if info.get("status") != "completed":
            raise RuntimeError("migration %s: %s" % (info.get("status"), info.get("error-desc")))
        return info["total-time"] / 1000.0, info.get("downtime", 0)
    finally:
        source.close()
        dest.close()
        shutil.rmtree(folder, ignore_errors=True)


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    chosen = settings()
    if len(sys.argv) > 2:
        chosen = dict((k, v) for k, v in chosen.items() if k in sys.argv[2:])
    times = dict((name, []) for name in chosen)
    downtimes = dict((name, []) for name in chosen)
    for dummy in range(runs):
        for name, (caps, params, postcopy) in chosen.items():
            seconds, downtime = migrate_once(caps, params, postcopy)
            times[name].append(seconds)
            downtimes[name].append(downtime)
    base = statistics.median(times["QEMU defaults"]) if "QEMU defaults" in times else None
    limit = role_defaults()[2]
    print("migration of a 1 GiB guest (512 MiB random, 64 MiB rewritten continuously), %d runs each, interleaved:"
          % runs)
    for name in chosen:
        median = statistics.median(times[name])
        ratio = " (%.2f x QEMU defaults)" % (median / base) if base else ""
        print("  %-28s total %6.2fs%s  downtime median %4d ms, max %4d ms  runs %s" % (
            name, median, ratio, statistics.median(downtimes[name]), max(downtimes[name]),
            " ".join("%.2f" % t for t in times[name])))
    print("  role's downtime-limit: %d ms (goal: total time ratio <= 0.5, downtime within the limit)" % limit)


if __name__ == "__main__":
    main()
