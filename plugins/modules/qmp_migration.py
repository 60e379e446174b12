#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_migration
short_description: Run a whole live migration, storage included, as one step on each host
version_added: 0.1.0
description:
  - The migration engine of the collection, which the C(qemu.qmp.migrate) role calls. Each side of a migration
    is one call on its own host, on one QMP connection.
  - O(state=listening), on the destination (a QEMU started with C(-incoming defer)), sets the capabilities and
    parameters, serves each disk to copy as a writable NBD export named for this migration, and makes QEMU
    listen for the migration. Both listen only on the address given, never on every address.
  - O(state=migrated), on the source, mirrors each disk in O(copies) into the destination's export, starts the
    migration, follows it, applies the convergence policy (O(converge)), and does the switch-over itself. With
    disk copies, QEMU stops the guest before the switch-over (C(pre-switchover)); the same process then
    completes the mirrors and continues the migration at once, so the guest's pause stays within the downtime
    limit. Any failure before the hand-over undoes what the run did and leaves the VM running on the source.
    A source that already handed its VM over (run state C(postmigrate)) is unchanged.
  - B(Failures.) The message of a failed migration says where the VM runs then, as read from the source after
    the failure (its run state, its migration's state, and, when its QMP connection broke, whether its process
    still lives), and RV(vm_runs) says it in one word. A source QEMU that was killed or crashed in the middle is
    reported as gone, with the VM running nowhere.
  - B(Long runs.) The run goes on in a process of its own on the host. This module's action plugin follows it,
    printing a progress line every O(poll_interval) seconds, for as long as it takes. When the controller stops
    following (killed, cancelled, its connection lost) for O(controller_timeout) seconds before the hand-over,
    the run cancels the migration and gives the source its VM back.
  - O(state=closed), on the destination after the migration (or after a failed one), removes this migration's
    NBD exports, and the NBD server once it serves nothing else.
  - B(TLS.) With O(tls_creds), the migration stream and the NBD traffic are encrypted and authenticated with
    the C(tls-creds-x509) object of that id (create it with M(qemu.qmp.qmp_object), C(endpoint=server) on the
    destination, C(endpoint=client) on the source).
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
options:
  state:
    description:
      - V(listening) prepares the destination; V(migrated) runs the migration from the source; V(closed) removes
        the destination's exports.
    type: str
    choices: [listening, migrated, closed]
    required: true
  uri:
    description:
      - With O(state=listening), where the destination listens, for example V(tcp:192.0.2.10:0) (port 0 lets the
        kernel choose; the result gives the port) or V(unix:/run/qemu-qmp/vm1.migrate). An address that means
        every address (V(0.0.0.0), V(::)) is refused.
      - With O(state=migrated), where the source sends the VM (RV(uri) of the destination's O(state=listening)).
    type: str
  copies:
    description:
      - The node names of the disks whose storage is copied, not shared (the same on both sides, and in each
        call of one migration).
    type: list
    elements: str
    default: []
  export_prefix:
    description:
      - The NBD export of each copy is named O(export_prefix)C(-)NODE. Make it unique to the migration, so that
        two migrations into one host never share a name.
      - With O(state=closed), a prefix that ends in C(*) stands for any text there, so that the exports an
        earlier run left, whose prefix is not known, can be removed (V(vm1-*) removes C(vm1-20261201T101500-disk0)
        of a copy of node C(disk0)).
    type: str
    default: qemu-qmp-migration
  nbd_address:
    description:
      - With O(state=listening), where the destination serves the copies (C(type=inet) with C(host) and C(port),
        port V(0) for one the kernel chooses, or C(type=unix) with C(path)).
      - With O(state=migrated), where the source reaches them (the C(address) in RV(nbd) of O(state=listening)).
    type: dict
  tls_creds:
    description: The id of a C(tls-creds-x509) object on this QEMU; the migration and the copies use TLS with it.
    type: str
  tls_hostname:
    description: With O(state=migrated) and O(tls_creds), the name the destination's certificate must carry.
      Default the host in O(uri).
    type: str
  capabilities:
    description:
      - Migration capabilities by QEMU's name, set on both sides. The policy adds what it needs (C(postcopy-ram)
        and no C(multifd) for V(postcopy), C(auto-converge) on the source), and disk copies add
        C(pause-before-switchover) on the source.
    type: dict
    default: {}
  parameters:
    description: Migration parameters by QEMU's name (for example C(max-bandwidth), C(multifd-channels)).
    type: dict
    default: {}
  downtime_limit:
    description: The longest pause of the guest QEMU plans for, in milliseconds (parameter C(downtime-limit)).
    type: int
    default: 300
  converge:
    description:
      - What to do with a migration that is still going on after O(converge_after_passes) passes over the RAM
        (the guest dirties memory about as fast as the link carries it).
      - V(cancel) waits for it until O(wait_timeout), then cancels it and the VM stays on the source.
      - V(downtime) raises the downtime limit once per further pass, in O(downtime_steps) steps up to
        O(downtime_ceiling), as Nova and KubeVirt do.
      - V(postcopy) switches to post-copy. The guest runs on the destination at once and fetches the pages it
        still needs; the migration always ends. If either side or the link fails during post-copy, the guest is
        lost.
      - V(auto-converge) lets QEMU slow the guest's vCPUs down until the migration converges.
    type: str
    choices: [cancel, downtime, postcopy, auto-converge]
    default: cancel
  converge_after_passes:
    description: How many passes over the RAM a migration may take before O(converge) acts.
    type: int
    default: 3
  downtime_ceiling:
    description: With O(converge=downtime), the highest downtime limit, in milliseconds.
    type: int
    default: 2000
  downtime_steps:
    description: With O(converge=downtime), in how many steps the limit goes from O(downtime_limit) to O(downtime_ceiling).
    type: int
    default: 5
  copy_speed:
    description: Bytes per second each disk copy may take before the switch-over; V(0) is no limit.
    type: int
    default: 0
  poll_interval:
    description: Seconds between two progress lines (and two polls of the controller).
    type: float
    default: 2
  controller_timeout:
    description:
      - Seconds without a poll from the controller after which the run gives the migration up and the VM stays
        on the source (at least three polls and 5 seconds).
    type: float
    default: 60
  host_budget:
    description:
      - With O(state=migrated), how many migrations may leave this host at once, counted on the host itself (one
        flock per slot in O(budget_dir)), whatever the controller does. A migration that finds every slot taken
        waits for one, up to O(wait_timeout), before it asks anything of QEMU, and says which migrations hold them.
      - V(0) sets no limit.
    type: int
    default: 0
  budget_dir:
    description: The folder of the host's budget slots, shared by every migration leaving the host.
    type: path
    default: /run/qemu-qmp/budget
