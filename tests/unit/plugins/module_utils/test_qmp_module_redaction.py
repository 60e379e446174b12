# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Secrets in the commands a module sends: recorded as ********, hidden from every result."""

from __future__ import annotations

import json

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import (
    REDACTED,
    QMPModule,
    redacted,
    secret_strings,
)

SECRET = "correct-horse-battery-staple"


class Failed(Exception):
    pass


class FakeAnsibleModule:
    def __init__(self):
        self.no_log_values = set()

    def fail_json(self, **result):
        raise Failed(result)


class FakeClient:
    def __init__(self):
        self.sent = []

    def execute(self, command, arguments=None, timeout=None):
        self.sent.append((command, arguments))
        return {}


class FakeSchema:
    def __init__(self, errors):
        self.errors = errors

    def validate(self, command, arguments):
        return list(self.errors)


def make_qm(check_mode=False, schema_errors=()):
    qm = QMPModule.__new__(QMPModule)  # without its AnsibleModule: the recording is under test
    qm.module = FakeAnsibleModule()
    qm.check_mode = check_mode
    qm.protocol = "qmp"
    qm.commands = []
    qm.changed = False
    qm._secrets = []
    qm._schema = FakeSchema(schema_errors)
    qm._validation_warned = False
    qm.client = FakeClient()
    return qm


def test_redacted_copies_and_replaces_only_the_named_values():
    arguments = {"qom-type": "secret", "id": "sec0", "data": SECRET, "props": {"data": SECRET, "format": "raw"}}
    copy = redacted(arguments, ["data", "props.data", "absent", "props.absent", "id.not-a-dict"])
    assert copy == {"qom-type": "secret", "id": "sec0", "data": REDACTED, "props": {"data": REDACTED, "format": "raw"}}
    assert arguments["data"] == SECRET and arguments["props"]["data"] == SECRET


@pytest.mark.parametrize("arguments, paths", [(None, ["data"]), ({}, ["data"]), ({"id": "x"}, None), ({"id": "x"}, [])])
def test_nothing_to_redact_keeps_the_arguments_themselves(arguments, paths):
    assert redacted(arguments, paths) is arguments


@pytest.mark.parametrize("value, strings", [
    (SECRET, [SECRET]), ("", []), (None, []), (True, []), (12345, ["12345"]), (1.5, ["1.5"]),
    ({"a": "x", "b": [7, {"c": "y"}]}, ["x", "7", "y"]), (b"raw", ["raw"]),
])
def test_secret_strings_are_what_no_log_hides(value, strings):
    assert secret_strings(value) == strings


def test_change_sends_the_secret_and_records_it_redacted():
    qm = make_qm()
    qm.change("object-add", {"qom-type": "secret", "id": "sec0", "data": SECRET}, redact=["data"])
    assert qm.client.sent == [("object-add", {"qom-type": "secret", "id": "sec0", "data": SECRET})]
    assert qm.commands == [{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "sec0", "data": REDACTED}}]
    assert SECRET in qm.module.no_log_values and qm.changed is True


def test_change_without_redact_records_the_arguments_as_sent():
    qm = make_qm()
    arguments = {"id": "io0", "qom-type": "iothread"}
    qm.change("object-add", arguments)
    assert qm.commands == [{"execute": "object-add", "arguments": arguments}]
    assert not qm.module.no_log_values


def test_check_mode_records_redacted_and_sends_nothing():
    qm = make_qm(check_mode=True)
    qm.change("object-add", {"qom-type": "secret", "id": "sec0", "data": SECRET}, redact=["data"])
    assert not qm.client.sent
    assert qm.commands[0]["arguments"]["data"] == REDACTED


def test_check_mode_validation_errors_do_not_show_the_secret():
    qm = make_qm(check_mode=True, schema_errors=["object-add: data: 12345 is not of type 'string'"])
    with pytest.raises(Failed) as failed:
        qm.change("object-add", {"qom-type": "secret", "id": "sec0", "data": 12345}, redact=["data"])
    result = failed.value.args[0]
    assert "12345" not in json.dumps(result)
    assert result["msg"] == "QEMU would refuse object-add: object-add: data: ******** is not of type 'string'"
    assert result["validation_errors"] == ["object-add: data: ******** is not of type 'string'"]


def test_hidden_values_are_scrubbed_from_failures_longest_first():
    qm = make_qm()
    qm.hide("abc", "abcdef", None, True, {"nested": "xyz"})
    assert qm.module.no_log_values == {"abc", "abcdef", "xyz"}
    assert qm.scrub("abcdef and abc and xyz") == "******** and ******** and ********"
    with pytest.raises(Failed) as failed:
        qm.fail("QEMU refused object-add: cannot use abcdef")
    assert failed.value.args[0]["msg"] == "QEMU refused object-add: cannot use ********"


def test_scrub_without_secrets_leaves_messages_alone():
    qm = QMPModule.__new__(QMPModule)
    assert qm.scrub("nothing hidden") == "nothing hidden"


@pytest.mark.parametrize("run", ["change", "query", "transient"])
@pytest.mark.parametrize("check_mode", [False, True])
def test_every_way_of_running_a_command_redacts_known_secrets(run, check_mode):
    qm = make_qm(check_mode=check_mode)
    arguments = {"protocol": "vnc", "password": SECRET}
    getattr(qm, run)("set_password", arguments)
    assert qm.commands == [{"execute": "set_password", "arguments": {"protocol": "vnc", "password": REDACTED}}]
    assert qm.module.no_log_values == {SECRET}
    assert arguments["password"] == SECRET
    assert qm.client.sent == ([] if check_mode and run == "change" else [("set_password", arguments)])


def test_hmp_hides_the_line_and_the_password_in_it():
    qm = make_qm()
    line = "set_password vnc %s" % SECRET
    qm.change("human-monitor-command", {"command-line": line})
    assert qm.commands == [{"execute": "human-monitor-command", "arguments": {"command-line": REDACTED}}]
    assert qm.module.no_log_values == {line, SECRET}
    assert qm.scrub("Error: %s is refused" % SECRET) == "Error: ******** is refused"


def test_the_callers_paths_add_to_the_known_ones():
    qm = make_qm()
    arguments = {"qom-type": "secret", "id": "s0", "data": SECRET, "keyid": "k0"}
    qm.change("object-add", arguments, redact=["keyid", "data"])
    assert qm.commands[0]["arguments"] == {"qom-type": "secret", "id": "s0", "data": REDACTED, "keyid": REDACTED}
    assert qm.module.no_log_values == {SECRET, "k0"}


def test_protect_before_connecting_hides_without_recording():
    qm = make_qm()
    shown = qm.protect("guest-set-user-password", {"username": "root", "password": "c2VjcmV0"})
    assert shown == {"username": "root", "password": REDACTED}
    assert qm.module.no_log_values == {"c2VjcmV0"} and qm.commands == [] and qm.client.sent == []


def test_commands_without_secrets_are_recorded_as_they_are():
    qm = make_qm()
    arguments = {"command-line": "info status"}
    qm.change("human-monitor-command", arguments)
    qm.query("query-status")
    assert qm.commands == [{"execute": "human-monitor-command", "arguments": arguments},
                           {"execute": "query-status"}]
    assert qm.commands[0]["arguments"] is arguments
    assert not qm.module.no_log_values
