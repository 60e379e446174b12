# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`make demo` as a user runs it, read the way a user reads it: ansible-playbook's part fits on one screen,
announces every step once, shows sizes in binary units, and ends with the table of the steps.

The demo starts the VM on the system's QEMU 7.2 and migrates it to QEMU 10.0, so it runs in the lane that tests
QEMU 10.0 only. It runs the Makefile's own recipe (`make -o bootstrap demo`: the lane's run has set everything up
already), with TMPDIR pointing at a folder of its own, where the demo makes its VM's folder.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess

import pytest
import yaml

from harness import ROOT, qemu_binary, short_tmpdir

QEMU_10 = os.environ.get("QEMU_10") or os.path.join(ROOT, ".cache", "qemu10", "bin", "qemu-system-x86_64")
PLAYBOOK = os.path.join(ROOT, "playbooks", "demo", "demo.yml")
MAX_LINES = 150
# Generous: the demo takes about two minutes on a busy two-core machine, mostly booting the guest and migrating.
TIMEOUT = 900
SIZE = r"\d+(\.\d+)? (Bytes?|KiB|MiB|GiB)"

pytestmark = pytest.mark.skipif(
    not os.path.exists(QEMU_10) or os.path.realpath(qemu_binary()) != os.path.realpath(QEMU_10),
    reason="the demo migrates from QEMU 7.2 to QEMU 10.0: it runs in the QEMU 10.0 lane")


def demo_steps():
    """The values of `demo_step` in the playbook, in order, each once."""
    steps = []

    def walk(node):
        if isinstance(node, dict):
            step = (node.get("vars") or {}).get("demo_step") if isinstance(node.get("vars"), dict) else None
            if step and step not in steps:
                steps.append(step)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    with open(PLAYBOOK, encoding="utf-8") as handle:
        walk(yaml.safe_load(handle))
    return steps


def kill_left_qemus(folder):
    """A demo stopped half way leaves its QEMUs running (they are daemons): end those of this folder only."""
    for pidfile in glob.glob(os.path.join(folder, "*", "*.pid")):
        try:
            with open(pidfile, encoding="ascii") as handle:
                pid = int(handle.read().strip())
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                if folder.encode() not in handle.read():
                    continue
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture
def demo_run():
    folder = short_tmpdir("qmpdemo")
    # Only what the Makefile sets: no ANSIBLE_* of the test run, and no make state of an outer make.
    env = dict((name, value) for name, value in os.environ.items()
               if not name.startswith(("ANSIBLE_", "MAKE")) and name != "MFLAGS")
    env["TMPDIR"] = folder
    process = subprocess.Popen(["make", "--no-print-directory", "-o", "bootstrap", "demo"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, dummy = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, dummy = process.communicate()
        output += "\n(the test stopped the demo after %d s)" % TIMEOUT
    finally:
        kill_left_qemus(folder)
    yield process.returncode, output, folder
    shutil.rmtree(folder, ignore_errors=True)


def test_make_demo(demo_run):
    returncode, output, folder = demo_run
    lines = output.splitlines()
    # make echoes the recipe's command; what follows is ansible-playbook's.
    started = [number for number, line in enumerate(lines) if "ansible-playbook" in line and "playbooks/demo/demo.yml" in line]
    assert started, output
    shown = lines[started[0] + 1:]
    assert returncode == 0, output
    assert len(shown) <= MAX_LINES, "%d lines:\n%s" % (len(shown), output)

    steps = demo_steps()
    assert len(steps) >= 8, steps
    for number, step in enumerate(steps, 1):
        announced = [line for line in shown if line == "[%d/%d] %s" % (number, len(steps), step)]
        assert len(announced) == 1, "step %r announced %d times:\n%s" % (step, len(announced), output)

    # The table: header, rule, one row per step, rule, total; nothing after it.
    table = shown[-(len(steps) + 4):]
    assert table[0].split() == ["step", "seconds", "data", "result"], output
    assert set(table[1]) == set(table[-2]) == {"-", " "}, output
    rows = table[2:-2]
    for number, (step, row) in enumerate(zip(steps, rows), 1):
        assert row.startswith("%d %s " % (number, step)), (step, row)
        seconds = row[len("%d %s" % (number, step)):].split()[0]
        assert float(seconds) >= 0, row
        assert row.endswith(" ok"), row
    assert table[-1].startswith("total") and table[-1].endswith(" ok"), table[-1]

    # Steps that move data say how much, in binary units, and what the figure is.
    moved = [row for row in rows if re.search(SIZE + " (written|copied|of RAM sent) ", row)]
    assert len(moved) >= 4, rows  # two backups, the restore, the migration
    assert any("of RAM sent" in row for row in moved), rows
    text = "\n".join(shown)
    assert not re.search(r"\d (kB|KB|MB|GB)\b", text), text
    assert "expected downtime ?" not in text, text
    # The demo removes its VM's folder.
    assert not glob.glob(os.path.join(folder, "qemu-qmp-demo.*")), os.listdir(folder)
