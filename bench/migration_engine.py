#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The migration engine (qemu.qmp.qmp_migration) at work: pause, TLS cost, guests that outrun the link.

Every migration runs the module as a user would (`ansible localhost -m qemu.qmp.qmp_migration`), over TCP on
127.0.0.1, with the tiny guest (1 GiB of RAM, 512 MiB of it random data, 64 MiB of it rewritten each second).
The guest's pause is measured from outside the guest: the host time between the last tick on the source's
console and the first on the destination's, less the guest's own time between them (its clock stands still
while QEMU holds it paused). QEMU's own downtime figure is shown beside it.

  copy      storage copied: a 1 GiB disk (256 MiB of data) the guest writes to, mirrored during the migration
  tls       the same migration (shared storage) with TLS and without, interleaved: the ratio of their times
  converge  a guest that dirties memory faster than the link (max-bandwidth 32 MiB/s), under each policy

    python bench/migration_engine.py [runs] [copy|tls|converge ...]
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import COLLECTIONS, ROOT, qemu_binary, wait_for_text  # pylint: disable=wrong-import-order

GUEST = os.environ.get("QMP_TEST_GUEST", os.path.join(ROOT, ".cache", "guest"))
APPEND = "console=ttyS0 panic=-1 quiet qmpguest.fill_mb=512 qmpguest.dirty_mb=64"
TICK = re.compile(r"guest: tick (\d+) ([0-9.]+)\r?\n")
CAPABILITIES = {"events": True, "dirty-bitmaps": True, "multifd": True}
PARAMETERS = {"max-bandwidth": 107374182400, "multifd-channels": 4}
LIMIT_MS = 300


class VM:
    def __init__(self, folder, name, disk=None, incoming=False, tls=None):
        self.socket = os.path.join(folder, name + ".qmp")
        self.serial = os.path.join(folder, name + ".serial")
        append = APPEND + (" qmpguest.disk=/dev/vda qmpguest.slots=4096" if disk else "")
        cmd = [qemu_binary(), "-machine", "q35", "-accel", "tcg", "-m", "1024", "-display", "none", "-nodefaults",
               "-kernel", os.path.join(GUEST, "vmlinuz"), "-initrd", os.path.join(GUEST, "initrd.gz"),
               "-append", append, "-chardev", "file,id=s0,path=%s" % self.serial, "-serial", "chardev:s0",
               "-qmp", "unix:%s,server=on,wait=off" % self.socket]
        if disk:
            cmd += ["-blockdev", "driver=qcow2,node-name=disk0,file.driver=file,file.filename=%s" % disk,
                    "-device", "virtio-blk-pci,drive=disk0,id=vd0"]
        if tls:
            cmd += ["-object", "tls-creds-x509,id=tls0,dir=%s,endpoint=%s%s" % (
                tls, "server" if incoming else "client", ",verify-peer=on" if incoming else "")]
        if incoming:
            cmd += ["-incoming", "defer"]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        while not os.path.exists(self.socket):
            if self.process.poll() is not None:
                raise RuntimeError("QEMU exited with %s" % self.process.returncode)
            time.sleep(0.02)

    def wait_serial(self, text, timeout=300):
        wait_for_text(self.serial, text, timeout)

    def close(self):
        self.process.kill()
        self.process.wait()


def first_tick_missing(seen, first):
    return first - 1 not in seen


class Ticks(threading.Thread):
    """Host time and guest time of each tick, on either console."""

    def __init__(self, paths):
        super().__init__(daemon=True)
        self.paths = paths
        self.seen = {}
        self.running = True

    def run(self):
        text = dict((path, "") for path in self.paths)
        offsets = dict((path, 0) for path in self.paths)
        while self.running:
            for path in self.paths:
                try:
                    with open(path, "rb") as handle:
                        handle.seek(offsets[path])
                        chunk = handle.read()
                except OSError:
                    continue
                offsets[path] += len(chunk)
                text[path] += chunk.decode("utf-8", "replace")
                for match in TICK.finditer(text[path]):
                    self.seen.setdefault(int(match.group(1)), (path, time.monotonic(), float(match.group(2))))
                text[path] = text[path][text[path].rfind("\n") + 1:]
            time.sleep(0.005)

    def pause_ms(self, destination):
        self.running = False
        self.join()
        arrived = [t for t, seen in self.seen.items() if seen[0] == destination]
        if not arrived or first_tick_missing(self.seen, min(arrived)):
            return float("nan")  # no tick seen on the destination's console in time
        first = min(arrived)
        before, after = self.seen[first - 1], self.seen[first]
        return ((after[1] - before[1]) - (after[2] - before[2])) * 1000


def module(args):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_DEPRECATION_WARNINGS="false")
    out = subprocess.run(["ansible", "localhost", "-o", "-m", "qemu.qmp.qmp_migration", "-a", json.dumps(args)],
                         capture_output=True, text=True, env=env, check=False).stdout
    line = [line for line in out.splitlines() if line.startswith("localhost |")][-1]
    return json.loads(line[line.index("{"):])


