# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qemu.qmp.qmp inventory plugin's pure parts: reading the discovery's output, choosing among QEMUs of one
VM name. The plugin itself runs against two SSH hosts in tests/integration/test_fleet.py."""

from __future__ import annotations

import json

from ansible_collections.qemu.qmp.plugins.inventory.qmp import parse_results, passed_options, preferred, safe_group


def test_each_hypervisor_answer_is_read():
    def line(host, status, result):
        return json.dumps({"host": host, "status": status, "result": result})

    output = "\n".join([
        line("host1", "ok", {"changed": False, "vms": [{"name": "a", "state": "running"}]}),
        "[WARNING]: something else on stdout",
        line("host2", "failed", {"msg": "no python3"}),
        line("host3", "unreachable", {"msg": "Failed to connect to the host via ssh: refused", "unreachable": True}),
        '{"host": "host4", "status": "ok", "result": {not json',
        '{"something": "else"}',
    ])
    found = parse_results(output)
    assert found["host1"] == (True, {"changed": False, "vms": [{"name": "a", "state": "running"}]})
    assert found["host2"] == (False, "failed: no python3")
    assert found["host3"] == (False, "unreachable: Failed to connect to the host via ssh: refused")
    assert sorted(found) == ["host1", "host2", "host3"]


def test_the_qemu_that_runs_the_guest_is_the_vm():
    source = ("host1", {"name": "a", "state": "postmigrate", "managed": True})
    destination = ("host2", {"name": "a", "state": "running", "managed": True})
    assert preferred([source, destination]) is destination
    assert preferred([destination, source]) is destination
    # Neither runs the guest: the first hypervisor's.
    dead = ("host1", {"name": "a", "state": "dead", "managed": True})
    busy = ("host2", {"name": "a", "state": "busy", "managed": True})
    assert preferred([dead, busy]) is dead
    # A QEMU the vm role started wins over a stray socket of the same name.
    stray = ("host1", {"name": "a", "state": "paused", "managed": False})
    managed = ("host2", {"name": "a", "state": "paused", "managed": True})
    assert preferred([stray, managed]) is managed


def test_group_names_are_safe():
    assert safe_group("host-1.example.org") == "host_1_example_org"


def test_the_discovery_reaches_the_hypervisors_as_the_run_does():
    passed = passed_options({"private_key_file": "/keys/id", "remote_user": None, "connection": "ssh", "become": True,
                             "vault_ids": ["prod@/v/prod"], "vault_password_files": ["/v/pass"], "ask_pass": True})
    assert passed == ["--private-key", "/keys/id", "--connection", "ssh", "--become", "--vault-id", "prod@/v/prod",
                      "--vault-password-file", "/v/pass"]
    assert passed_options({}) == []
