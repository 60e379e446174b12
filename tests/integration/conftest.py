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


@pytest.fixture(scope="session")
def two_hosts():
    """host1 and host2: two SSH hosts on loopback addresses for cross-host tests, started once per
    worker and stopped at the end (tests/integration/two_hosts.py). `two_hosts.inventory` is their
    Ansible inventory (group qemu_hosts), `two_hosts.host1.address`/`.port` where they listen,
    `two_hosts.host1.run(argv)` runs a command inside a host, `two_hosts.shared` is the folder both
    see at /var/lib/qemu-qmp/shared."""
    import tempfile  # pylint: disable=import-outside-toplevel
    from two_hosts import TwoHosts, unavailable_reason  # pylint: disable=import-outside-toplevel
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    # A short path: the ssh control sockets live under it.
    hosts = TwoHosts(tempfile.mkdtemp(prefix="qmpxh", dir="/tmp"))
    hosts.start()
    yield hosts
    hosts.stop()
