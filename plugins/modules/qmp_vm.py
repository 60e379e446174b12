#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_vm
short_description: Run, pause, power down or quit a running QEMU
version_added: 0.1.0
description:
  - Brings a QEMU virtual machine to the wanted run state over QMP, acting only when its
    current state differs.
  - It does not start QEMU; the C(qemu.qmp.vm) role does.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  state:
    description:
      - V(running) resumes the guest's CPUs (C(cont)). A guest that powered off while QEMU
        was kept alive (C(-no-shutdown)) is reset and started again; a suspended guest is woken up.
        A QEMU waiting for an incoming migration cannot be run, so that fails.
      - V(paused) stops the guest's CPUs (C(stop)). A guest already not running (paused,
        started with C(-S), after an outgoing migration) is unchanged.
      - V(shutdown) presses the guest's ACPI power button (C(system_powerdown)) and waits up to
        O(wait_timeout) seconds until the guest powers off. It fails, leaving the VM running, when
        the guest ignores the request. A paused guest cannot answer, so that fails at once.
        A QEMU that is not running any more (its socket is gone or refuses connections) is unchanged.
      - V(absent) quits QEMU at once (C(quit)), like pulling the plug, and waits up to O(wait_timeout)
        seconds until it has closed the connection. Already gone is unchanged.
    type: str
    choices: [running, paused, shutdown, absent]
    required: true
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Pause a VM
  qemu.qmp.qmp_vm:
    socket: /run/qemu/vm1.qmp
    state: paused

- name: Resume it
  qemu.qmp.qmp_vm:
    socket: /run/qemu/vm1.qmp
    state: running

- name: Ask the guest to power down, give it two minutes
  qemu.qmp.qmp_vm:
    socket: /run/qemu/vm1.qmp
    state: shutdown
    wait_timeout: 120

- name: Quit QEMU, whatever the guest is doing
  qemu.qmp.qmp_vm:
    socket: /run/qemu/vm1.qmp
    state: absent
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
state:
  description: The VM's state afterwards (in check mode, the state it would have).
  returned: success
  type: str
  sample: paused
status:
  description:
    - QEMU's run status afterwards, as C(query-status) reports it; V(absent) when QEMU is gone.
      In check mode, the status before.
  returned: success
  type: str
  sample: paused
waited:
  description: Seconds spent waiting for the guest or QEMU (shutdown and absent).
  returned: when the module waited
  type: float
"""

import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPConnectionClosed, QMPTimeoutError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_status


def current_state(status):
    """Map QEMU's run status onto the module's states."""
    if status is None:
        return "absent"
    if status["status"] == "shutdown":
        return "shutdown"
    return "running" if status["running"] else "paused"


def ensure_running(qm, status):
    if status["status"] == "inmigrate":
        qm.fail("QEMU at %s is waiting for an incoming migration (status inmigrate): it runs by "
                "itself when the migration completes" % qm.client.address)
    if status["status"] == "suspended":
        qm.change("system_wakeup")
        return
    if status["status"] == "shutdown":
        qm.change("system_reset")
    qm.change("cont")


def ensure_paused(qm, status):
    if status["status"] == "shutdown":
        # QEMU kept alive after the guest powered off: a reset powers the machine
        # on again (prelaunch) without running its CPUs.
        qm.change("system_reset")
    else:
        qm.change("stop")


def wait_until_gone(qm, deadline):
    """Read events until QEMU closes the connection; False if it is still there at the deadline."""
    return qm.client.wait_closed(max(0.0, deadline - time.monotonic()))


def ensure_shutdown(qm, status):
    if status["status"] != "running" and status["running"] is False:
        qm.fail("the VM is not running (status %s): a paused guest cannot answer a power-down "
                "request. Resume it first (state=running) or quit QEMU (state=absent)" % status["status"])
    qm.change("system_powerdown")
    if qm.check_mode:
        return None
    start = time.monotonic()
    deadline = start + qm.wait_timeout
    try:
        qm.wait_for_event("SHUTDOWN", timeout=qm.wait_timeout)
    except QMPTimeoutError:
        qm.fail("the guest did not power down within wait_timeout=%gs: it ignored the ACPI power-button "
                "request (no OS yet, or no ACPI handling). The VM is still running; use state=absent to "
                "quit QEMU" % qm.wait_timeout, waited=round(time.monotonic() - start, 3))
    except QMPConnectionClosed:
        return round(time.monotonic() - start, 3)
    # QEMU exits after the guest powers off unless it runs with -no-shutdown.
    wait_until_gone(qm, min(deadline, time.monotonic() + 5))
    return round(time.monotonic() - start, 3)


def ensure_absent(qm):
    qm.change("quit")
    if qm.check_mode:
        return None
    start = time.monotonic()
    if not wait_until_gone(qm, start + qm.wait_timeout):
        qm.fail("QEMU accepted quit but did not exit within wait_timeout=%gs" % qm.wait_timeout)
    return round(time.monotonic() - start, 3)


def main():
    qm = QMPModule(
        argument_spec=dict(
            state=dict(type="str", required=True, choices=["running", "paused", "shutdown", "absent"]),
        ),
    )
    wanted = qm.params["state"]
    result = {}
    with qm.connected(absent_ok=wanted in ("shutdown", "absent")):
        before = read_status(qm.query) if qm.client else None
        state = current_state(before)
        if state == wanted or (wanted == "shutdown" and state == "absent"):
            qm.exit(state=wanted, status=before["status"] if before else "absent",
                    before={"state": state}, after={"state": state})
        if wanted == "running":
            ensure_running(qm, before)
        elif wanted == "paused":
            ensure_paused(qm, before)
        elif wanted == "shutdown":
            result["waited"] = ensure_shutdown(qm, before)
        else:
            result["waited"] = ensure_absent(qm)
        if qm.check_mode:
            status = before["status"]
        elif qm.client is not None and qm.client.connected:
            status = read_status(qm.query)["status"]
        else:
            status = "absent"
    if result.get("waited") is None:
        result.pop("waited", None)
    qm.exit(state=wanted, status=status, before={"state": state}, after={"state": wanted}, **result)


if __name__ == "__main__":
    main()
