#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_nbd
short_description: Start or stop QEMU's NBD server, add or remove its exports
version_added: 0.1.0
description:
  - Manages the NBD server built into a running QEMU and the block nodes it exports, for example to
    let a backup tool read a point-in-time view of a disk with its dirty bitmap (pull-mode backups),
    or to receive a disk during a migration without shared storage.
  - Uses C(block-export-add), C(block-export-del) and C(query-block-exports) where QEMU has them
    (QEMU 5.2 and later), and C(nbd-server-add) and C(nbd-server-remove) elsewhere.
  - QEMU does not report whether its NBD server runs, nor where it listens. The module finds out
    whether it runs without changing anything; its address cannot be compared, so a running server
    is left as it is.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  export:
    description:
      - The export's name (also its block export id). Without it, the module manages the server itself.
    type: str
  state:
    description:
      - With O(export), V(present) adds the export (starting the server at O(address) first when it does
        not run) and V(absent) removes it, waiting until QEMU reports it gone.
      - Without O(export), V(present) starts the server at O(address) and V(absent) stops it (which removes
        every export).
    type: str
    choices: [present, absent]
    default: present
  address:
    description:
      - Where the server listens, as QEMU's C(SocketAddress), a dictionary with C(type) V(unix) and C(path),
        or C(type) V(inet) with C(host) and C(port). Needed to start the server.
    type: dict
  node:
    description: The block node to export. Required to add an export.
    type: str
  writable:
    description: Let NBD clients write to the export.
    type: bool
    default: false
  bitmaps:
    description:
      - Dirty bitmaps of O(node) to expose to NBD clients as the C(qemu:dirty-bitmap:NAME) metadata context,
        so a client reads only what changed.
      - QEMU exports a bitmap only while it does not record (disabled), so that it describes one point in
        time; the module fails early for one that records.
    type: list
    elements: str
    default: []
  description:
    description: A description NBD clients see.
    type: str
  tls_creds:
    description: The id of a TLS credentials object for the server.
    type: str
  max_connections:
    description: The most clients the server accepts at once (0, no limit).
    type: int
  force:
    description: With O(state=absent), remove an export even while clients are connected (they are disconnected).
    type: bool
    default: false
  recreate:
    description: When an export of that name exports another node, remove it and add it again.
    type: bool
    default: false
notes:
  - An existing export is compared on its node only; QEMU does not report O(writable), O(bitmaps) or O(description)
    back, so they are listed in RV(not_compared).
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Start QEMU's NBD server on a unix socket
  qemu.qmp.qmp_nbd:
    socket: /run/qemu/vm1.qmp
    address:
      type: unix
      path: /run/qemu/vm1.nbd

- name: Export disk0 read-only with its (disabled) dirty bitmap; address gives the URI
  qemu.qmp.qmp_nbd:
    socket: /run/qemu/vm1.qmp
    export: disk0
    node: disk0
    bitmaps: [backup]
    address:
      type: unix
      path: /run/qemu/vm1.nbd
  register: nbd_export

- name: Show where to read it
  ansible.builtin.debug:
    msg: "nbdinfo '{{ nbd_export.uri }}'"

- name: Stop the server and every export
  qemu.qmp.qmp_nbd:
    socket: /run/qemu/vm1.qmp
    state: absent
"""

RETURN = r"""
server:
  description: Whether the NBD server runs afterwards (in check mode, would run); null where QEMU cannot tell.
  returned: always
  type: dict
  contains:
    running:
      description: Whether it runs.
      type: bool
  sample: {"running": true}
export:
  description: The export as QEMU reports it afterwards (in check mode, as it would be); null when absent.
  returned: when O(export) is given
  type: dict
  contains:
    id:
      description: Its id (and NBD name).
      type: str
    node:
      description: The exported node.
      type: str
    type:
      description: V(nbd).
      type: str
    shutting_down:
      description: Whether QEMU is removing it.
      type: bool
  sample: {"id": "disk0", "node": "disk0", "type": "nbd", "shutting_down": false}
uri:
  description: The NBD URI of the export, when O(address) is given.
  returned: when O(export) and O(address) are given
  type: str
  sample: nbd+unix:///disk0?socket=/run/qemu/vm1.nbd