notes:
  - O(wait_timeout) is how long the whole migration (copies included) may take, 3600 seconds unless set.
  - The run holds the source's QMP socket for its whole length; give tools a second C(-qmp) socket.
attributes:
  check_mode:
    description:
      - O(state=migrated) reports the plan (the VM's state, where it goes, the copies, capabilities, parameters, TLS,
        policy) read from the source, and changes nothing. O(state=listening) and O(state=closed) validate and list
        the commands they would send.
    support: full
  diff_mode:
    description: A migration has no before and after to show.
    support: none
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
# The destination QEMU was started with -incoming defer and an empty image of the same size as node disk0.
# Across hosts, the destination's calls run there (delegate_to), and the address is the one the source
# reaches it at; 127.0.0.1 keeps this example on one host.
- name: Let the destination listen on its own address, serving the disk to copy
  qemu.qmp.qmp_migration:
    socket: /run/qemu/vm1-new.qmp
    state: listening
    uri: tcp:127.0.0.1:0
    nbd_address: {type: inet, host: 127.0.0.1, port: "0"}
    copies: [disk0]
    export_prefix: vm1-20261201T101500
  register: incoming

- name: Migrate the VM there, copying its disk; raise the downtime limit if it does not converge
  qemu.qmp.qmp_migration:
    socket: /run/qemu/vm1.qmp
    state: migrated
    uri: "{{ incoming.uri }}"
    nbd_address: "{{ incoming.nbd.address }}"
    copies: [disk0]
    export_prefix: vm1-20261201T101500
    converge: downtime
  register: migration

