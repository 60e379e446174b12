# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures shared by the client's unit tests: a short socket folder and fake QMP servers on it."""

from __future__ import annotations

import os

import pytest

from ansible_collections.qemu.qmp.tests.unit.plugins.module_utils.fake_qmp import FakeQMPServer, short_socket_dir


@pytest.fixture(name="sock_dir")
def fixture_sock_dir(tmp_path):
    directory, cleanup = short_socket_dir(tmp_path)
    yield directory
    if cleanup is not None:
        cleanup()


@pytest.fixture(name="sock_path")
def fixture_sock_path(sock_dir):
    return os.path.join(sock_dir, "qmp.sock")


@pytest.fixture(name="serve")
def fixture_serve(sock_path):
    """serve(**kwargs) starts a FakeQMPServer on sock_path; stopped after the test."""
    servers = []

    def start(**kwargs):
        server = FakeQMPServer(sock_path, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
