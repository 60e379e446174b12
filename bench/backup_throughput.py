#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backup throughput: QEMU's backup job as the qemu.qmp.backup role starts it, against qemu-img convert.

A 2 GiB qcow2 holding 1.5 GiB of random data. Full backup: the role's target
image created through QMP (blockdev-create), opened, one blockdev-backup job,
closed, then `sync`; against `qemu-img convert` of the same image to the same
disk, then `sync`. Runs interleave; medians and their ratio are printed, for
untuned settings and for the role's defaults side by side.

Incremental: 64 KiB-aligned guest writes over 1 % of the disk, then an
incremental backup: bytes written to the target over bytes dirtied, and its
time against the full backup's.
    python bench/backup_throughput.py [runs] [work folder]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import qemu_binary  # pylint: disable=wrong-import-order

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient

GiB = 1024 ** 3
MiB = 1024 ** 2
SIZE = 2 * GiB
DATA = 1536 * MiB
# What the role uses (roles/backup/defaults/main.yml): O_DIRECT, native AIO on the target.
ROLE_TARGET_FILE = {"cache": {"direct": True}, "aio": "native"}


def sync():
    subprocess.run(["sync"], check=True)


def make_source(folder):
    raw, image = os.path.join(folder, "src.raw"), os.path.join(folder, "src.qcow2")
    with open(raw, "wb") as handle:
        for dummy in range(DATA // (64 * MiB)):
            handle.write(os.urandom(64 * MiB))
        handle.truncate(SIZE)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image], check=True)
    os.unlink(raw)
    sync()
    return image


class Bench:
    def __init__(self, folder, source):
        self.folder = folder
        self.socket = os.path.join(tempfile.mkdtemp(prefix="qmpbench", dir="/tmp"), "qmp.sock")
        self.process = subprocess.Popen(
            [qemu_binary(), "-machine", "q35", "-accel", "tcg", "-display", "none", "-nodefaults", "-S",
             "-qmp", "unix:%s,server=on,wait=off" % self.socket,
             "-blockdev", json.dumps({"driver": "file", "filename": source, "node-name": "src-file"}),
             "-blockdev", json.dumps({"driver": "qcow2", "file": "src-file", "node-name": "src"}),
             "-device", "virtio-blk-pci,drive=src,id=vsrc"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not os.path.exists(self.socket):
            time.sleep(0.02)
        self.qmp = QMPClient(socket_path=self.socket, timeout=600)
        self.qmp.connect()
        self.source = source

    def close(self):
        self.qmp.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)

    def job(self, command, arguments):
        self.qmp.execute(command, arguments)
        job_id = arguments["job-id"]
        self.qmp.wait_for_event("JOB_STATUS_CHANGE", {"id": job_id, "status": "concluded"}, timeout=600)
        job = [j for j in self.qmp.execute("query-jobs") if j["id"] == job_id][0]
        self.qmp.execute("job-dismiss", {"id": job_id})
        if job.get("error"):
            raise RuntimeError(job["error"])
        return job

    def convert(self):
        out = os.path.join(self.folder, "convert.qcow2")
        start = time.monotonic()
        subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", self.source, out], check=True)
        sync()
        elapsed = time.monotonic() - start
        os.unlink(out)
        return elapsed

    def backup(self, name, file_options, bitmap=None, backing=None):
        """Create the target through QMP, back up into it, close it, sync; returns (seconds, job)."""
        out = os.path.join(self.folder, name + ".qcow2")
        start = time.monotonic()
        self.job("blockdev-create", {"job-id": "mkfile", "options": {"driver": "file", "filename": out, "size": 0}})
        self.qmp.execute("blockdev-add", {"driver": "file", "node-name": "mk", "filename": out})
        options = {"driver": "qcow2", "file": "mk", "size": SIZE, "cluster-size": 65536}
        if backing:
            options.update({"backing-file": backing, "backing-fmt": "qcow2"})
        self.job("blockdev-create", {"job-id": "mkfmt", "options": options})
        self.qmp.execute("blockdev-del", {"node-name": "mk"})
        target_file = {"driver": "file", "filename": out}
        target_file.update(file_options)
        self.qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "target", "file": target_file,
                                          "backing": None})
        arguments = {"job-id": "backup", "device": "src", "target": "target", "auto-dismiss": False}
        if bitmap:
            arguments.update({"sync": "bitmap", "bitmap": bitmap, "bitmap-mode": "on-success"})
        else:
            arguments["sync"] = "full"
        job = self.job("blockdev-backup", arguments)
        self.qmp.execute("blockdev-del", {"node-name": "target"})
        sync()
        return time.monotonic() - start, job, out

    def dirty(self, fraction, seed=1):
        """64 KiB-aligned writes over `fraction` of the disk, through the guest's device."""
        chunks = SIZE // (64 * 1024)
        picked = random.Random(seed).sample(range(chunks), int(chunks * fraction))
        for chunk in picked:
            self.qmp.execute("human-monitor-command", {"command-line": 'qemu-io -d vsrc/virtio-backend "write -P 0x5a %d 65536"'
                                                       % (chunk * 65536)})
        return len(picked) * 65536


