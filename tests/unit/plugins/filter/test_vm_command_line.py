# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import json

import pytest

from ansible.errors import AnsibleFilterError

from ansible_collections.qemu.qmp.plugins.filter.vm_command_line import vm_command_line

BASE = {"name": "vm1", "qmp_socket": "/run/q/vm1.qmp"}


def test_minimal_definition():
    assert vm_command_line(BASE) == [
        "qemu-system-x86_64", "-name", "vm1", "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
        "-display", "none", "-nodefaults", "-no-user-config", "-qmp", "unix:/run/q/vm1.qmp,server=on,wait=off"]


def test_commas_are_escaped_in_option_values():
    argv = vm_command_line(dict(BASE, qmp_socket="/run/a,b.qmp", serial={"type": "file", "path": "/x,y.log"}))
    assert "unix:/run/a,,b.qmp,server=on,wait=off" in argv
    assert "file,id=serial0,path=/x,,y.log" in argv


def test_disks_get_a_file_node_a_format_node_and_a_device():
    argv = vm_command_line(dict(BASE, disks=[
        {"path": "/img/a.qcow2", "node_name": "disk0"},
        {"path": "/img/b.raw", "node_name": "data", "format": "raw", "bus": "scsi", "read_only": True},
    ]))
    values = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a in ("-blockdev", "-device")
              and argv[i + 1].startswith("{")]
    assert values[0] == {"driver": "virtio-scsi-pci", "id": "scsi0"}
    assert {"driver": "file", "filename": "/img/a.qcow2", "node-name": "disk0-file"} in values
    assert {"driver": "qcow2", "file": "disk0-file", "node-name": "disk0"} in values
    assert {"driver": "virtio-blk-pci", "drive": "disk0", "id": "dev-disk0"} in values
    assert {"driver": "raw", "file": "data-file", "node-name": "data", "read-only": True} in values
    assert {"driver": "scsi-hd", "drive": "data", "id": "dev-data", "bus": "scsi0.0"} in values


def test_same_definition_same_command_line():
    definition = dict(BASE, disks=[{"path": "/a", "node_name": "d", "serial": "s1"}], memory=512,
                      pcie_root_ports=2, incoming=True, start_paused=True, extra_args=["-rtc", "base=utc"])
    assert vm_command_line(definition) == vm_command_line(json.loads(json.dumps(definition)))
    argv = vm_command_line(definition)
    assert argv[-5:] == ["-incoming", "defer", "-S", "-rtc", "base=utc"]
    assert "pcie-root-port,id=rp2,bus=pcie.0,chassis=2" in argv


@pytest.mark.parametrize("definition, message", [
    ({"name": "vm1"}, "needs qmp_socket"),
    (dict(BASE, disks=[{"path": "/a"}]), "disk 0 needs node_name"),
    (dict(BASE, disks=[{"path": "/a", "node_name": "d", "bus": "floppy"}]), "bus must be one of"),
    (dict(BASE, serial={"type": "tcp", "path": "/x"}), "type must be file or socket"),
    ("vm1", "expects a VM definition"),
])
def test_bad_definitions(definition, message):
    with pytest.raises(AnsibleFilterError, match=message):
        vm_command_line(definition)