not_compared:
  description: Options of an existing export QEMU does not report, so they could not be compared.
  returned: when the export already existed
  type: list
  elements: str
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/run/qemu/vm1.nbd"}}}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "Bitmap 'backup' is not found"}
"""

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_block import backing_links, backing_node_name
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_nbd import (
    add_export,
    export_uri,
    read_exports,
    remove_export,
    server_running,
    start_server,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_bitmaps, read_block_nodes


def ensure_server(qm, running, result):
    """Start the server unless it runs; returns whether it runs (or would)."""
    if running:
        return True
    address = qm.params["address"]
    if not address:
        qm.fail("QEMU's NBD server is not running%s: give address to start it"
                % (" (or QEMU cannot tell)" if running is None else ""), **result)
    try:
        start_server(qm, address, qm.params["tls_creds"], qm.params["max_connections"])
    except ValueError as exc:
        qm.fail(str(exc))
    return True


def backing_chain(nodes, node, backing_of):
    """node, its backing node, that one's backing node, ..."""
    chain = []
    while node in nodes and node not in chain:
        chain.append(node)
        node = backing_node_name(nodes[node], nodes, backing_of)
    return chain


def check_bitmaps(qm, node, names, writable):
    """Refuse, before QEMU does, bitmaps a client could not read consistently.

    QEMU exports a bitmap of the node or of a node in its backing chain (a
    fleece overlay exports the bitmap of the disk behind it).
    """
    nodes = dict((n["node-name"], n) for n in read_block_nodes(qm.query, qm.schema))
    chain = backing_chain(nodes, node, backing_links(qm))
    bitmaps = {}
    for bitmap in read_bitmaps(qm.query, qm.schema, list(nodes.values())):
        if bitmap["node"] in chain and bitmap["name"] not in bitmaps:
            bitmaps[bitmap["name"]] = bitmap
    for name in names:
        if name not in bitmaps:
            qm.fail("node %s has no bitmap %s to export (nor has a node behind it)" % (node, name))
        if bitmaps[name]["recording"] and not writable:
            qm.fail("bitmap %s on node %s still records writes: QEMU exports only a disabled bitmap, so it "
                    "describes one point in time (disable it first, for example with qemu.qmp.qmp_bitmap "
                    "recording=false)" % (name, node))


def ensure_export(qm, exports, running, result):
    params = qm.params
    name = params["export"]
    current = (exports or {}).get(name)
    if params["state"] == "absent":
        if current is not None:
            remove_export(qm, name, params["force"])
        return None
    if not params["node"]:
        qm.fail("node is required to add export %s" % name)
    if current is not None:
        differences = {}
        if current["node"] != params["node"]:
            differences["node"] = {"wanted": params["node"], "qemu": current["node"]}
        not_compared = [k for k in ("writable", "bitmaps", "description") if params[k]]
        if not qm.needs_recreate("export %s" % name, differences, not_compared, result,
                                 "remove it and add it again"):
            return current
        remove_export(qm, name, force=True)
    check_bitmaps(qm, params["node"], params["bitmaps"], params["writable"])
    result["server"]["running"] = ensure_server(qm, running, result)
    try:
        add_export(qm, name, params["node"], params["writable"], params["bitmaps"], params["description"])
    except ValueError as exc:
        qm.fail(str(exc), **result)
    if qm.check_mode:
        return {"id": name, "node": params["node"], "type": "nbd", "shutting_down": False}
    return (read_exports(qm) or {}).get(name, {"id": name, "node": params["node"], "type": "nbd"})


def main():
    qm = QMPModule(
        argument_spec=dict(
            export=dict(type="str"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            address=dict(type="dict"),
            node=dict(type="str"),
            writable=dict(type="bool", default=False),
            bitmaps=dict(type="list", elements="str", default=[]),
            description=dict(type="str"),
            tls_creds=dict(type="str"),
            max_connections=dict(type="int"),
            force=dict(type="bool", default=False),
            recreate=dict(type="bool", default=False),
        ),
    )
    params = qm.params
    result = {}
    with qm.connected():
        nodes = [n["node-name"] for n in read_block_nodes(qm.query, qm.schema)]
        running = server_running(qm, nodes[0] if nodes else None)
        exports = read_exports(qm)
        result["server"] = {"running": running}
        if params["export"]:
            before = (exports or {}).get(params["export"])
            after = ensure_export(qm, exports, running, result)
            result["export"] = after
            uri = export_uri(params["address"], params["export"])
            if uri:
                result["uri"] = uri
            diff = ({"export": before}, {"export": after})
        else:
            if params["state"] == "present":
                result["server"]["running"] = ensure_server(qm, running, result)
            elif running or running is None and exports:
                qm.change("nbd-server-stop")
                result["server"]["running"] = False
            diff = ({"server": {"running": running}}, {"server": dict(result["server"])})
    qm.exit(before=diff[0], after=diff[1], **result)


if __name__ == "__main__":
    main()