def migrate_once(folder, disk=None, tls=None, parameters=None, converge="cancel", timeout=3600):
    for name in os.listdir(folder):
        if name.endswith((".qmp", ".serial")):
            os.unlink(os.path.join(folder, name))
    target = None
    if disk:
        target = disk + ".copy"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", target, "1G"], check=True)
    source = VM(folder, "src", disk=disk, tls=tls)
    dest = VM(folder, "dst", disk=target, incoming=True, tls=tls)
    try:
        source.wait_serial("guest: dirtying")
        source.wait_serial("guest: tick 2 ")
        common = {"capabilities": CAPABILITIES, "parameters": dict(PARAMETERS, **(parameters or {})),
                  "converge": converge, "copies": ["disk0"] if disk else [], "export_prefix": "bench"}
        if tls:
            common["tls_creds"] = "tls0"
        listening = module(dict(common, socket=dest.socket, state="listening", uri="tcp:127.0.0.1:0",
                                nbd_address={"type": "inet", "host": "127.0.0.1", "port": "0"}))
        if listening.get("failed"):
            raise RuntimeError(listening["msg"])
        ticks = Ticks([source.serial, dest.serial])
        ticks.start()
        result = module(dict(common, socket=source.socket, state="migrated", uri=listening["uri"],
                             nbd_address=(listening.get("nbd") or {}).get("address"), downtime_limit=LIMIT_MS,
                             downtime_ceiling=4000, downtime_steps=4, poll_interval=0.5, wait_timeout=timeout))
        if result.get("failed"):
            ticks.running = False
            return {"failed": result["msg"]}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(seen[0] == dest.serial for seen in ticks.seen.values()):
            time.sleep(0.1)
        result["pause_ms"] = ticks.pause_ms(dest.serial)
        return result
    finally:
        source.close()
        dest.close()


def stats(values):
    seen = [v for v in values if not math.isnan(v)]  # nan: no tick seen on the destination in time
    if not seen:
        return "no ticks seen"
    missing = len(values) - len(seen)
    return "median %6.0f, max %6.0f%s" % (statistics.median(seen), max(seen),
                                          " (%d without ticks)" % missing if missing else "")


def bench_copy(folder, runs):
    disk = os.path.join(folder, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "1G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64M 256M", disk], check=True, capture_output=True)
    results = [migrate_once(folder, disk=disk) for dummy in range(runs)]
    failed = [r["failed"] for r in results if "failed" in r]
    results = [r for r in results if "failed" not in r]
    print("copied storage (1 GiB RAM, 1 GiB disk with 256 MiB of data, the guest writing), %d runs:" % runs)
    if failed:
        print("  FAILED: %s" % failed)
    if results:
        print("  guest pause seen from outside (ms): %s   (limit %d ms, goal <= %d)" % (
            stats([r["pause_ms"] for r in results]), LIMIT_MS, LIMIT_MS + 100))
        print("  QEMU's downtime (ms):               %s" % stats([r["downtime_ms"] for r in results]))
        print("  held in pre-switchover (ms):        %s" % stats([r["paused_before_switchover_ms"] for r in results]))
        print("  whole migration (s):                %s" % " ".join("%.1f" % r["seconds"] for r in results))


def make_pki(folder):
    pki = os.path.join(folder, "pki")
    os.mkdir(pki)
    subprocess.run(["sh", os.path.join(ROOT, "roles", "migrate", "files", "throwaway-ca.sh"), pki, "127.0.0.1"],
                   check=True)
    return pki


def bench_tls(folder, runs):
    pki = make_pki(folder)
    times = {"plain": [], "tls": []}
    pauses = {"plain": [], "tls": []}
    for dummy in range(runs):
        for name, tls in (("plain", None), ("tls", pki)):
            result = migrate_once(folder, tls=tls)
            if "failed" in result:
                raise RuntimeError(result["failed"])
            times[name].append(result["total_time_ms"] / 1000.0)
            pauses[name].append(result["pause_ms"])
    plain, tls = statistics.median(times["plain"]), statistics.median(times["tls"])
    print("TLS against plain TCP (shared storage, role defaults), %d runs each, interleaved:" % runs)
    for name in ("plain", "tls"):
        print("  %-5s total %5.2fs  runs %s  pause from outside (ms) %s" % (
            name, statistics.median(times[name]), " ".join("%.2f" % t for t in times[name]), stats(pauses[name])))
    print("  TLS / plain: %.2f x" % (tls / plain))


def bench_converge(folder, runs):
    del runs  # one run per policy: each takes a while
    print("a guest dirtying 64 MiB/s over a 32 MiB/s link (max-bandwidth), after 3 passes, per policy:")
    for policy in ("cancel", "downtime", "postcopy", "auto-converge"):
        result = migrate_once(folder, parameters={"max-bandwidth": 32 * 1024 * 1024}, converge=policy,
                              timeout=90 if policy == "cancel" else 600)
        if "failed" in result or result.get("status") != "completed":
            print("  %-13s did not finish: %s" % (policy, str(result.get("failed") or result.get("msg") or result)[:200]))
            continue
        print("  %-13s finished in %5.1fs, QEMU downtime %5d ms, pause from outside %5.0f ms, steps %s" % (
            policy, result["seconds"], result["downtime_ms"] or 0, result["pause_ms"],
            ", ".join("pass %d: %s%s" % (s["pass"], s["action"], (" %d ms" % s["value"]) if "value" in s else "")
                      for s in result["policy_steps"]) or "-"))


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    chosen = sys.argv[2:] or ["copy", "tls", "converge"]
    folder = tempfile.mkdtemp(prefix="qmpmig", dir="/tmp")
    try:
        for name in chosen:
            {"copy": bench_copy, "tls": bench_tls, "converge": bench_converge}[name](folder, runs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
