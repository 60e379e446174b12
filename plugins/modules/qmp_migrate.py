#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_migrate
short_description: Live-migrate a running QEMU, or prepare either side of a migration
version_added: 0.1.0
description:
  - Sets migration capabilities and parameters, makes a destination listen, migrates a VM and follows
    the migration until it ends, or cancels it.
  - Parameter names follow the running QEMU's schema (C(max-bandwidth), C(downtime-limit) in milliseconds,
    ...). On QEMUs that only have the older commands, C(max-bandwidth), C(downtime-limit) and
    C(xbzrle-cache-size) are set with them (and, as those cannot be read back, on every run).
  - The C(qemu.qmp.migrate) role moves a VM defined for the C(qemu.qmp.vm) role with this module,
    storage included.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  state:
    description:
      - V(configured) sets O(capabilities) and O(parameters) where they differ from what QEMU reports, and
        nothing else. They must be set before a migration starts, on both sides where both need them
        (V(postcopy-ram), V(dirty-bitmaps), V(multifd) and its channels, ...).
      - V(incoming) makes a destination started with C(-incoming defer) listen on O(uri). One that already
        listens there is unchanged; one started without C(-incoming) fails.
      - V(completed) starts the migration to O(uri) unless one is under way, and waits until it completes, fails,
        or O(wait_timeout) passes. One that already completed (this QEMU in run state C(postmigrate)) is unchanged. A migration paused before switch-over
        (capability V(pause-before-switchover)) is continued.
      - V(started) starts the migration unless one is under way, waits up to O(poll) seconds, and reports its
        progress without waiting for the end; it reports RV(finished) when the migration ended or reached
        V(pre-switchover), where it leaves it waiting for V(completed).
      - V(cancelled) cancels a migration under way; none is unchanged. The source VM goes on running.
    type: str
    choices: [configured, incoming, completed, started, cancelled]
    default: completed
  uri:
    description:
      - Where to migrate to (V(completed), V(started)) or where to listen (V(incoming)), for example
        V(tcp:192.0.2.10:4444) or V(unix:/run/qemu/vm1.migrate).
    type: str
  capabilities:
    description: Migration capabilities by name (for example C(multifd) or C(dirty-bitmaps)) and whether they are on, with O(state=configured).
    type: dict
    default: {}
  parameters:
    description:
      - Migration parameters by QEMU's name (for example C(max-bandwidth) in bytes per second,
        C(downtime-limit) in milliseconds, C(multifd-channels)) and their values, with O(state=configured).
    type: dict
    default: {}
  postcopy:
    description:
      - Switch to post-copy (C(migrate-start-postcopy)) once O(postcopy_after_passes) pre-copy passes are done,
        so a guest that dirties memory faster than the link carries still completes. Both sides need the
        V(postcopy-ram) capability.
      - Post-copy has no safety net. If either side or the link fails during post-copy, the guest is lost.
    type: bool
    default: false
  postcopy_after_passes:
    description: With O(postcopy), how many pre-copy passes to complete first.
    type: int
    default: 1
  poll:
    description: With O(state=started), seconds to wait before reporting the progress.
    type: float
    default: 0
notes:
  - A failed migration fails the module with QEMU's C(error-desc) and leaves the source VM running (the module
    resumes it if QEMU left it paused).
  - O(wait_timeout) (by default O(timeout)) is how long the module waits for the migration, and for a
    cancelled one to end. When it passes, the module fails and the migration goes on; cancel it with
    O(state=cancelled).
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Let the destination (started with -incoming defer) listen
  qemu.qmp.qmp_migrate:
    socket: /run/qemu/vm1-new.qmp
    state: incoming
    uri: unix:/run/qemu/vm1.migrate

- name: Lift QEMU's 128 MiB/s default cap on the source
  qemu.qmp.qmp_migrate:
    socket: /run/qemu/vm1.qmp
    state: configured
    capabilities:
      events: true
    parameters:
      max-bandwidth: 10737418240
      downtime-limit: 300

- name: Migrate, and wait up to ten minutes
  qemu.qmp.qmp_migrate:
    socket: /run/qemu/vm1.qmp
    uri: unix:/run/qemu/vm1.migrate
    wait_timeout: 600
  register: migration

- name: Show how it went
  ansible.builtin.debug:
    msg: "{{ migration.info.status }} in {{ migration.info['total-time'] }} ms, {{ migration.info.downtime }} ms down"
