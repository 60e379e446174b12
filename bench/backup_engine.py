#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup engine as users run it: its cost, its speed, and what verifying costs.

1. Cost: an incremental backup after 1 % of a 64 MiB disk was dirtied, through
   `ansible-playbook qemu.qmp.backup`, against a one-task playbook running
   `qemu.qmp.qmp_info` on the same QEMU; interleaved, medians and their ratio.
2. Full backup of a 2 GiB qcow2 holding 1.5 GiB of random data by the engine
   (target created, QEMU's job, images synced, `qemu-img check`, checksums,
   manifest written and synced: the manifest's own `duration`), against
   `qemu-img convert` + `sync` of the same image; interleaved.
3. An incremental after 64 KiB-aligned writes over 1 % of that disk: bytes the
   image holds over bytes dirtied.
4. `verify` of that chain (the engine's `duration`) against `sha256sum` over
   the same image files; interleaved, both reading from the page cache.

    python bench/backup_engine.py [runs] [work folder]
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from backup_throughput import allocated, make_source, sync  # pylint: disable=wrong-import-order
from common import COLLECTIONS, ROOT, qemu_binary  # pylint: disable=wrong-import-order

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient

MiB = 1024 ** 2


def ansible_env(cache):
    return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_PYTHON_INTERPRETER=sys.executable,
                ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
                ANSIBLE_NOCOLOR="true", QMP_SCHEMA_CACHE=cache)


class VM:
    """A paused QEMU with one disk (node disk0, device vdisk0) and two QMP sockets: one for the
    engine, one for the bench's own guest writes."""

    def __init__(self, image):
        self.dir = tempfile.mkdtemp(prefix="qmpbench", dir="/tmp")
        self.socket = os.path.join(self.dir, "qmp.sock")
        self.probe = os.path.join(self.dir, "probe.sock")
        self.process = subprocess.Popen(
            [qemu_binary(), "-machine", "q35", "-accel", "tcg", "-display", "none", "-nodefaults", "-S",
             "-qmp", "unix:%s,server=on,wait=off" % self.socket, "-qmp", "unix:%s,server=on,wait=off" % self.probe,
             "-blockdev", json.dumps({"driver": "file", "filename": image, "node-name": "disk0-file"}),
             "-blockdev", json.dumps({"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"}),
             "-device", "virtio-blk-pci,drive=disk0,id=vdisk0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (os.path.exists(self.socket) and os.path.exists(self.probe)):
            time.sleep(0.02)

    def dirty(self, size, fraction, seed):
        """64 KiB-aligned guest writes over `fraction` of the disk; returns the bytes dirtied."""
        chunks = size // (64 * 1024)
        picked = random.Random(seed).sample(range(chunks), max(1, int(chunks * fraction)))
        with QMPClient(socket_path=self.probe) as client:
            for chunk in picked:
                client.execute("human-monitor-command", {
                    "command-line": 'qemu-io -d vdisk0/virtio-backend "write -P 0x5a %d 65536"' % (chunk * 65536)})
            client.execute("human-monitor-command", {"command-line": 'qemu-io -d vdisk0/virtio-backend "flush"'})
        return len(picked) * 65536

    def close(self):
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def timed(cmd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError("%s failed:\n%s\n%s" % (" ".join(cmd), proc.stdout[-3000:], proc.stderr[-3000:]))
    return elapsed, proc.stdout


def engine(env, **args):
    """One run of the engine through `ansible -m`; returns its result."""
    dummy, out = timed(["ansible", "localhost", "-m", "qemu.qmp.qmp_backup_chain", "-a", json.dumps(args)], env)
    return json.loads(out.split("=>", 1)[1])


def cost(folder, runs, env):
    image = os.path.join(folder, "small.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    vm = VM(image)
    info_play = os.path.join(folder, "info.yml")
    with open(info_play, "w", encoding="utf-8") as handle:
        handle.write("- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                     "    - qemu.qmp.qmp_info:\n        socket: %s\n" % vm.socket)
    backup_cmd = ["ansible-playbook", "-i", "localhost,", "-c", "local", "playbooks/backup.yml",
                  "-e", "backup_qmp_socket=%s" % vm.socket, "-e", "backup_name=vm1",
                  "-e", "backup_dir=%s" % os.path.join(folder, "small-backups")]
    info_cmd = ["ansible-playbook", "-i", "localhost,", "-c", "local", info_play]
    try:
        timed(backup_cmd, env)  # the full backup, and warm caches for both
        timed(info_cmd, env)
        backups, infos, copied = [], [], []
        for run in range(runs):
            vm.dirty(64 * MiB, 0.01, seed=run)
            elapsed, out = timed(backup_cmd, env)
            backups.append(elapsed)
            copied.append("incremental backup" in out)
            infos.append(timed(info_cmd, env)[0])
    finally:
        vm.close()
    backup, info = statistics.median(backups), statistics.median(infos)
    print("incremental backup after 1 %% of a 64 MiB disk was dirtied, %d runs each, interleaved:" % runs)
    print("  ansible-playbook qemu.qmp.backup   median %5.0f ms  (runs %s)" % (
        backup * 1000, " ".join("%.0f" % (s * 1000) for s in backups)))
    print("  one-task playbook with qmp_info    median %5.0f ms  (runs %s)" % (
        info * 1000, " ".join("%.0f" % (s * 1000) for s in infos)))
    print("  ratio backup / qmp_info: %.2f (goal <= 1.5); every run was an incremental: %s" % (backup / info, all(copied)))


def throughput(folder, runs, env):
    source = make_source(folder)
    vm = VM(source)
    root = os.path.join(folder, "backups", "vm1")
    try:
        converts, fulls = [], []
        for dummy in range(runs):
            out = os.path.join(folder, "convert.qcow2")
            start = time.monotonic()
            subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", source, out], check=True)
            sync()
            converts.append(time.monotonic() - start)
            os.unlink(out)
            result = engine(env, socket=vm.socket, dir=root, level="full", keep_chains=1, poll_interval=600)
            fulls.append(result["duration"])
        convert, full = statistics.median(converts), statistics.median(fulls)
        print("full backup of a 2 GiB qcow2 holding 1.5 GiB of random data, %d runs each, interleaved:" % runs)
        print("  qemu-img convert + sync            median %5.2fs  (runs %s)" % (
            convert, " ".join("%.2f" % s for s in converts)))
        print("  engine, role defaults (until the manifest is written: job, sync, qemu-img check, checksums)")
        print("                                     median %5.2fs  (runs %s): %.2f x convert (goal <= 0.6)" % (
            full, " ".join("%.2f" % s for s in fulls), full / convert))

        dirtied = vm.dirty(2 * 1024 * MiB, 0.01, seed=7)
        result = engine(env, socket=vm.socket, dir=root, poll_interval=600)
        image = os.path.join(root, result["chain"], result["disks"][0]["image"])
        print("incremental after 64 KiB-aligned writes over 1 %% of the disk (%d MiB):" % (dirtied // MiB))
        print("  %s, bytes the image holds / bytes dirtied: %.3f (job copied %d of %d)" % (
            result["level"], allocated(image) / float(dirtied), result["bytes_copied"], dirtied))

        images = sorted(glob.glob(os.path.join(root, result["chain"], "*", "*.qcow2")))
        size = sum(os.path.getsize(i) for i in images)
        sums, verifies = [], []
        for dummy in range(runs):
            start = time.monotonic()
            subprocess.run(["sha256sum"] + images, check=True, stdout=subprocess.DEVNULL)
            sums.append(time.monotonic() - start)
            verifies.append(engine(env, dir=root, operation="verify", point=result["chain"],
                                   poll_interval=600)["duration"])
        total, check = statistics.median(sums), statistics.median(verifies)
        print("verify of that chain (%d images, %.2f GiB), %d runs each, interleaved, from the page cache:"
              % (len(images), size / 1024.0 ** 3, runs))
        print("  sha256sum of the images            median %5.2fs  (runs %s)" % (
            total, " ".join("%.2f" % s for s in sums)))
        print("  verify (checksums + qemu-img check) median %5.2fs  (runs %s): %.2f x sha256sum (goal <= 1.5)" % (
            check, " ".join("%.2f" % s for s in verifies), check / total))
    finally:
        vm.close()


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    folder = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="qemu-qmp-bench.", dir="/var/tmp")
    os.makedirs(folder, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="qmpbench-cache")
    env = ansible_env(cache)
    try:
        cost(folder, runs, env)
        throughput(folder, runs, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if len(sys.argv) <= 2:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
