# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared pieces of the benchmark scripts: a throwaway QEMU and the collection on sys.path."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(ROOT, "build", "collections")
if COLLECTIONS not in sys.path:
    sys.path.insert(0, COLLECTIONS)


def qemu_binary():
    return os.environ.get("QEMU_BINARY") or shutil.which("qemu-system-x86_64")


class ThrowawayQEMU:
    """A paused QEMU with no guest and one QMP unix socket."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="qmpbench", dir="/tmp")
        self.socket = os.path.join(self.dir, "qmp.sock")
        self.process = None

    def __enter__(self):
        self.process = subprocess.Popen(
            [qemu_binary(), "-machine", "q35", "-accel", "tcg", "-display", "none", "-nodefaults", "-S",
             "-qmp", "unix:%s,server=on,wait=off" % self.socket],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("QEMU did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for_text(path, text, timeout=180):
    """Wait until a file (a guest's serial log) holds `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8", errors="replace") as handle:
            if text in handle.read():
                return
        time.sleep(0.2)
    raise RuntimeError("the guest did not print %r" % text)


def summary(samples_s):
    ordered = sorted(samples_s)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "min_ms": ordered[0] * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "n": len(ordered),
    }
