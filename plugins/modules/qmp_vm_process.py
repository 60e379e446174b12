#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_vm_process
short_description: Start, find again and stop the QEMU process of a VM defined for the qemu.qmp.vm role
version_added: 0.1.0
description:
  - The host-side step of the C(qemu.qmp.vm) role, in one module call. It finds the VM's QEMU from its
    pidfile (or its systemd unit), proves that the process is the VM's QEMU by its command line (C(-name))
    and by the start time saved when it was started, and asks QEMU on the VM's QMP socket for its run state.
  - With O(state=running) it starts QEMU with the command line the definition gives (see the
    C(qemu.qmp.vm_command_line) filter) unless the VM's QEMU runs, and reports a running VM whose
    definition changed. With O(state=absent) it stops the VM's QEMU (power button, then C(quit), then
    signals) and removes the VM's runtime files. With O(state=adopted) it gives a QEMU started under another
    instance name (a migration's destination) the VM's own file names.
  - Only a process proven to be the VM's QEMU is ever signalled; a QEMU that answers on the VM's QMP socket
    under the VM's name may be asked to quit over QMP. A socket that still accepts connections is never
    removed, and the role never starts a QEMU beside one that answers there.
  - Most users run the C(qemu.qmp.vm) role, which calls this module with its variables.
  - O(socket) is the VM's QMP socket (by default C(run_dir/NAME.qmp)); O(timeout) bounds each connection to
    it, and how long a socket another client holds is waited on. O(wait_timeout) is how long QEMU has to exit
    after C(quit) or SIGTERM before it is killed (default 15 seconds). The VM's QMP socket is a unix socket, so
    O(host) and O(port) are refused.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  name:
    description: The VM's name (C(vm_name)); a plain file name, without C(/).
    type: str
    required: true
  instance:
    description:
      - A suffix of the file names of a second QEMU of the same VM (C(vm_instance)), such as a migration's
        destination.
    type: str
    default: ""
  run_dir:
    description: The folder of the VM's sockets, pidfile and saved definition (C(vm_run_dir)).
    type: str
    required: true
  definition:
    description:
      - The VM definition, the C(qemu.qmp.vm) role's variables without the C(vm_) prefix (C(qemu_binary),
        C(machine), C(accel), C(memory), C(cpus), C(disks), C(kernel), C(initrd), C(append), C(qmp_socket),
        C(extra_qmp_socket), C(serial), C(pcie_root_ports), C(incoming), C(start_paused), C(extra_args)).
    type: dict
    default: {}
  state:
    description:
      - V(running) starts the VM unless its QEMU runs; V(absent) stops it; V(adopted) makes the QEMU that runs
        under O(adopt_instance) the VM's own.
    type: str
    choices: [running, absent, adopted]
    default: running
  supervisor:
    description:
      - V(systemd) runs QEMU as a transient unit, V(daemon) with C(-daemonize) and a pidfile; V(auto) picks
        systemd where it is the init system.
    type: str
    choices: [auto, systemd, daemon]
    default: auto
  restart_on_change:
    description:
      - Restart a running VM whose definition changed; otherwise it keeps running and RV(definition_changed)
        says so.
    type: bool
    default: false
  start_timeout:
    description: Seconds a new QEMU has to answer on its QMP socket.
    type: int
    default: 30
  shutdown_timeout:
    description:
      - Seconds the guest has to power down after the power button, before QEMU is told to quit. V(0) quits at
        once.
    type: int
    default: 60
  moved_to:
    description:
      - With O(state=absent), the host the VM moved to; writes the moved marker C(run_dir/NAME.moved), which
        keeps O(state=running) from starting the VM here again.
    type: str
    default: ""
  start_moved:
    description: Start a VM whose moved marker says it runs elsewhere, and remove the marker.
    type: bool
    default: false
  adopt_instance:
    description:
      - With O(state=adopted), the instance suffix the running QEMU was started with (empty when it already
        has the VM's names).
    type: str
    default: ""
  this_host:
    description: The name of this host recorded in the moved marker (the role gives C(inventory_hostname)).
    type: str
    default: ""
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Start a VM unless it runs (the qemu.qmp.vm role does this with its variables)
  qemu.qmp.qmp_vm_process:
    name: vm1
    run_dir: /run/qemu
    socket: /run/qemu/vm1.qmp
    definition:
      qemu_binary: qemu-system-x86_64
      memory: 512
      serial: {type: file, path: /run/qemu/vm1.serial.log}
  register: vm1

- name: Show its process
  ansible.builtin.debug:
    msg: "VM vm1 runs as pid {{ vm1.pid }} ({{ vm1.status }})"

- name: Stop it, giving the guest 5 seconds to power down before QEMU quits
  qemu.qmp.qmp_vm_process:
    name: vm1
    run_dir: /run/qemu
    socket: /run/qemu/vm1.qmp
    definition:
      serial: {type: file, path: /run/qemu/vm1.serial.log}
    state: absent
    shutdown_timeout: 5
"""

RETURN = r"""
name:
  description: The VM's name.
  type: str
  returned: always
state:
  description: V(running) or V(absent).
  type: str
  returned: always
pid:
  description: The process id of the VM's QEMU; V(0) when none runs (and in check mode before a start).
  type: int
  returned: always
status:
  description: QEMU's own run state (C(query-status)), or null when no QEMU of the VM runs.
  type: str
  returned: always
supervisor:
  description: V(systemd) or V(daemon).
  type: str
  returned: always
unit:
  description: The systemd unit, or an empty string with the daemon supervisor.
  type: str
  returned: when state is running
serial:
  description: The serial port as defined.
  type: dict
  returned: always
command_line:
  description: The command line that starts the VM.
  type: list
  elements: str
  returned: when state is running or adopted
definition_changed:
  description: The VM runs with another command line than its definition gives, and was not restarted.
  type: bool
  returned: when state is running or adopted
running_command_line:
  description: The command line the running QEMU was started with, when RV(definition_changed).
  type: list
  elements: str
  returned: when the definition changed
moved:
  description: The moved marker as C({to, at}), or null.
  type: dict
  returned: always
run_dir:
  description: The run folder.
  type: str
  returned: always
qmp_socket:
  description: The VM's QMP socket.
  type: str
  returned: always
extra_qmp_socket:
  description: The second QMP socket, or null.
  type: str
  returned: always
pidfile:
  description: The pidfile.
  type: str
  returned: always
definition_file:
  description: The file with the command line, pid and start time saved when QEMU started.
  type: str
  returned: always
serial_log:
  description: The serial log, or null when the serial port is not a file.
  type: str
  returned: always
moved_marker:
  description: Where the moved marker is, whether or not it exists.
  type: str
  returned: always
qmp_commands:
  description:
    - The QMP commands sent, each with the socket it went to; a query repeated while waiting is listed once,
      with C(repeated) giving the count.
  type: list
  elements: dict
  returned: always
"""

import os

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import SOCKET_ENV, QMPModule
from ansible_collections.qemu.qmp.plugins.module_utils.vm_command_line import VMDefinitionError
from ansible_collections.qemu.qmp.plugins.module_utils.vm_process import VMProcess, VMProcessError


def main():
    qm = QMPModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            instance=dict(type="str", default=""),
            run_dir=dict(type="str", required=True),
            definition=dict(type="dict", default={}),
            state=dict(type="str", default="running", choices=["running", "absent", "adopted"]),
            supervisor=dict(type="str", default="auto", choices=["auto", "systemd", "daemon"]),
            restart_on_change=dict(type="bool", default=False),
            start_timeout=dict(type="int", default=30),
            shutdown_timeout=dict(type="int", default=60),
            moved_to=dict(type="str", default=""),
            start_moved=dict(type="bool", default=False),
            adopt_instance=dict(type="str", default=""),
            this_host=dict(type="str", default=""),
        ),
    )
    module = qm.module
    if qm.params["host"]:
        qm.fail("the VM's QMP socket is a unix socket: give socket, not host and port")
    params = dict(qm.params, socket=qm.params["socket"] or os.environ.get(SOCKET_ENV))
    vm = None
    try:
        vm = VMProcess(params, check_mode=module.check_mode, warn=module.warn)
        state = params["state"]
        if state == "adopted":
            before = {"state": "running", "files": "started as instance %r" % params["adopt_instance"]}
            result = vm.adopt()
        else:
            vm.inspect()
            before = {"state": "running" if vm.alive else "absent", "pid": vm.pid,
                      "command_line": vm.saved.get("command_line") if vm.alive else None,
                      "moved": vm.moved}
            result = vm.running() if state == "running" else vm.absent()
    except (VMProcessError, VMDefinitionError, OSError) as exc:
        module.fail_json(msg=str(exc), qmp_commands=vm.commands if vm else [])
    changed = result.pop("changed")
    after = {"state": result["state"], "pid": result["pid"], "command_line": result.get("command_line"),
             "moved": result["moved"]}
    if state == "adopted":
        after = {"state": "running", "files": "the VM's own"}
    module.exit_json(changed=changed, diff={"before": before, "after": after}, **result)


if __name__ == "__main__":
    main()
