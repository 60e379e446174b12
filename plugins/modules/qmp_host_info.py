#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_host_info
short_description: List the QEMU VMs of a hypervisor, with their state, disks, jobs and last backup
version_added: 0.1.0
description:
  - Runs on a hypervisor and lists its VMs. Each VM the C(qemu.qmp.vm) role started there is found by the
    C(NAME.json) file the role keeps in its run folder (O(run_dirs)); its saved definition is returned, so that
    the role can start the VM again elsewhere. A migration's destination in progress on the same host
    (C(NAME.incoming.json)) is listed too, with its RV(vms[].instance).
  - QMP sockets (C(*.qmp)) found directly in O(socket_dirs) that belong to no VM of the role are listed as
    unmanaged VMs, named by QEMU (C(-name)) or else by the socket's file name.
  - Each VM's QMP socket is asked for QEMU's run state, version, disks with their dirty bitmaps, and jobs.
    The sockets are asked concurrently (up to 32 at a time), each connection is closed as soon as its queries
    are answered. A VM that does not answer is listed with RV(vms[].state) V(busy), V(dead) or V(error) and the
    reason; no single VM fails the module.
  - The last backup of each VM is read from its folder under O(backup_dir) (as the C(qemu.qmp.backup) role
    writes it), read-only and without taking the folder's lock.
  - Made to be fast and compact, for inventories built from many hypervisors, for example with
    C(ansible HYPERVISORS -m qemu.qmp.qmp_host_info).
  - Only reads, so it never changes anything and always reports RV(ignore:changed=false).
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.read_only
options:
  run_dirs:
    description:
      - Folders where the C(qemu.qmp.vm) role keeps its VMs' files (C(vm_run_dir)). Every C(*.json) there that
        holds a C(definition) and a C(command_line), as the role writes them, is a VM.
      - A folder that does not exist holds no VM. One that is not a folder, or cannot be read, gives a warning.
    type: list
    elements: path
    default: [/run/qemu-qmp]
  socket_dirs:
    description:
      - Folders whose QMP sockets (C(*.qmp), not in subfolders) are listed as well, unless they belong to a VM
        found in O(run_dirs) (its QMP socket or its extra one, or one its QEMU listens on).
      - Such a VM is named by QEMU's C(query-name), or else by the socket's file name without C(.qmp).
    type: list
    elements: path
    default: []
  backup_dir:
    description:
      - The folder of the C(qemu.qmp.backup) role's backups (C(backup_dir)); the backups of VM NAME are read
        from C(backup_dir/NAME).
      - An empty string reads no backups.
    type: path
    default: /var/lib/qemu-qmp/backups
  timeout:
    description:
      - Seconds to wait on each QMP socket, for the connection and its greeting, and for each answer.
      - A socket that accepts the connection but sends no greeting within this time is V(busy) (another client
        holds it, since a QMP socket serves one client at a time).
      - A value that is not more than 0 gives a warning, and the default is used.
    type: float
    default: 2
  socket:
    description:
      - Not used, since this module finds the QMP sockets itself. Accepted so that C(module_defaults) for
        C(group/qemu.qmp.qmp) apply to it.
  host:
    description: Not used (see O(socket)).
  port:
    description: Not used (see O(socket)).
  wait_timeout:
    description: Not used (see O(socket)).
notes:
  - A VM that answers on its socket is asked C(query-status), C(query-name), C(query-block) and C(query-jobs), and
    C(query-named-block-nodes) when a disk's top node is a filter. No schema is read, so no cache is written.
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: List the VMs of this hypervisor (those the qemu.qmp.vm role started in /run/qemu-qmp)
  qemu.qmp.qmp_host_info:
  register: host

- name: Show each VM's state
  ansible.builtin.debug:
    msg: "{{ item.name }}{{ item.instance }} is {{ item.state }} (QEMU {{ item.qemu_version }})"
  loop: "{{ host.vms }}"
  loop_control:
    label: "{{ item.name }}"

- name: Also list the QEMUs with a QMP socket in /run/qemu/, and read the backups from /var/lib/backup/
  qemu.qmp.qmp_host_info:
    run_dirs: [/run/qemu-qmp, /run/qemu/]
    socket_dirs: [/run/qemu/]
    backup_dir: /var/lib/backup/
    timeout: 5
  register: host

