# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import _is_loopback, is_query


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
