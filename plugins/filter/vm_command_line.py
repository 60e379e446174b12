# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: vm_command_line
short_description: The QEMU command line of a VM defined for the qemu.qmp.vm role
version_added: 0.1.0
description:
  - Turns a VM definition (the C(qemu.qmp.vm) role's variables, without the C(vm_) prefix) into
    the argument list that starts QEMU. Every disk is attached with C(-blockdev) (a C(file) node
    and a format node named after the disk's C(node_name)) and a device, so each disk has a node
    name the other modules can address.
  - The same definition always gives the same list, so the role can tell a changed definition
    from an unchanged one.
options:
  _input:
    description: The VM definition.
    type: dict
    required: true
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Show the command line of a VM
  ansible.builtin.debug:
    msg: "{{ {'name': 'vm1', 'qmp_socket': '/run/qemu/vm1.qmp', 'memory': 512} | qemu.qmp.vm_command_line | join(' ') }}"
"""

RETURN = r"""
_value:
  description: The argument list, starting with the QEMU binary.
  type: list
  elements: str
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.qemu.qmp.plugins.module_utils.vm_command_line import VMDefinitionError
from ansible_collections.qemu.qmp.plugins.module_utils.vm_command_line import vm_command_line as _vm_command_line


def vm_command_line(vm):
    try:
        return _vm_command_line(vm)
    except VMDefinitionError as exc:
        raise AnsibleFilterError(str(exc))


class FilterModule:
    def filters(self):
        return {"vm_command_line": vm_command_line}