- name: Show the VM on /run/qemu/vm1.qmp, with its disks, bitmaps and last backup
  ansible.builtin.debug:
    msg: "{{ host.vms | selectattr('qmp_socket', 'equalto', '/run/qemu/vm1.qmp') | list }}"

- name: Name the VMs of the qemu.qmp.vm role that have no backup yet
  ansible.builtin.debug:
    msg: "{{ host.vms | selectattr('managed') | selectattr('last_backup', 'none') | map(attribute='name') | list }}"
"""

RETURN = r"""
vms:
  description: The VMs of the host, sorted by name (then instance).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description:
        - The VM's name. For a VM of the C(qemu.qmp.vm) role, its C(vm_name); for another, QEMU's C(-name) or
          else the socket's file name without C(.qmp).
      type: str
      sample: vm1
    instance:
      description: The instance suffix of a second QEMU of the VM (a migration's destination); empty normally.
      type: str
      sample: .incoming
    qmp_socket:
      description: The VM's QMP socket.
      type: str
      sample: /run/qemu-qmp/vm1.qmp
    extra_qmp_socket:
      description: The VM's second QMP socket, for tools (C(vm_extra_qmp_socket)); empty when it has none.
      type: str
    run_dir:
      description: The folder the VM was found in (for an unmanaged VM, the folder of its socket).
      type: str
      sample: /run/qemu-qmp
    definition_file:
      description: The VM's C(NAME.json); empty for an unmanaged VM.
      type: str
      sample: /run/qemu-qmp/vm1.json
    managed:
      description: Whether the C(qemu.qmp.vm) role started the VM (it has a C(NAME.json)).
      type: bool
    pid:
      description:
        - The process id of the VM's QEMU. For a managed VM, the one saved in C(NAME.json) (or its pidfile), and
          only while that process runs (the same process, by its start time); for an unmanaged VM, the process
          listening on the socket. Null when unknown or gone.
      type: int
      sample: 12345
    state:
      description:
        - QEMU's run state (C(query-status)) when it answers, such as V(running), V(paused), V(prelaunch),
          V(inmigrate) or V(postmigrate).
        - Else V(busy) (the socket accepts connections but sends no greeting, since another client holds it),
          V(dead) (no socket, or nothing listens on it) or V(error) (RV(vms[].state_msg) says why).
      type: str
      sample: running
    state_msg:
      description:
        - Why QEMU could not be asked, when it did not answer; what could not be read, when a query failed; or
          that the QEMU answering a managed VM's socket has another name. Empty otherwise.
      type: str
      sample: "/run/qemu-qmp/vm2.qmp accepts connections but sends no QMP greeting within 2 s: another client holds it"
    qemu_version:
      description: QEMU's version (major.minor.micro) from the QMP greeting; null when QEMU did not answer.
      type: str
      sample: 7.2.0
    qemu_package:
      description: QEMU's package string from the QMP greeting; null when QEMU did not answer.
      type: str
      sample: Debian 1:7.2+dfsg-7+deb12u18
    disks:
      description:
        - The VM's disks (C(query-block)), drives without a medium left out. Null when QEMU did not answer.
      type: list
      elements: dict
      contains:
        device:
          description: The block backend's name, or for a backend of C(-blockdev) the id of its device.
          type: str
          sample: dev-disk0
        node_name:
          description: The node name of the disk's format node (below filters such as C(throttle)).
          type: str
          sample: disk0
        file:
          description: The image's file name.
          type: str
          sample: /var/lib/qemu/vm1-disk0.qcow2
        format:
          description: The image format (the format node's driver).
          type: str
          sample: qcow2
        virtual_size:
          description: The disk's size in bytes, as the guest sees it.
          type: int
          sample: 10737418240
        bitmaps:
          description: The named dirty bitmaps of the format node, sorted by name.
          type: list
          elements: dict
          contains:
            name: {description: Bitmap name., type: str}
            count: {description: Dirty bytes., type: int}
            granularity: {description: Bytes per bit., type: int}
            persistent: {description: Whether it is stored in the image; null where QEMU does not say., type: bool}
            recording: {description: Whether it records new writes., type: bool}
            busy: {description: Whether a job or a migration uses it., type: bool}
            inconsistent: {description: Left behind by a crash; it can only be removed., type: bool}
    jobs:
      description: QEMU's jobs (C(query-jobs)); empty when there are none, null when QEMU did not answer.
      type: list
      elements: dict
      contains:
        id: {description: Job id., type: str}
        type: {description: "Job type, for example V(backup), V(mirror) or V(create).", type: str}
        status: {description: "Job status, for example V(running), V(ready) or V(concluded).", type: str}
    definition:
      description:
        - The VM definition saved in C(NAME.json), the C(qemu.qmp.vm) role's variables without the C(vm_) prefix
          plus C(name), C(run_dir), C(instance) and C(supervisor), what the role needs to start the VM again
          elsewhere. Null for an unmanaged VM.
      type: dict
    last_backup:
      description:
        - The last backup taken of the VM (of C(backup_dir/NAME)), whether or not it can be restored. Null when
          there is none, or the folder cannot be read.
      type: dict
      contains:
        label:
          description: The backup point, C(CHAIN/NNNN-LEVEL).
          type: str
          sample: 20250101T020000Z/0003-incremental
        chain:
          description: Its chain.
          type: str
          sample: 20250101T020000Z
        level:
          description: V(full), V(incremental) or V(differential).
          type: str
        finished:
          description: When it finished, in ISO 8601 (UTC).
          type: str
          sample: "2025-01-04T02:00:13Z"
        dir:
          description: Its folder.
          type: str
          sample: /var/lib/qemu-qmp/backups/vm1/20250101T020000Z/0003-incremental
    backups:
      description:
        - How many backup points of the VM can be restored (committed, with every backup they are based on,
          in a chain not found damaged).
      type: int
      sample: 4
    backup_msg:
      description: Why the VM's backup folder (or part of it) could not be read; empty otherwise.
      type: str
hostname:
  description: The host's name (C(socket.gethostname())).
  returned: always
  type: str
  sample: hv1
duration:
  description: Seconds the module took, to the millisecond.
  returned: always
  type: float
  sample: 0.052
msg:
  description: How many VMs there are, by state.
  returned: always
  type: str
  sample: 3 VMs, 2 running, 1 busy
qmp_commands:
  description:
    - The QMP commands sent, each once in the order first sent, with C(repeated) giving the number of
      sockets it was sent to when more than one.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "query-status", "repeated": 3}, {"execute": "query-name", "repeated": 3}]
