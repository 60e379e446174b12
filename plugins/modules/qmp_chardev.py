#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_chardev
short_description: Add, change or remove a character device in a running QEMU
version_added: 0.1.0
description:
  - Makes a character device (the back end of a serial port, a console, a guest agent channel, ...)
    present with the wanted back end, or absent, as C(chardev-add), C(chardev-change) and
    C(chardev-remove) do.
  - QEMU reports little about a character device. The module compares the back end's type (from QEMU's
    object tree) and, for sockets, the address and server mode (from C(qom-get) and C(query-chardev)).
    Everything else (a file's path, a ring buffer's size, UDP addresses, socket options such as
    C(wait) or C(reconnect)) is not reported by QEMU, so it cannot be compared; those options are
    listed in RV(not_compared), and an existing character device is left as it is for them.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  id:
    description:
      - The character device's id.
    type: str
    required: true
  state:
    description:
      - V(present) adds the character device when QEMU has none with that id. An existing one with the
        same back end is unchanged; one with another back end fails, saying what differs, unless
        O(recreate) is set.
      - V(absent) removes it. A character device still used by a device (a serial port, a console)
        cannot be removed; that fails with QEMU's error.
    type: str
    choices: [present, absent]
    default: present
  backend:
    description:
      - The back end in QEMU's own C(ChardevBackend) form, a dictionary with C(type) (V(socket), V(file),
        V(pty), V(null), V(ringbuf), V(udp), ...) and C(data) (that type's options, for example C(addr)
        and C(server) for a socket, C(out) for a file, C(size) for a ring buffer).
      - Required with O(state=present).
    type: dict
  recreate:
    description:
      - When an existing character device has another back end, switch it in place with
        C(chardev-change), which keeps its front end (the serial port or console) attached and working.
    type: bool
    default: false
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: A unix socket server for a console, reachable at /run/qemu/vm1.console
  qemu.qmp.qmp_chardev:
    socket: /run/qemu/vm1.qmp
    id: console0
    backend:
      type: socket
      data:
        addr:
          type: unix
          data:
            path: /run/qemu/vm1.console
        server: true
        wait: false

- name: A pseudo terminal
  qemu.qmp.qmp_chardev:
    socket: /run/qemu/vm1.qmp
    id: tty0
    backend:
      type: pty
      data: {}
  register: tty0

- name: Show where to attach a terminal
  ansible.builtin.debug:
    msg: "screen {{ tty0.chardev.pty }}"

- name: Remove both
  qemu.qmp.qmp_chardev:
    socket: /run/qemu/vm1.qmp
    id: "{{ item }}"
    state: absent
  loop: [console0, tty0]
"""

RETURN = r"""
chardev:
  description:
    - The character device as QEMU reports it afterwards; in check mode, as it would be. Null when absent.
  returned: always
  type: dict
  contains:
    id:
      description: Its id.
      type: str
    type:
      description: Back end type, for example V(socket), V(file) or V(pty).
      type: str
    filename:
      description: QEMU's own description of the back end (C(query-chardev)), for example V(pty:/dev/pts/3).
      type: str
    frontend_open:
      description: Whether its front end has it open.
      type: bool
    pty:
      description: The pseudo terminal's path.
      type: str
      returned: for V(pty) back ends
    address:
      description: The socket address QEMU uses (with the port it picked for port V(0)).
      type: dict
      returned: for V(socket) back ends
    server:
      description: Whether the socket listens.
      type: bool
      returned: for V(socket) back ends
  sample: {"id": "tty0", "type": "pty", "filename": "pty:/dev/pts/3", "frontend_open": false, "pty": "/dev/pts/3"}
not_compared:
  description: Options of O(backend) that QEMU does not report, so they could not be compared with an existing character device.
  returned: when the character device already existed
  type: list
  elements: str
  sample: [wait]
differences:
  description: Each part of the back end that differs, with the wanted value and QEMU's.
  returned: when an existing character device differs
  type: dict
  sample: {"type": {"wanted": "socket", "qemu": "file"}}
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "query-chardev"}, {"execute": "chardev-remove", "arguments": {"id": "tty0"}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "Chardev 'serial0' is busy"}
"""

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_devices import compare_chardev, read_chardev
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule


def summary(chardev):
    if chardev is None:
        return {"state": "absent"}
    out = {"state": "present", "type": chardev.get("type")}
    for key in ("address", "server", "pty"):
        if key in chardev:
            out[key] = chardev[key]
    return out


def predicted(chardev_id, backend):
    """What check mode reports for a character device it would add or change."""
    return {"id": chardev_id, "type": backend.get("type"), "filename": None, "frontend_open": None}


def ensure_present(qm, chardev_id, backend, before, result):
    if before is not None:
        differences, not_compared = compare_chardev(backend, before)
        if not qm.needs_recreate("chardev %s" % chardev_id, differences, not_compared, result,
                                 "switch it in place with chardev-change, keeping its front end attached"):
            return before
        if not qm.schema.feature("chardev_change"):
            qm.fail("this QEMU has no chardev-change, so chardev %s cannot be switched in place" % chardev_id,
                    **result)
        reply = qm.change("chardev-change", {"id": chardev_id, "backend": backend})
    else:
        reply = qm.change("chardev-add", {"id": chardev_id, "backend": backend})
    if qm.check_mode:
        return predicted(chardev_id, backend)
    after = read_chardev(qm.query, chardev_id)
    if reply and reply.get("pty"):
        after["pty"] = reply["pty"]
    return after


def main():
    qm = QMPModule(
        argument_spec=dict(
            id=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            backend=dict(type="dict"),
            recreate=dict(type="bool", default=False),
        ),
        required_if=[("state", "present", ["backend"])],
    )
    chardev_id = qm.params["id"]
    result = {}
    with qm.connected():
        before = read_chardev(qm.query, chardev_id)
        if qm.params["state"] == "present":
            after = ensure_present(qm, chardev_id, qm.params["backend"], before, result)
        else:
            after = None
            if before is not None:
                try:
                    qm.change("chardev-remove", {"id": chardev_id})
                except QMPCommandError as exc:
                    hint = " (a device such as a serial port or console still uses it; remove that device " \
                        "first)" if "busy" in exc.desc else ""
                    qm.fail("cannot remove chardev %s: %s%s" % (chardev_id, exc.desc, hint),
                            qmp_error={"class": exc.error_class, "desc": exc.desc})
    qm.exit(chardev=after, before=summary(before), after=summary(after), **result)


if __name__ == "__main__":
    main()
