# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Comparing a wanted object with what QEMU reports of it."""

from __future__ import annotations

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_objects import (
    compare_object,
    id_error,
    read_object,
    same_value,
    shown_object,
    type_error,
)


@pytest.mark.parametrize("wanted, reported", [
    (True, True), ("on", True), ("yes", True), ("off", False), (0, False), (1, True),
    (0, 0), ("32768", 32768), ("0x10", 16), (1.5, 1.5),
    ("server", "server"), (True, "on"), (False, "off"), (5, "5"),
    ({"iops-total": 100}, {"iops-total": 100, "bps-total": 0}), ([0, 1], [0, 1]), ([{"a": 1}], [{"a": 1, "b": 2}]),
])
def test_same_value(wanted, reported):
    assert same_value(wanted, reported)


@pytest.mark.parametrize("wanted, reported", [
    (False, True), ("on", False), (2, True), ("maybe", True),
    (True, 1), ("x", 1), (1, 2), ("client", "server"), (True, "off"), (6, "5"),
    ({"iops-total": 100}, {"iops-total": 50}), ({"iops-total": 100}, {}), ([0], [0, 1]), ([0], 0), ("a", None),
])
def test_different_value(wanted, reported):
    assert not same_value(wanted, reported)


def reported(qom_type, props):
    return {"id": "obj0", "qom_type": qom_type, "path": "/objects/obj0", "props": props}


def test_compare_names_each_difference_with_dotted_members():
    differences, not_compared = compare_object(
        "throttle-group", {"limits": {"iops-total": 100, "bps-total": 5}, "x-iops-size": 0, "unreadable": 1},
        reported("throttle-group", {"limits": {"iops-total": 50, "bps-total": 5}, "x-iops-size": 0}))
    assert differences == {"limits.iops-total": {"wanted": 100, "qemu": 50}}
    assert not_compared == ["unreadable"]


def test_compare_another_type_is_the_only_difference():
    differences, not_compared = compare_object("iothread", {"poll-max-ns": 1}, reported("secret", {}))
    assert differences == {"qom_type": {"wanted": "iothread", "qemu": "secret"}}
    assert not_compared == ["poll-max-ns"]


def test_compare_hides_secret_values():
    differences, dummy = compare_object("secret", {"data": "new-secret", "format": "raw"},
                                        reported("secret", {"data": "old-secret", "format": "base64"}))
    assert differences == {"data": {"wanted": "********", "qemu": "********"},
                           "format": {"wanted": "raw", "qemu": "base64"}}


def test_shown_object_hides_data_only():
    obj = reported("secret", {"data": "s3cr3t", "format": "raw"})
    assert shown_object(obj)["props"] == {"data": "********", "format": "raw"}
    assert obj["props"]["data"] == "s3cr3t"
    assert shown_object(None) is None


def test_read_object_leaves_out_what_qemu_cannot_read():
    def query(command, arguments=None):
        if command == "qom-list":
            return [{"name": "type", "type": "string"}, {"name": "ctx0", "type": "child<thread-context>"}]
        if arguments["property"] == "node-affinity":
            raise QMPCommandError(command, arguments, "GenericError", "Property 'thread-context.node-affinity' is not readable")
        return [1]

    assert read_object(query, "ctx0", ["node-affinity", "cpu-affinity"]) == {
        "id": "ctx0", "qom_type": "thread-context", "path": "/objects/ctx0", "props": {"cpu-affinity": [1]}}
    assert read_object(query, "type") is None
    assert read_object(query, "other") is None


@pytest.mark.parametrize("object_id, valid", [
    ("tls0", True), ("disk1-key", True), ("a.b_c-d", True), ("1st", False), ("-x", False), ("a b", False), ("", False),
])
def test_object_ids(object_id, valid):
    assert (id_error(object_id) is None) is valid


def test_unknown_type_names_close_matches_and_every_type():
    known = ["iothread", "secret", "tls-creds-x509", "tls-creds-psk"]
    message = type_error("tls-creds-x590", known)
    assert message.startswith("qom_type 'tls-creds-x590' is not an object type this QEMU can create (did you mean 'tls-creds-x509'")
    assert message.endswith("its object-add takes: iothread, secret, tls-creds-psk, tls-creds-x509")
    assert type_error("secret", known) is None
    assert type_error("anything", None) is None  # a schema without the enum: QEMU decides
