# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which arguments of QMP and guest agent commands carry secrets."""

from __future__ import annotations

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import hmp_secrets, secret_paths

SECRET = "correct-horse-battery-staple"


@pytest.mark.parametrize("command, arguments, paths", [
    # A secret object's data, in today's flat form and the props QEMU before 6.0 takes.
    ("object-add", {"qom-type": "secret", "id": "s0", "data": SECRET}, ["data"]),
    ("object-add", {"qom-type": "secret", "id": "s0", "data": SECRET, "format": "base64"}, ["data"]),
    ("object-add", {"qom-type": "secret", "id": "s0", "props": {"data": SECRET}}, ["props.data"]),
    ("object-add", {"qom-type": "secret", "id": "s0", "data": SECRET, "props": {"data": SECRET}},
     ["data", "props.data"]),
    ("object-add", {"qom-type": "secret", "id": "s0", "file": "/etc/key"}, []),
    ("object-add", {"qom-type": "secret", "id": "s0", "props": "not a dict"}, []),
    ("object-add", {"qom-type": "iothread", "id": "io0", "data": "x"}, []),
    ("object-add", {"qom-type": "secret_keyring", "id": "k0", "serial": 1}, []),
    # Passwords.
    ("set_password", {"protocol": "vnc", "password": SECRET}, ["password"]),
    ("set_password", {"protocol": "spice", "password": SECRET, "connected": "keep"}, ["password"]),
    ("change-vnc-password", {"password": SECRET}, ["password"]),
    ("guest-set-user-password", {"username": "root", "password": "c2VjcmV0", "crypted": False}, ["password"]),
    ("block_passwd", {"node-name": "n0", "password": SECRET}, ["password"]),
    ("set_password", {"protocol": "vnc"}, []),
    ("change", {"device": "vnc", "target": "password", "arg": SECRET}, ["arg"]),
    ("change", {"device": "ide0-cd0", "target": "/tmp/x.iso"}, []),
    # The human monitor.
    ("human-monitor-command", {"command-line": "set_password vnc %s" % SECRET}, ["command-line"]),
    ("human-monitor-command", {"command-line": "change vnc password %s" % SECRET}, ["command-line"]),
    ("human-monitor-command", {"command-line": "object_add secret,id=s0,data=%s" % SECRET}, ["command-line"]),
    ("human-monitor-command", {"command-line": "info status"}, []),
    ("human-monitor-command", {"command-line": "change ide0-cd0 /tmp/x.iso"}, []),
    ("human-monitor-command", {"command-line": "object_add iothread,id=io0"}, []),
    ("human-monitor-command", {}, []),
    # Commands with no secret, and arguments that are not a dictionary.
    ("query-status", None, []),
    ("blockdev-add", {"driver": "luks", "key-secret": "s0", "file": "f0", "node-name": "n0"}, []),
    ("guest-exec", {"path": "/bin/true"}, []),
    ("object-add", None, []),
    ("set_password", ["password"], []),
])
def test_secret_paths(command, arguments, paths):
    assert secret_paths(command, arguments) == paths


@pytest.mark.parametrize("command_line, secrets", [
    ("set_password vnc %s" % SECRET, [SECRET]),
    ("set_password spice %s keep" % SECRET, [SECRET]),
    ("set_password vnc %s -d vnc0 fail" % SECRET, [SECRET]),
    ("  set_password   vnc   %s  " % SECRET, [SECRET]),
    ('set_password vnc "two words"', ["two words"]),
    ('set_password vnc "unbalanced', ['"unbalanced']),
    ("set_password vnc", []),
    ("set_password", []),
    ("block_passwd ide0-hd0 %s" % SECRET, [SECRET]),
    ("change vnc password %s" % SECRET, [SECRET]),
    ("change vnc password", []),
    ("change vnc %s" % SECRET, [SECRET]),  # "password" left out: QEMU refuses it, but it is a password
    ("object_add secret,id=s0,data=%s" % SECRET, [SECRET]),
    ("object_add secret,id=s0,data=%s,format=raw" % SECRET, [SECRET]),
    ("object_add qom-type=secret,data=%s,id=s0" % SECRET, [SECRET]),
    ("object_add secret,id=s0,data=a,,b,,,format=raw", ["a,b,"]),
    ('object_add {"qom-type": "secret", "id": "s0", "data": "%s"}' % SECRET, [SECRET]),
    ('object_add {"qom-type": "secret", "id": "s0", "data": }', []),
    ('object_add ["secret", "data"]', []),
    ("object_add secret,id=s0,data=", []),
    ("object_add secret,id=s0,file=/etc/key", None),
    ("object_add secret_keyring,id=k0,serial=1,data=x", None),
    ("object_add iothread,id=io0", None),
    ("info status", None),
    ("change ide0-cd0 /tmp/x.iso", None),
    ("change", None),
    ("", None),
    (None, None),
    (42, None),
])
def test_hmp_secrets(command_line, secrets):
    assert hmp_secrets(command_line) == secrets
