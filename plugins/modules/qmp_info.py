#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_info
short_description: Read facts about a running QEMU over QMP
version_added: 0.1.0
description:
  - Reads a running QEMU's version, run state, the QMP features the other modules of this
    collection rely on, block nodes, dirty bitmaps, jobs, migration state, character devices,
    the machine type it emulates and the guest's name.
  - Only sends queries, so it never changes QEMU and always reports RV(ignore:changed=false).
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.read_only
options:
  gather:
    description:
      - Which facts to read. V(all) reads every one.
      - V(machine) is the machine type QEMU emulates, the versioned name even when QEMU was started with an
        alias such as V(q35) (the alias names the newest version in each QEMU release); a migration's
        destination must be started with it.
      - V(name) is the guest's name (C(-name)).
    type: list
    elements: str
    choices: [all, version, status, features, block_nodes, bitmaps, jobs, migration, chardevs, machine, name]
    default: [all]
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Read everything about the VM behind a QMP socket
  qemu.qmp.qmp_info:
    socket: /run/qemu/vm1.qmp
  register: vm1

- name: Show its run state and QEMU version
  ansible.builtin.debug:
    msg: "{{ vm1.status }} on QEMU {{ vm1.version.major }}.{{ vm1.version.minor }}"

- name: Read the machine type, to start a migration's destination with the same one
  qemu.qmp.qmp_info:
    socket: /run/qemu/vm1.qmp
    gather: [machine, name]
  register: vm1_machine

- name: Show it
  ansible.builtin.debug:
    msg: "{{ vm1_machine.name }} runs machine {{ vm1_machine.machine }}"

- name: Only the dirty bitmaps, with the socket set once for the play
  module_defaults:
    group/qemu.qmp.qmp:
      socket: /run/qemu/vm1.qmp
  block:
    - name: Read the bitmaps
      qemu.qmp.qmp_info:
        gather: [bitmaps]
      register: facts

    - name: Fail when a bitmap is inconsistent
      ansible.builtin.assert:
        that: facts.bitmaps | selectattr('inconsistent') | list | length == 0
"""

RETURN = r"""
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "query-status"}, {"execute": "stop"}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "Dirty bitmap 'bm0' not found"}
qmp_connect_reason:
  description:
    - Why no QMP connection could be made, when none could. V(missing) (no socket there), V(not_socket),
      V(refused) (nothing listens, so the QEMU that made the socket exited), V(permission), V(busy) (the
      socket accepts connections but sends no greeting, so another client holds it, since a QMP socket
      serves one client at a time) or V(unreachable).
  returned: when the connection failed
  type: str
  sample: busy
version:
  description: QEMU's version, from the QMP greeting.
  returned: when gathered
  type: dict
  contains:
    major: {description: Major version., type: int}
    minor: {description: Minor version., type: int}
    micro: {description: Micro version., type: int}
    package: {description: "The package string, for example V(Debian 1:7.2+dfsg-7).", type: str}
  sample: {major: 7, minor: 2, micro: 22, package: "Debian 1:7.2+dfsg-7+deb12u18"}
status:
  description: The run state as C(query-status) reports it (V(running), V(paused), V(prelaunch), V(postmigrate), ...).
  returned: when gathered
  type: str
  sample: running
running:
  description: Whether the guest's CPUs are running.
  returned: when O(gather) includes V(status)
  type: bool
features:
  description:
    - The QMP features this collection detects from the running QEMU's schema, by name.
      Booleans say whether a command or argument exists; lists give the values QEMU accepts.
  returned: when gathered
  type: dict
  sample: {backup_bitmap_mode: true, migrate_channels: false, backup_sync_modes: [top, full, none, incremental, bitmap]}
block_nodes:
  description: Every named block node, as C(query-named-block-nodes) reports it (flat where QEMU supports it).
  returned: when gathered
  type: list
  elements: dict