"""

RETURN = r"""
info:
  description:
    - What C(query-migrate) reports afterwards (status, C(total-time), C(downtime), C(setup-time), C(ram) with
      C(transferred), C(total), C(remaining), C(mbps), C(dirty-sync-count), ...); C(status) is V(none) when no
      migration was started.
  returned: always
  type: dict
  sample: {"status": "completed", "total-time": 3120, "downtime": 42, "ram": {"transferred": 296534016}}
progress:
  description: The progress in short (percent of RAM sent, rate, passes, expected downtime).
  returned: with O(state) V(completed) and V(started)
  type: dict
  sample: {"status": "active", "percent": 63.2, "mbps": 1693.2, "passes": 1, "expected_downtime": 300}
finished:
  description: With O(state=started), whether the migration ended or waits before switch-over.
  returned: with O(state=started)
  type: bool
events:
  description: The C(MIGRATION) and C(MIGRATION_PASS) events seen (QEMU sends them with the V(events) capability on).
  returned: with O(state) V(completed) and V(started)
  type: list
  elements: dict
listening:
  description: Where the destination listens, as QEMU reports it (with the port it picked for port 0).
  returned: with O(state=incoming)
  type: dict
  sample: {"type": "inet", "host": "0.0.0.0", "port": "4444"}
source_status:
  description: The source VM's run status after a failed or cancelled migration.
  returned: when a migration failed or was cancelled
  type: str
changed_settings:
  description: The capabilities and parameters that were (or, in check mode, would be) set.
  returned: with O(state=configured)
  type: list
  elements: str
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent. A query sent
      several times in a row while waiting is listed once, with C(repeated) giving the count.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "migrate", "arguments": {"uri": "unix:/run/qemu/vm1.migrate"}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "'-incoming' was not specified on the command line"}
"""

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_migration import (
    FINAL,
    Migration,
    MigrationError,
    cancel,
    configure,
    ensure_incoming,
    progress,
    read_info,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_status


def require_uri(qm):
    if not qm.params["uri"]:
        qm.fail("uri is required with state=%s" % qm.params["state"])
    return qm.params["uri"]


def main():
    qm = QMPModule(
        argument_spec=dict(
            state=dict(type="str", default="completed",
                       choices=["configured", "incoming", "completed", "started", "cancelled"]),
            uri=dict(type="str"),
            capabilities=dict(type="dict", default={}),
            parameters=dict(type="dict", default={}),
            postcopy=dict(type="bool", default=False),
            postcopy_after_passes=dict(type="int", default=1, no_log=False),
            poll=dict(type="float", default=0),
        ),
    )
    state = qm.params["state"]
    with qm.connected():
        try:
            if state == "configured":
                before, after, changed = configure(qm, qm.params["capabilities"], qm.params["parameters"])
                qm.exit(changed_settings=changed, info=read_info(qm), before=before, after=after)
            if state == "incoming":
                info, address = ensure_incoming(qm, require_uri(qm))
                qm.exit(info=info, listening=address, before={"listening": None if qm.changed else address},
                        after={"listening": address or qm.params["uri"]})
            info = read_info(qm)
            if state == "cancelled":
                info = cancel(qm, info)
                qm.exit(info=info, source_status=read_status(qm.query)["status"],
                        before={"status": info["status"]}, after={"status": "cancelled"})
            migration = Migration(qm, qm.params["uri"], qm.params["postcopy"], qm.params["postcopy_after_passes"])
            migration.start_or_continue(info, switch_over=state == "completed")
            if qm.check_mode:
                qm.exit(info=info, progress=progress(info), events=[], finished=False,
                        before={"status": info["status"]}, after={"status": "completed"})
            if state == "started":
                info, dummy = migration.follow(qm.params["poll"], stop_at_switchover=True)
                finished = info["status"] in FINAL or info["status"] == "pre-switchover"
                if info["status"] == "failed":
                    migration.fail_with(info, "the migration failed: %s" % info.get("error-desc", "no reason given"))
                qm.exit(info=info, progress=progress(info), events=migration.follower.events, finished=finished)
            info, reached = migration.follow(qm.wait_timeout, stop_at_switchover=False)
            if not reached:
                qm.fail("the migration did not complete within wait_timeout=%gs (it is %s); it goes on, "
                        "cancel it with state=cancelled" % (qm.wait_timeout, info["status"]),
                        info=info, progress=progress(info), events=migration.follower.events)
            if info["status"] != "completed":
                migration.fail_with(info, "the migration %s: %s" % (
                    info["status"], info.get("error-desc", "no reason given")))
        except MigrationError as exc:
            qm.fail(str(exc))
    qm.exit(info=info, progress=progress(info), events=migration.follower.events,
            before={"status": "none"}, after={"status": info["status"]})


if __name__ == "__main__":
    main()