- name: Stop serving the disk on the destination
  qemu.qmp.qmp_migration:
    socket: /run/qemu/vm1-new.qmp
    state: closed
    copies: [disk0]
    export_prefix: vm1-20261201T101500

- name: Show how it went
  ansible.builtin.debug:
    msg: "{{ migration.status }} in {{ migration.total_time_ms }} ms, guest paused {{ migration.downtime_ms }} ms"
"""

RETURN = r"""
uri:
  description: With O(state=listening), where the source sends the VM (the port the kernel chose filled in); else O(uri).
  returned: success
  type: str
listening:
  description: The address QEMU listens on for the migration (C(query-migrate)'s C(socket-address)).
  returned: O(state=listening)
  type: dict
nbd:
  description: Where the destination serves the copies (C(address), the port filled in) and their C(exports).
  returned: O(state=listening) with O(copies)
  type: dict
plan:
  description: What the run would do.
  returned: check mode
  type: dict
status:
  description: The migration's final status (C(completed)).
  returned: O(state=migrated)
  type: str
budget_wait:
  description: Seconds the migration waited for a slot of the host's budget (see O(host_budget)).
  returned: O(state=migrated)
  type: float
downtime_ms:
  description: The guest's pause as QEMU measured it.
  returned: O(state=migrated)
  type: int
paused_before_switchover_ms:
  description: With copies, how long the guest stayed paused in C(pre-switchover) while the mirrors finished.
  returned: O(state=migrated)
  type: float
policy_steps:
  description: What the convergence policy did, at which pass (C(downtime-limit) raised, C(postcopy) started).
  returned: O(state=migrated)
  type: list
  elements: dict
total_time_ms:
  description: QEMU's total time of the migration.
  returned: O(state=migrated)
  type: int
info:
  description: QEMU's C(query-migrate) at the end.
  returned: O(state=migrated)
  type: dict
vm_runs:
  description:
    - Where the VM runs after a failed O(state=migrated), as read from the source after the failure.
    - V(source) (the migration was cancelled), V(destination) (the source had handed the VM over),
      V(both) (post-copy failed, and the guest's memory is split between the two QEMUs), V(nowhere) (the source
      QEMU is gone), or V(unknown) (the source still runs but does not answer).
  returned: failure of O(state=migrated) after the migration started
  type: str
source_pid:
  description: The process id of the source QEMU (the peer of its QMP socket).
  returned: failure of O(state=migrated) after the migration started
  type: int
removed_exports:
  description: The exports removed by O(state=closed).
  returned: O(state=closed)
  type: list
  elements: str
qmp_commands:
  description: The QMP commands sent (or, in check mode, that would be sent).
  returned: always
  type: list
  elements: dict
"""

from ansible_collections.qemu.qmp.plugins.module_utils import detached_run
from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import failure, finish
from ansible_collections.qemu.qmp.plugins.module_utils.host_budget import DEFAULT_DIR as DEFAULT_BUDGET_DIR, HostBudget
from ansible_collections.qemu.qmp.plugins.module_utils.migration_engine import (
    CONVERGE_POLICIES, Incoming, Outgoing, capabilities_for, split_tcp_uri)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule

DEFAULT_WAIT = 3600.0


def main():
    qm = QMPModule(
        argument_spec=dict(
            state=dict(type="str", required=True, choices=["listening", "migrated", "closed"]),
            uri=dict(type="str"),
            copies=dict(type="list", elements="str", default=[]),
            export_prefix=dict(type="str", default="qemu-qmp-migration"),
            nbd_address=dict(type="dict"),
            tls_creds=dict(type="str"),
            tls_hostname=dict(type="str"),
            capabilities=dict(type="dict", default={}),
            parameters=dict(type="dict", default={}),
            downtime_limit=dict(type="int", default=300),
            converge=dict(type="str", default="cancel", choices=list(CONVERGE_POLICIES)),
            converge_after_passes=dict(type="int", default=3, no_log=False),
            downtime_ceiling=dict(type="int", default=2000),
            downtime_steps=dict(type="int", default=5),
            copy_speed=dict(type="int", default=0),
            poll_interval=dict(type="float", default=2),
            controller_timeout=dict(type="float", default=60),
            host_budget=dict(type="int", default=0),
            budget_dir=dict(type="path", default=DEFAULT_BUDGET_DIR),
        ),
        required_if=[("state", "listening", ["uri"]), ("state", "migrated", ["uri"])],
    )
    params = qm.params
    for option, low in (("poll_interval", 0.01), ("controller_timeout", 1)):
        if not low <= params[option] <= 1e9:
            qm.fail("%s must be a number of seconds from %g to 1000000000, not %r" % (option, low, params[option]))
    for option in ("downtime_limit", "downtime_ceiling", "downtime_steps", "converge_after_passes", "copy_speed"):
        if params[option] < 0:
            qm.fail("%s must not be negative, not %d" % (option, params[option]))
    if params["host_budget"] < 0:
        qm.fail("host_budget must be 0 (no limit) or more, not %d" % params["host_budget"])
    if params["copies"] and params["state"] != "closed" and not params["nbd_address"]:
        qm.fail("copies need nbd_address: where the destination serves them")
    if "*" in params["export_prefix"] and (params["state"] != "closed" or not params["export_prefix"].endswith("*")):
        qm.fail("export_prefix may end in * only with state=closed, not %r" % params["export_prefix"])
    capabilities = capabilities_for(params["converge"], params["capabilities"], params["copies"],
                                    "source" if params["state"] == "migrated" else "destination")
    copies = [{"node": node, "export": "%s-%s" % (params["export_prefix"], node)} for node in params["copies"]]
    exports = [{"node": c["node"], "name": c["export"]} for c in copies]

    if params["state"] != "migrated":
        with qm.connected():
            incoming = Incoming(qm, params["uri"], exports, params["nbd_address"], params["tls_creds"], capabilities,
                                dict(params["parameters"]))
            try:
                result = incoming.prepare() if params["state"] == "listening" else incoming.close()
            except QMPError as exc:
                finish(qm, failure(exc))
        finish(qm, dict(result, changed=qm.changed))

    tcp = split_tcp_uri(params["uri"])
    settings = dict(
        uri=params["uri"], copies=copies, nbd_server=params["nbd_address"],
        tls_creds=params["tls_creds"], tls_hostname=params["tls_hostname"] or (tcp[0] if tcp else None),
        capabilities=params["capabilities"], parameters=params["parameters"],
        downtime_limit=params["downtime_limit"], converge=params["converge"],
        converge_after_passes=params["converge_after_passes"],
        downtime_ceiling=max(params["downtime_ceiling"], params["downtime_limit"]),
        downtime_steps=params["downtime_steps"], copy_speed=params["copy_speed"],
        poll_interval=params["poll_interval"], timeout=params["wait_timeout"] or DEFAULT_WAIT)
    if settings["nbd_server"] and settings["nbd_server"].get("port") is not None:
        settings["nbd_server"] = dict(settings["nbd_server"], port=str(settings["nbd_server"]["port"]))
    # The plan is read before the run starts: what would refuse the migration fails here, plainly.
    with qm.connected():
        try:
            outgoing = Outgoing(qm, settings, detached_run.Reporter())
            done = outgoing.already_migrated()
            plan = None if done else outgoing.plan()
        except QMPError as exc:
            finish(qm, failure(exc))
    if done:
        finish(qm, {"changed": False, "status": "completed", "uri": params["uri"], "info": done,
                    "msg": "this QEMU already handed its VM over (run state postmigrate)"})
    if qm.check_mode:
        finish(qm, {"changed": True, "plan": plan})

    def run(reporter):
        try:
            # The host's budget of outgoing migrations is taken before QEMU is asked for anything.
            with HostBudget(params["budget_dir"], "migration", params["host_budget"], settings["timeout"], reporter,
                            "migration of %s to %s" % (qm.params.get("socket") or "the VM", params["uri"])) as budget:
                qm.open_connection()
                return dict(Outgoing(qm, settings, reporter).run(), budget_wait=budget.waited)
        except QMPError as exc:
            return failure(exc, {"qmp_commands": qm.commands})
        finally:
            qm.close_connection()

    detached_run.run_or_follow(qm, run, params["poll_interval"], params["controller_timeout"])


if __name__ == "__main__":
    main()