"""

import socket
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.qemu.qmp.plugins.module_utils.host_inventory import (
    DEFAULT_BACKUP_DIR,
    DEFAULT_RUN_DIRS,
    DEFAULT_TIMEOUT,
    host_inventory,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import connection_argument_spec, timeout_error


def summary(vms):
    counts = {}
    for vm in vms:
        counts[vm["state"]] = counts.get(vm["state"], 0) + 1
    return ", ".join(["%d VM%s" % (len(vms), "" if len(vms) == 1 else "s")]
                     + ["%d %s" % (counts[state], state) for state in sorted(counts, key=lambda s: (-counts[s], s))])


def main():
    begin = time.monotonic()
    spec = connection_argument_spec()
    spec.update(
        run_dirs=dict(type="list", elements="path", default=list(DEFAULT_RUN_DIRS)),
        socket_dirs=dict(type="list", elements="path", default=[]),
        backup_dir=dict(type="path", default=DEFAULT_BACKUP_DIR),
        timeout=dict(type="float", default=DEFAULT_TIMEOUT),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    params = module.params
    timeout = params["timeout"]
    if timeout_error("timeout", timeout):
        module.warn("%s: using %g" % (timeout_error("timeout", timeout), DEFAULT_TIMEOUT))
        timeout = DEFAULT_TIMEOUT
    found = host_inventory(run_dirs=[d for d in params["run_dirs"] if d],
                           socket_dirs=[d for d in params["socket_dirs"] if d],
                           backup_dir=params["backup_dir"] or "", timeout=timeout)
    for warning in found["warnings"]:
        module.warn(warning)
    module.exit_json(changed=False, vms=found["vms"], hostname=socket.gethostname(),
                     duration=round(time.monotonic() - begin, 3), msg=summary(found["vms"]),
                     qmp_commands=found["qmp_commands"])


if __name__ == "__main__":
    main()
