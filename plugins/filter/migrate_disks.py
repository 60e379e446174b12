# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: migrate_disks
short_description: The disks of a migration's destination when the storage is copied
version_added: 0.1.0
description:
  - Used by the C(qemu.qmp.migrate) role. Each of the VM's disks (C(vm_disks) of the C(qemu.qmp.vm) role) gets
    a new image on the destination, named as the old one, in O(disk_dir) (or the old image's folder), with the
    virtual size QEMU reports for the disk's node.
options:
  _input:
    description: The VM's disks, as the C(qemu.qmp.vm) role takes them.
    type: list
    elements: dict
    required: true
  block_nodes:
    description: What C(query-named-block-nodes) returns on the source.
    type: list
    elements: dict
    required: true
  disk_dir:
    description: The folder for the new images; empty keeps each old image's folder.
    type: str
    default: ""
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Where the copies go
  ansible.builtin.set_fact:
    new_disks: "{{ vm_disks | qemu.qmp.migrate_disks(info.block_nodes, '/var/lib/qemu/moved') }}"
"""

RETURN = r"""
_value:
  description: The destination's disks, as the C(qemu.qmp.vm) role takes them, each with its C(size) in bytes.
  type: list
  elements: dict
"""

import os

from ansible.errors import AnsibleFilterError


def migrate_disks(disks, block_nodes, disk_dir=""):
    sizes = dict((n.get("node-name"), n.get("image", {}).get("virtual-size")) for n in block_nodes or [])
    out = []
    for disk in disks or []:
        node = disk.get("node_name")
        if sizes.get(node) is None:
            raise AnsibleFilterError("the source QEMU has no block node %s" % node)
        new = dict(disk)
        new["path"] = os.path.join(disk_dir, os.path.basename(disk["path"])) if disk_dir else disk["path"]
        new["size"] = int(sizes[node])
        out.append(new)
    return out


class FilterModule:
    def filters(self):
        return {"migrate_disks": migrate_disks}
