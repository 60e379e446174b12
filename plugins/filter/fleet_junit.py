# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: fleet_junit
short_description: A fleet run's report as JUnit XML, for CI servers
version_added: 0.1.0
description:
  - Used by the C(qemu.qmp.backup_fleet) and C(qemu.qmp.evacuate) playbooks. One test case per row (per VM),
    named after the VM, in a class named after the suite and the VM's host; a row whose C(result) is not
    C(ok), C(changed), C(unchanged) or C(skipped) is a failure carrying its C(msg).
options:
  _input:
    description: The report's rows (C(vm), C(host), C(result), C(seconds), C(msg)).
    type: list
    elements: dict
    required: true
  suite:
    description: The test suite's name.
    type: str
    default: qemu.qmp
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Write the report for a CI server
  ansible.builtin.copy:
    content: "{{ rows | qemu.qmp.fleet_junit('backup') }}"
    dest: /tmp/backup-fleet.xml
    mode: "0644"
  delegate_to: localhost
"""

RETURN = r"""
_value:
  description: The JUnit XML document.
  type: str
"""

from ansible_collections.qemu.qmp.plugins.plugin_utils.fleet_report import fleet_junit


class FilterModule:
    def filters(self):
        return {"fleet_junit": fleet_junit}
