# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Character devices and devices: what QEMU reports of them, and comparing a
request with it. QEMU reports little back, so each comparison says what it
could not check."""

from __future__ import annotations

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError

PERIPHERALS = "/machine/peripheral"
CHARDEVS = "/chardevs"
# Backend types QEMU knows under another name.
_BACKEND_ALIASES = {"memory": "ringbuf"}


def qom_children(query, path):
    """{name: type} of the QOM children of `path` ("child<TYPE>" properties)."""
    children = {}
    for prop in query("qom-list", {"path": path}):
        kind = prop.get("type", "")
        if kind.startswith("child<") and kind.endswith(">"):
            children[prop["name"]] = kind[len("child<"):-1]
    return children


# -- character devices --------------------------------------------------------

def read_chardev(query, chardev_id):
    """The chardev as QEMU reports it, or None.

    {id, type, filename, frontend_open, pty (for pty), address and server (for sockets)}
    """
    reported = dict((c["label"], c) for c in query("query-chardev"))
    if chardev_id not in reported:
        return None
    info = reported[chardev_id]
    filename = info.get("filename", "")
    chardev = {"id": chardev_id, "filename": filename, "frontend_open": info.get("frontend-open")}
    qom_type = qom_children(query, CHARDEVS).get(chardev_id, "")
    chardev["type"] = qom_type[len("chardev-"):] if qom_type.startswith("chardev-") else filename.split(":")[0]
    if chardev["type"] == "pty" and filename.startswith("pty:"):
        chardev["pty"] = filename[len("pty:"):]
    if chardev["type"] == "socket":
        try:
            chardev["address"] = query("qom-get", {"path": "%s/%s" % (CHARDEVS, chardev_id), "property": "addr"})
        except QMPCommandError:
            chardev["address"] = None
        chardev["server"] = ",server=on" in filename.split(" <-> ")[0]
    return chardev


def _flat_address(legacy):
    """SocketAddressLegacy ({type, data: {...}}) as the flat SocketAddress QEMU reports."""
    if not isinstance(legacy, dict):
        return {}
    flat = {"type": legacy.get("type")}
    flat.update(legacy.get("data") or {})
    return flat


def compare_chardev(backend, chardev):
    """(differences, not_compared) between a wanted ChardevBackend and QEMU's report."""
    differences, not_compared = {}, []
    wanted_type = _BACKEND_ALIASES.get(backend.get("type"), backend.get("type"))
    if wanted_type != chardev["type"]:
        differences["type"] = {"wanted": backend.get("type"), "qemu": chardev["type"]}
        return differences, not_compared
    data = backend.get("data") or {}
    if wanted_type == "socket":
        wanted = _flat_address(data.get("addr"))
        reported = chardev.get("address") or {}
        for key in sorted(wanted):
            if key == "port" and str(wanted[key]) == "0":
                continue  # any free port
            if key in ("type", "path", "host", "port", "cid"):
                if str(wanted[key]) != str(reported.get(key)):
                    differences["addr." + key] = {"wanted": wanted[key], "qemu": reported.get(key)}
            else:
                not_compared.append("addr." + key)
        if data.get("server", True) != chardev.get("server"):
            differences["server"] = {"wanted": data.get("server", True), "qemu": chardev.get("server")}
        not_compared.extend(sorted(k for k in data if k not in ("addr", "server")))
    else:
        not_compared.extend(sorted(data))
    return differences, not_compared


# -- devices --------------------------------------------------------------------

def read_device(query, device_id, properties=()):
    """The device with qdev id `device_id` under /machine/peripheral, or None.

    {id, driver, bus, properties: {name: value}} with the values QEMU reports
    for the named properties (those it cannot read are left out).
    """
    driver = qom_children(query, PERIPHERALS).get(device_id)
    if driver is None:
        return None
    path = "%s/%s" % (PERIPHERALS, device_id)
    device = {"id": device_id, "driver": driver, "path": path, "properties": {}}
    try:
        device["bus"] = query("qom-get", {"path": path, "property": "parent_bus"})
    except QMPCommandError:
        device["bus"] = None
    for name in properties:
        try:
            device["properties"][name] = query("qom-get", {"path": path, "property": name})
        except QMPCommandError:
            pass
    return device


def _same_value(wanted, reported):
    if isinstance(reported, bool):
        if isinstance(wanted, str):
            return wanted.lower() in ("on", "true", "yes", "1") if reported else \
                wanted.lower() in ("off", "false", "no", "0")
        return bool(wanted) == reported
    if isinstance(reported, int) and isinstance(wanted, str):
        try:
            return int(wanted, 0) == reported
        except ValueError:
            return False
    if isinstance(reported, str) and not isinstance(wanted, str):
        return str(wanted) == reported
    return wanted == reported


def bus_matches(wanted, reported):
    """A bus given by name (rp1, xhci.0) or by QOM path, against the path QEMU reports."""
    if not reported:
        return False
    return wanted == reported or reported.rstrip("/").rsplit("/", 1)[-1] == wanted


def compare_device(driver, bus, properties, device):
    """(differences, not_compared) between the wanted device and QEMU's report."""
    differences, not_compared = {}, []
    if driver != device["driver"]:
        differences["driver"] = {"wanted": driver, "qemu": device["driver"]}
    if bus is not None and not bus_matches(bus, device.get("bus")):
        differences["bus"] = {"wanted": bus, "qemu": device.get("bus")}
    for name, wanted in sorted(properties.items()):
        if name not in device["properties"]:
            not_compared.append(name)
        elif not _same_value(wanted, device["properties"][name]):
            differences[name] = {"wanted": wanted, "qemu": device["properties"][name]}
    return differences, not_compared
