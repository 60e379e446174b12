# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: fleet_table
short_description: A fleet run's report as a table people read
version_added: 0.1.0
description:
  - Used by the C(qemu.qmp.backup_fleet) and C(qemu.qmp.evacuate) playbooks. Turns the report's rows (one dict
    per VM) into lines of aligned columns, a heading first. Byte counts (keys ending in C(bytes)) are shown in
    binary units, seconds with one decimal, and a missing value as C(-).
  - The C(qemu.qmp.fleet_junit) filter turns the same rows into JUnit XML.
options:
  _input:
    description: The report's rows.
    type: list
    elements: dict
    required: true
  columns:
    description: The keys to show, in order; each column is headed by its key in capitals.
    type: list
    elements: str
    required: true
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Show the report
  ansible.builtin.debug:
    msg: "{{ rows | qemu.qmp.fleet_table(['vm', 'host', 'level', 'bytes', 'seconds', 'result']) }}"
"""

RETURN = r"""
_value:
  description: The table's lines, the heading first.
  type: list
  elements: str
"""

from ansible_collections.qemu.qmp.plugins.plugin_utils.fleet_report import fleet_table


class FilterModule:
    def filters(self):
        return {"fleet_table": fleet_table}
