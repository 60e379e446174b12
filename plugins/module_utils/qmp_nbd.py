# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""QEMU's built-in NBD server and its exports.

QEMU reports its exports (query-block-exports, QEMU 5.2 and later) but not
whether its NBD server runs, nor where. `server_running` asks without
changing anything: adding an export of an existing node with a bitmap that
cannot exist fails with "NBD server not running" exactly when it does not
run, and with a missing-bitmap error otherwise.
"""

from __future__ import annotations

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError, QMPTimeoutError

_PROBE_ID = "qemu.qmp-probe"
_PROBE_BITMAP = "qemu.qmp-no-such-bitmap"


def server_running(qm, any_node):
    """True or False, or None when QEMU's answer does not tell."""
    if qm.schema.has_command("block-export-add") and any_node:
        arguments = {"type": "nbd", "id": _PROBE_ID, "node-name": any_node, "bitmaps": [_PROBE_BITMAP]}
        try:
            qm.transient("block-export-add", arguments)
        except QMPCommandError as exc:
            if "not running" in exc.desc:
                return False
            if _PROBE_BITMAP in exc.desc:
                return True
            return None
        # Cannot happen (the bitmap does not exist); undo it all the same.
        qm.transient("block-export-del", {"id": _PROBE_ID, "mode": "hard"})
        return True
    return None


def read_exports(qm):
    """{id: {id, node, type, shutting_down}} of every block export, or None where QEMU cannot tell."""
    if not qm.schema.has_command("query-block-exports"):
        return None
    return dict((e["id"], {"id": e["id"], "node": e.get("node-name"), "type": e.get("type"),
                           "shutting_down": e.get("shutting-down", False)})
                for e in qm.query("query-block-exports"))


def legacy_address(address):
    """A flat SocketAddress ({type, path} / {type, host, port}) as nbd-server-start's legacy form."""
    data = dict(address)
    kind = data.pop("type", None)
    if kind not in ("unix", "inet", "vsock", "fd"):
        raise ValueError("address.type must be unix, inet, vsock or fd, not %r" % (kind,))
    if "port" in data:
        data["port"] = str(data["port"])
    return {"type": kind, "data": data}


def export_uri(address, name):
    """The NBD URI of export `name` on a server at `address`, where one can be written."""
    if not address:
        return None
    if address.get("type") == "unix":
        return "nbd+unix:///%s?socket=%s" % (name, address.get("path"))
    if address.get("type") == "inet":
        host = address.get("host")
        if ":" in str(host):
            host = "[%s]" % host
        return "nbd://%s:%s/%s" % (host, address.get("port"), name)
    return None


def start_server(qm, address, tls_creds=None, max_connections=None):
    arguments = {"addr": legacy_address(address)}
    if tls_creds:
        arguments["tls-creds"] = tls_creds
    if max_connections is not None:
        arguments["max-connections"] = max_connections
    qm.change("nbd-server-start", arguments)


def add_export(qm, name, node, writable=False, bitmaps=(), description=None):
    if qm.schema.has_command("block-export-add"):
        arguments = {"type": "nbd", "id": name, "node-name": node, "name": name, "writable": writable}
        if bitmaps:
            arguments["bitmaps"] = list(bitmaps)
        if description:
            arguments["description"] = description
        qm.change("block-export-add", arguments)
        return
    arguments = {"device": node, "name": name, "writable": writable}
    if len(bitmaps) > 1:
        raise ValueError("this QEMU exports one bitmap per export")
    if bitmaps:
        arguments["bitmap"] = bitmaps[0]
    if description:
        arguments["description"] = description
    qm.change("nbd-server-add", arguments)


def remove_export(qm, name, force=False):
    """Remove an export, and wait until QEMU reports it gone."""
    if qm.schema.has_command("block-export-del"):
        qm.change("block-export-del", {"id": name, "mode": "hard" if force else "safe"})
        if not qm.check_mode:
            try:
                qm.wait_for_event("BLOCK_EXPORT_DELETED", {"id": name})
            except QMPTimeoutError:
                qm.fail("export %s did not go away within wait_timeout=%gs: QEMU is still finishing its "
                        "requests, and removes it when they are done" % (name, qm.wait_timeout))
    else:
        qm.change("nbd-server-remove", {"name": name, "mode": "hard" if force else "safe"})