bitmaps:
  description: Every dirty bitmap of every named node, normalised the same way on every QEMU version.
  returned: when gathered
  type: list
  elements: dict
  contains:
    name: {description: Bitmap name., type: str}
    node: {description: Node name the bitmap belongs to., type: str}
    count: {description: Dirty bytes., type: int}
    granularity: {description: Bytes per bit., type: int}
    recording: {description: Whether the bitmap records new writes., type: bool}
    busy: {description: Whether a job or a migration uses it (it cannot be changed then)., type: bool}
    persistent: {description: Whether it is stored in the qcow2 image; null where QEMU does not say., type: bool}
    inconsistent: {description: Left behind by a crash; it can only be removed., type: bool}
jobs:
  description: Every job QEMU knows, normalised.
  returned: when gathered
  type: list
  elements: dict
  contains:
    id:
      description: Job id.
      type: str
    type:
      description: Job type, for example V(backup), V(mirror) or V(create).
      type: str
    status:
      description: Job status, for example V(running), V(ready) or V(concluded).
      type: str
    current:
      description: Progress so far, in the job's units (bytes for block jobs).
      type: int
    total:
      description: Estimated total, in the same units.
      type: int
    error:
      description: QEMU's error text when the job failed, else null.
      type: str
migration:
  description: The migration state.
  returned: when gathered
  type: dict
  contains:
    status:
      description: Migration status; V(none) when no migration was started.
      type: str
    info: {description: What C(query-migrate) returns., type: dict}
    capabilities: {description: Migration capabilities by name., type: dict}
    parameters: {description: What C(query-migrate-parameters) returns., type: dict}
chardevs:
  description: Character devices, as C(query-chardev) reports them.
  returned: when gathered
  type: list
  elements: dict
machine:
  description:
    - The machine type QEMU emulates (C(qom-get) of the property C(type) of C(/machine), without its trailing
      C(-machine)), as C(-machine) takes it. Always the versioned type, also when QEMU was started with an alias
      such as V(q35) or V(pc); a migration's destination must be started with this type.
  returned: when gathered
  type: str
  sample: pc-q35-7.2
name:
  description: The guest's name (C(-name)), from C(query-name); null when QEMU runs without C(-name).
  returned: when gathered
  type: str
  sample: vm1
"""

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule
from ansible_collections.qemu.qmp.plugins.module_utils import qmp_state

FACTS = ("version", "status", "features", "block_nodes", "bitmaps", "jobs", "migration", "chardevs", "machine", "name")


def main():
    qm = QMPModule(
        argument_spec=dict(
            gather=dict(type="list", elements="str", default=["all"], choices=("all",) + FACTS),
        ),
    )
    wanted = FACTS if "all" in qm.params["gather"] else qm.params["gather"]
    facts = {}
    with qm.connected():
        if "version" in wanted:
            facts["version"] = qm.version
        if "status" in wanted:
            facts.update(qmp_state.read_status(qm.query))
        if "features" in wanted:
            facts["features"] = qm.schema.features()
        nodes = None
        if "block_nodes" in wanted:
            nodes = facts["block_nodes"] = qmp_state.read_block_nodes(qm.query, qm.schema)
        if "bitmaps" in wanted:
            facts["bitmaps"] = qmp_state.read_bitmaps(qm.query, qm.schema, nodes)
        if "jobs" in wanted:
            facts["jobs"] = qmp_state.read_jobs(qm.query, qm.schema)
        if "migration" in wanted:
            facts["migration"] = qmp_state.read_migration(qm.query, qm.schema)
        if "chardevs" in wanted:
            facts["chardevs"] = qmp_state.read_chardevs(qm.query)
        if "machine" in wanted:
            facts["machine"] = qmp_state.read_machine(qm.query)
        if "name" in wanted:
            facts["name"] = qmp_state.read_name(qm.query)
    qm.exit(changed=False, **facts)


if __name__ == "__main__":
    main()
