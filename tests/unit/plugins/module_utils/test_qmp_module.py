# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import (
    MAX_TIMEOUT,
    QMPModule,
    _is_loopback,
    connection_argument_spec,
    is_query,
    timeout_error,
)


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
    ("10.0.0.1", False), ("192.168.1.2", False), ("::ffff:10.0.0.1", False), ("hypervisor.example", False),
])
def test_loopback(host, loopback):
    assert _is_loopback(host) is loopback


@pytest.mark.parametrize("command, query", [
    ("query-status", True), ("x-query-roms", True), ("x-debug-query-block-graph", True),
    ("cont", False), ("human-monitor-command", False), ("quit", False),
])
def test_is_query(command, query):
    assert is_query(command) is query


@pytest.mark.parametrize("value", [30.0, 0.001, 1, "2.5", MAX_TIMEOUT])
def test_timeout_accepted(value):
    assert timeout_error("timeout", value) is None


@pytest.mark.parametrize("value, shown", [
    (0, "0"), (0.0, "0.0"), (-1.0, "-1.0"), (float("nan"), "nan"), (float("inf"), "inf"),
    (float("-inf"), "-inf"), (1e300, "1e+300"), (MAX_TIMEOUT + 1, "1000000001.0"),
    (None, "None"), ("soon", "'soon'"), ([30], "[30]"),
])
def test_timeout_refused_naming_the_option_and_the_range(value, shown):
    assert timeout_error("wait_timeout", value) == (
        "wait_timeout must be a number of seconds, more than 0 and at most 1000000000, not %s" % shown)


def test_wait_timeout_is_unset_by_default():
    spec = connection_argument_spec()
    assert spec["wait_timeout"] == {"type": "float"}
    assert spec["timeout"]["default"] == 30.0


@pytest.mark.parametrize("timeout, wait_timeout, waits", [(30.0, None, 30.0), (2.0, 600.0, 600.0)])
def test_wait_timeout_falls_back_to_timeout(timeout, wait_timeout, waits):
    qm = QMPModule.__new__(QMPModule)  # without its AnsibleModule: only the property is under test
    qm.params = {"timeout": timeout, "wait_timeout": wait_timeout}
    qm.timeout = timeout
    assert qm.wait_timeout == waits
