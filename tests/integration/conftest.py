# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import VM, AnsibleRunner, qemu_binary, short_tmpdir  # noqa: E402  pylint: disable=wrong-import-position


def pytest_report_header(config):
    import subprocess  # pylint: disable=import-outside-toplevel
    version = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, check=False)
    return "QEMU under test: %s (%s)" % (qemu_binary(), version.stdout.splitlines()[0] if version.stdout else "?")


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vm_factory(workdir):
    """Start QEMU processes; every one still running is killed at the end of the test."""
    started = []

    def start(name="vm", **kwargs):
        vm = VM(workdir, name=name, **kwargs)
        started.append(vm)
        return vm.start()

    yield start
    for vm in started:
        vm.kill()


@pytest.fixture
def vm(vm_factory):
    """A QEMU with no guest, paused at start (-S)."""
    return vm_factory()


@pytest.fixture
def ansible(workdir):
    return AnsibleRunner(workdir)
