# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The QEMU command line of a VM defined for the qemu.qmp.vm role (standard library only: the
vm_command_line filter runs it on the controller, the qmp_vm_process module on the host)."""

from __future__ import annotations

import json


class VMDefinitionError(ValueError):
    """A VM definition that gives no command line; str() says what is wrong."""


# Disk buses and the device each one uses.
_DISK_DEVICES = {
    "virtio": "virtio-blk-pci",
    "scsi": "scsi-hd",
    "sata": "ide-hd",
}


def _escape(value):
    """QEMU's -opt key=value escaping: a comma is written twice."""
    return str(value).replace(",", ",,")


def _chardev(chardev_id, spec):
    kind = spec.get("type", "file")
    path = spec.get("path")
    if not path:
        raise VMDefinitionError("%s needs a path" % chardev_id)
    if kind == "file":
        return "file,id=%s,path=%s" % (chardev_id, _escape(path))
    if kind == "socket":
        return "socket,id=%s,path=%s,server=on,wait=off" % (chardev_id, _escape(path))
    raise VMDefinitionError("%s: type must be file or socket, not %s" % (chardev_id, kind))


def _disks(disks):
    args = []
    scsi = False
    for index, disk in enumerate(disks or []):
        for key in ("path", "node_name"):
            if not disk.get(key):
                raise VMDefinitionError("disk %d needs %s" % (index, key))
        node = disk["node_name"]
        bus = disk.get("bus", "virtio")
        if bus not in _DISK_DEVICES:
            raise VMDefinitionError("disk %s: bus must be one of %s, not %s"
                                    % (node, ", ".join(sorted(_DISK_DEVICES)), bus))
        file_node = {"driver": "file", "filename": disk["path"], "node-name": node + "-file"}
        if disk.get("cache_direct"):
            file_node["cache"] = {"direct": True}
        format_node = {"driver": disk.get("format", "qcow2"), "file": node + "-file", "node-name": node}
        if disk.get("read_only"):
            file_node["read-only"] = format_node["read-only"] = True
        device = {"driver": _DISK_DEVICES[bus], "drive": node, "id": disk.get("device_id") or "dev-" + node}
        if disk.get("serial"):
            device["serial"] = disk["serial"]
        if bus == "scsi":
            scsi = True
            device["bus"] = "scsi0.0"
        elif bus == "sata":
            device["bus"] = "ide.%d" % index
        args += ["-blockdev", json.dumps(file_node, sort_keys=True),
                 "-blockdev", json.dumps(format_node, sort_keys=True),
                 "-device", json.dumps(device, sort_keys=True)]
    if scsi:
        args = ["-device", json.dumps({"driver": "virtio-scsi-pci", "id": "scsi0"})] + args
    return args


def vm_command_line(vm):
    """QEMU's argument list for the VM definition `vm` (the role's variables without vm_)."""
    if not isinstance(vm, dict):
        raise VMDefinitionError("vm_command_line expects a VM definition (a dict), not %s" % type(vm).__name__)
    for key in ("name", "qmp_socket"):
        if not vm.get(key):
            raise VMDefinitionError("the VM definition needs %s" % key)
    accel = vm.get("accel") or "tcg"
    args = [vm.get("qemu_binary") or "qemu-system-x86_64",
            "-name", _escape(vm["name"]),
            "-machine", _escape(vm.get("machine") or "q35"),
            "-accel", accel,
            "-m", str(vm.get("memory", 256)),
            "-smp", str(vm.get("cpus", 1)),
            "-display", "none", "-nodefaults", "-no-user-config",
            "-qmp", "unix:%s,server=on,wait=off" % _escape(vm["qmp_socket"])]
    if vm.get("extra_qmp_socket"):
        args += ["-qmp", "unix:%s,server=on,wait=off" % _escape(vm["extra_qmp_socket"])]
    for port in range(1, int(vm.get("pcie_root_ports") or 0) + 1):
        args += ["-device", "pcie-root-port,id=rp%d,bus=pcie.0,chassis=%d" % (port, port)]
    if vm.get("kernel"):
        args += ["-kernel", vm["kernel"]]
        if vm.get("initrd"):
            args += ["-initrd", vm["initrd"]]
        if vm.get("append"):
            args += ["-append", vm["append"]]
    args += _disks(vm.get("disks"))
    if vm.get("serial"):
        args += ["-chardev", _chardev("serial0", vm["serial"]), "-serial", "chardev:serial0"]
    if vm.get("incoming"):
        args += ["-incoming", "defer"]
    if vm.get("start_paused"):
        args.append("-S")
    args += [str(a) for a in vm.get("extra_args") or []]
    return args
