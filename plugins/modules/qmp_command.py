#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_command
short_description: Run any QMP command
version_added: 0.1.0
description:
  - The escape hatch for what no other module of the collection covers. Sends one QMP
    command with its arguments and returns QEMU's answer.
  - It cannot know what a command does, so it reports RV(ignore:changed=true) for every
    command except queries (names starting with C(query-), C(x-query-) or C(x-debug-query-)).
    Use C(changed_when) to say better.
  - In check mode only queries are sent. Any other command is checked against the running
    QEMU's QMP schema (when C(jsonschema) is installed on the managed host) and reported
    as it would be sent, but not sent.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
options:
  command:
    description:
      - The QMP command name, for example V(query-block) or V(human-monitor-command).
    type: str
    required: true
  arguments:
    description:
      - The command's arguments, exactly as QEMU takes them.
    type: dict
    default: {}
  guest_agent:
    description:
      - Talk to the QEMU guest agent (C(qemu-ga) in the guest, reached through the socket of its
        virtio-serial channel) instead of QEMU, for example to freeze the guest's file systems with
        V(guest-fsfreeze-freeze). The agent has no schema to validate against, and commands named
        C(guest-get-*), V(guest-info), V(guest-ping) and V(guest-fsfreeze-status) count as queries.
    type: bool
    default: false
notes:
  - These secrets never show in the module's result - the C(data) of V(object-add) with C(qom-type) V(secret)
    (also inside C(props), the form QEMU before 6.0 takes); the C(password) of V(set_password),
    V(change-vnc-password) and the guest agent's V(guest-set-user-password); and the whole C(command-line) of
    a V(human-monitor-command) that sets a password (C(set_password), C(change vnc password)) or adds a secret
    object (C(object_add secret,...)). RV(qmp_commands) shows them as V(********), and Ansible hides them from
    the rest of the result as it hides C(no_log) options, in the module's arguments (C(invocation), which
    C(-vvv) prints) and in QEMU's error text alike, in check mode and when the command fails too.
  - A hidden value is hidden wherever it appears in the result, so a short or common secret (V(1), V(root))
    also hides that text elsewhere in it, as for Ansible's C(no_log) options.
  - Any other secret in O(arguments) is shown as it is. Give it to QEMU through a V(secret) object instead
    (M(qemu.qmp.qmp_object), which never shows its C(data), or the object's C(file) for QEMU to read) and
    refer to the object by its id, or put it in a file on the host for QEMU to read.
attributes:
  check_mode:
    description: Queries run; other commands are validated against QEMU's schema and not sent.
    support: partial
    details: Commands other than queries are reported as changes without being sent.
  diff_mode:
    description: A raw command has no before and after to show.
    support: none
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: List the block devices as QEMU reports them
  qemu.qmp.qmp_command:
    socket: /run/qemu/vm1.qmp
    command: query-block
  register: blocks

- name: Freeze the guest's file systems through its guest agent
  qemu.qmp.qmp_command:
    socket: /run/qemu/vm1.qga
    guest_agent: true
    command: guest-fsfreeze-freeze

- name: Write a test pattern into a virtio-blk disk through HMP (no guest OS needed)
  qemu.qmp.qmp_command:
    socket: /run/qemu/vm1.qmp
    command: human-monitor-command
    arguments:
      command-line: 'qemu-io -d disk0/virtio-backend "write -P 0xab 0 1M"'
  register: hmp
  failed_when: hmp.result is search('Error')
"""

RETURN = r"""
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)), with the
      secrets listed in the notes shown as V(********).
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
result:
  description: What QEMU returned for the command (its C(return) value). Null in check mode for commands that were not sent.
  returned: success
  type: raw
  sample: {"status": "running", "running": true}
events:
  description: QMP events QEMU sent while the command ran.
  returned: success
  type: list
  elements: dict
  sample: [{"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 1}}]
"""

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule, is_query


def main():
    qm = QMPModule(
        argument_spec=dict(
            command=dict(type="str", required=True),
            arguments=dict(type="dict", default={}),
            guest_agent=dict(type="bool", default=False),
        ),
    )
    if qm.params["guest_agent"]:
        qm.protocol = "guest-agent"
    command = qm.params["command"]
    arguments = qm.params["arguments"] or None
    # Before connecting: a result that says the connection failed shows the arguments too.
    qm.protect(command, arguments)
    with qm.connected():
        if is_query(command):
            result = qm.query(command, arguments)
        else:
            result = qm.change(command, arguments)
        events = list(qm.client.events)
    qm.exit(result=result, events=events)


if __name__ == "__main__":
    main()
