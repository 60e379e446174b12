#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_device
short_description: Hot-plug or unplug a device in a running QEMU
version_added: 0.1.0
description:
  - Makes a device (a disk, a network card, a serial port, a USB device, ...) present in a running
    QEMU with C(device_add), or absent with C(device_del), waiting until QEMU reports it gone.
  - An existing device is found by its id under C(/machine/peripheral) in QEMU's object tree and
    compared on its driver, its bus, and each given property QEMU can read back (C(qom-get));
    properties QEMU cannot read are listed in RV(not_compared).
  - On a q35 machine the root bus C(pcie.0) does not take hot-plugged devices. Start QEMU with free
    PCIe root ports (C(-device pcie-root-port,id=rp1,bus=pcie.0,chassis=1)) and plug devices into
    them with O(bus=rp1), one device per port.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  id:
    description:
      - The device's id (its qdev id).
    type: str
    required: true
  driver:
    description:
      - The device's driver (QEMU's C(-device) name), for example V(virtio-blk-pci), V(virtio-net-pci),
        V(usb-storage) or V(virtserialport). Required with O(state=present).
    type: str
  bus:
    description:
      - The bus to plug the device into, by name (V(rp1) for a PCIe root port with id C(rp1),
        V(xhci.0) for a USB controller with id C(xhci)) or by QOM path. Unset, QEMU picks one.
    type: str
  properties:
    description:
      - The device's other properties, as C(device_add) takes them (for example C(drive) and C(serial)
        for a disk).
    type: dict
    default: {}
  state:
    description:
      - V(present) plugs the device in when QEMU has none with that id. An existing device with the same
        driver, bus and properties is unchanged; any difference fails, naming it, unless O(recreate) is set.
      - V(absent) asks QEMU to unplug it and waits up to O(wait_timeout) seconds for QEMU's C(DEVICE_DELETED)
        event. PCI devices need the guest's cooperation (a running guest OS that handles hot-plug);
        when the guest does not release the device in time, the module fails saying so, and QEMU keeps
        the unplug request pending (running the module again waits again).
    type: str
    choices: [present, absent]
    default: present
  recreate:
    description:
      - When an existing device differs, unplug it (waiting as for O(state=absent)) and plug it in again.
    type: bool
    default: false
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
# QEMU started with: -machine q35 -device pcie-root-port,id=rp1,bus=pcie.0,chassis=1
- name: Open a second disk image as a block node
  qemu.qmp.qmp_blockdev:
    socket: /run/qemu/vm1.qmp
    node_name: data1
    options:
      driver: qcow2
      file:
        driver: file
        filename: /var/lib/qemu/vm1-data1.qcow2
    create:
      size: 1G

- name: Hot-plug it as a virtio disk on the free root port
  qemu.qmp.qmp_device:
    socket: /run/qemu/vm1.qmp
    id: vdisk1
    driver: virtio-blk-pci
    bus: rp1
    properties:
      drive: data1
      serial: data1

- name: Unplug it again; the guest has two minutes to release it
  qemu.qmp.qmp_device:
    socket: /run/qemu/vm1.qmp
    id: vdisk1
    state: absent
    wait_timeout: 120
"""

RETURN = r"""
device:
  description:
    - The device as QEMU reports it afterwards; in check mode, as it would be. Null when absent.
  returned: always
  type: dict
  contains:
    id:
      description: Its id.
      type: str
    driver:
      description: Its driver (QOM type).
      type: str
    bus:
      description: QOM path of the bus it is plugged into.
      type: str
    path:
      description: Its QOM path.
      type: str
    properties:
      description: The values QEMU reports for the properties given in O(properties).
      type: dict
  sample: {"id": "vdisk1", "driver": "virtio-blk-pci", "bus": "/machine/peripheral/rp1/rp1",
           "path": "/machine/peripheral/vdisk1", "properties": {"drive": "data1", "serial": "data1"}}
waited:
  description: Seconds spent waiting for QEMU to report the device gone.
  returned: when the module unplugged a device
  type: float
not_compared:
  description: Properties given that QEMU cannot read back, so they could not be compared with an existing device.
  returned: when the device already existed
  type: list
  elements: str
differences:
  description: Each difference from the wanted device, with the wanted value and QEMU's.
  returned: when an existing device differs
  type: dict
  sample: {"driver": {"wanted": "virtio-blk-pci", "qemu": "virtio-scsi-pci"}}
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "device_del", "arguments": {"id": "vdisk1"}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "Bus 'pcie.0' does not support hotplugging"}
"""

import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError, QMPTimeoutError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_devices import compare_device, read_device
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule


def summary(device):
    if device is None:
        return {"state": "absent"}
    return {"state": "present", "driver": device["driver"], "bus": device.get("bus"),
            "properties": device.get("properties", {})}


def unplug(qm, device_id):
    """device_del, then wait for DEVICE_DELETED; returns the seconds waited."""
    try:
        qm.change("device_del", {"id": device_id})
    except QMPCommandError as exc:
        if "already in the process of unplug" not in exc.desc:
            raise
        # An earlier request is still pending: wait for it again.
    if qm.check_mode:
        return None
    start = time.monotonic()
    try:
        qm.wait_for_event("DEVICE_DELETED", {"device": device_id})
    except QMPTimeoutError:
        qm.fail("the guest did not release device %s within wait_timeout=%gs: unplugging a PCI device needs "
                "the guest's cooperation (a running guest OS that handles hot-plug). QEMU keeps the request "
                "pending; run this again to wait longer" % (device_id, qm.wait_timeout),
                waited=round(time.monotonic() - start, 3))
    return round(time.monotonic() - start, 3)


def ensure_present(qm, device_id, before, result):
    params = qm.params
    if not params["driver"]:
        qm.fail("driver is required to plug in device %s" % device_id)
    properties = params["properties"]
    if before is not None:
        differences, not_compared = compare_device(params["driver"], params["bus"], properties, before)
        if not qm.needs_recreate("device %s" % device_id, differences, not_compared, result,
                                 "unplug it and plug it in again"):
            return before
        result["waited"] = unplug(qm, device_id)
    arguments = {"driver": params["driver"], "id": device_id}
    if params["bus"]:
        arguments["bus"] = params["bus"]
    for name, value in properties.items():
        if name in arguments:
            qm.fail("properties.%s is set by the module's own option %s" % (name, name))
        arguments[name] = value
    qm.change("device_add", arguments)
    if qm.check_mode:
        return {"id": device_id, "driver": params["driver"], "bus": params["bus"],
                "path": "/machine/peripheral/" + device_id, "properties": dict(properties)}
    return read_device(qm.query, device_id, properties)


def main():
    qm = QMPModule(
        argument_spec=dict(
            id=dict(type="str", required=True),
            driver=dict(type="str"),
            bus=dict(type="str"),
            properties=dict(type="dict", default={}),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            recreate=dict(type="bool", default=False),
        ),
    )
    device_id = qm.params["id"]
    result = {}
    with qm.connected():
        before = read_device(qm.query, device_id, qm.params["properties"])
        if qm.params["state"] == "present":
            after = ensure_present(qm, device_id, before, result)
        else:
            after = None
            if before is not None:
                result["waited"] = unplug(qm, device_id)
    if result.get("waited") is None:
        result.pop("waited", None)
    qm.exit(device=after, before=summary(before), after=summary(after), **result)


if __name__ == "__main__":
    main()