def allocated(image):
    out = subprocess.run(["qemu-img", "map", "--output=json", image], capture_output=True, text=True, check=True)
    return sum(e["length"] for e in json.loads(out.stdout) if e.get("data") and e.get("depth", 0) == 0)


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    folder = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="qemu-qmp-bench.", dir="/var/tmp")
    os.makedirs(folder, exist_ok=True)
    source = make_source(folder)
    bench = Bench(folder, source)
    times = {"qemu-img convert": [], "backup, untuned": [], "backup, role defaults": []}
    try:
        for dummy in range(runs):
            times["qemu-img convert"].append(bench.convert())
            seconds, dummy_job, out = bench.backup("untuned", {})
            times["backup, untuned"].append(seconds)
            os.unlink(out)
            seconds, dummy_job, out = bench.backup("tuned", ROLE_TARGET_FILE)
            times["backup, role defaults"].append(seconds)
            os.unlink(out)
        convert = statistics.median(times["qemu-img convert"])
        print("full backup of a 2 GiB qcow2 holding 1.5 GiB of random data, %d runs each, interleaved:" % runs)
        for name, samples in times.items():
            median = statistics.median(samples)
            print("  %-24s median %6.2fs  (%.2f x convert)  runs %s" % (
                name, median, median / convert, " ".join("%.2f" % s for s in samples)))

        # Incremental: a full that anchors a bitmap, 1 % dirtied, an incremental.
        full_times, inc_times, ratios = [], [], []
        for run in range(runs):
            bench.qmp.execute("block-dirty-bitmap-add", {"node": "src", "name": "inc"})
            seconds, dummy_job, full = bench.backup("full", ROLE_TARGET_FILE)
            full_times.append(seconds)
            dirtied = bench.dirty(0.01, seed=run)
            seconds, job, inc = bench.backup("inc", ROLE_TARGET_FILE, bitmap="inc", backing=full)
            inc_times.append(seconds)
            ratios.append(allocated(inc) / float(dirtied))
            written = job["current-progress"]
            bench.qmp.execute("block-dirty-bitmap-remove", {"node": "src", "name": "inc"})
            os.unlink(inc)
            os.unlink(full)
        full_median, inc_median = statistics.median(full_times), statistics.median(inc_times)
        print("incremental after 64 KiB-aligned writes over 1 %% of the disk (%d MiB), %d runs:"
              % (dirtied // MiB, runs))
        print("  bytes written to the target / bytes dirtied: median %.3f (goal <= 1.05; job copied %d bytes)"
              % (statistics.median(ratios), written))
        print("  incremental %.2fs against full %.2fs: %.1f %% (goal <= 10 %%)"
              % (inc_median, full_median, 100 * inc_median / full_median))
    finally:
        bench.close()
        if len(sys.argv) <= 2:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
