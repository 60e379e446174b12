# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The VMs of one hypervisor, for the qmp_host_info module: what the qemu.qmp.vm role started there
(its NAME.json files in the run folders), the other QMP sockets found in given folders, what answers on
each socket, and each VM's last backup.

Everything here only reads. Each QMP socket is asked once, in a thread of its own (a host may hold
hundreds of VMs), and its connection is closed as soon as the queries are answered: QEMU serves one QMP
client per socket, and a connection left open makes the VM busy for everyone else. One VM that cannot be
asked, or whose files cannot be read, is reported as such; it never stops the listing.
Standard library only.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import stat
import struct

from ansible_collections.qemu.qmp.plugins.module_utils.backup_catalog import BackupChainError, Catalog
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient, QMPConnectError, QMPError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import normalise_bitmap
from ansible_collections.qemu.qmp.plugins.module_utils.vm_process import process_gone, process_started

DEFAULT_RUN_DIRS = ("/run/qemu-qmp",)
DEFAULT_BACKUP_DIR = "/var/lib/qemu-qmp/backups"
DEFAULT_TIMEOUT = 2.0
MAX_WORKERS = 32
# A NAME.json larger than this is not one the vm role wrote.
MAX_DEFINITION_FILE = 4 * 1024 * 1024

# Block drivers that only filter the node below them: a disk's format node is under them.
FILTER_DRIVERS = frozenset(["throttle", "copy-on-read", "copy-before-write", "preallocate", "compress",
                            "blkdebug", "blklogwrites", "blkverify", "snapshot-access"])
# States this module gives a VM that does not answer; QEMU's own run states never take these names.
NOT_ANSWERING = ("busy", "dead", "error")
_PERIPHERAL = re.compile(r"^/machine/peripheral/([^/]+)(/|$)")


# -- files of the vm role ----------------------------------------------------------------

def vm_from_definition_file(path, data):
    """The VM a NAME.json of the vm role describes, or None when `data` (its text) is not one.

    A file the role wrote is a JSON object with a `definition` object and a `command_line` list. The
    VM's name and instance come from the definition; where it lacks them, from the file name
    (NAME + INSTANCE + .json). Returns {name, instance, qmp_socket, extra_qmp_socket, run_dir,
    definition_file, pid, started, definition}; `pid` and `started` are what the role saved, unchecked.
    """
    try:
        saved = json.loads(data)
    except ValueError:
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("definition"), dict) \
            or not isinstance(saved.get("command_line"), list):
        return None
    definition = saved["definition"]
    run_dir, filename = os.path.split(path)
    stem = filename[:-len(".json")] if filename.endswith(".json") else filename
    name, instance = split_stem(stem, definition.get("name"), definition.get("instance"))
    qmp_socket = definition.get("qmp_socket")
    if not isinstance(qmp_socket, str) or not qmp_socket:
        qmp_socket = os.path.join(run_dir, stem + ".qmp")
    extra = definition.get("extra_qmp_socket")
    pid = saved.get("pid")
    return {
        "name": name,
        "instance": instance,
        "qmp_socket": qmp_socket,
        "extra_qmp_socket": extra if isinstance(extra, str) else "",
        "run_dir": run_dir,
        "definition_file": path,
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
        "started": str(saved["started"]) if saved.get("started") not in (None, "") else None,
        "definition": definition,
    }


def split_stem(stem, name=None, instance=None):
    """(name, instance) of the VM whose files are named `stem` (NAME + INSTANCE).

    The file name decides the instance: the adopt step renames NAME.incoming.json to NAME.json, and may
    leave the instance in the definition as it was.
    """
    name = name if isinstance(name, str) and name else None
    instance = instance if isinstance(instance, str) else ""
    if name is not None:
        if stem.startswith(name):
            return name, stem[len(name):]
        return name, instance
    if instance and stem.endswith(instance) and len(stem) > len(instance):
        return stem[:-len(instance)], instance
    return stem, ""


def read_pidfile(path):
    try:
        with open(path, "rb") as handle:
            text = handle.read(64).decode("utf-8", "replace").strip()
    except OSError:
        return None
    return int(text) if re.match(r"^[0-9]{1,9}$", text) and int(text) > 0 else None


def live_pid(pid, started):
    """`pid` when that process still runs (and, when `started` is known, started then), else None."""
    if not pid or process_gone(pid):
        return None
    if started is not None and process_started(pid) != started:
        return None  # the pid was reused by another process
    return pid


def list_folder(path, suffix, what, warnings, want_socket=False):
    """Sorted paths of the entries of folder `path` whose names end in `suffix` (regular files, or
    sockets with want_socket). A missing folder holds nothing; one that is not a folder or cannot be
    read gives a warning."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        warnings.append("%s %s is not a folder: it is skipped" % (what, path))
        return []
    except OSError as exc:
        warnings.append("%s %s cannot be read: %s" % (what, path, exc.strerror or exc))
        return []
    found = []
    for name in sorted(names):
        if not name.endswith(suffix):
            continue
        full = os.path.join(path, name)
        try:
            mode = os.stat(full).st_mode
        except OSError:
            continue  # gone meanwhile, or a dangling link
        if (stat.S_ISSOCK(mode) if want_socket else stat.S_ISREG(mode)):
            found.append(full)
    return found


def unique_folders(folders):
    seen, unique = set(), []
    for folder in folders:
        key = os.path.realpath(folder)
        if key not in seen:
            seen.add(key)
            unique.append(folder)
    return unique


def managed_vms(run_dirs, warnings):
    """The VMs the vm role started, from the NAME.json files in `run_dirs` (see vm_from_definition_file)."""
    vms = []
    for run_dir in unique_folders(run_dirs):
        for path in list_folder(run_dir, ".json", "run_dirs folder", warnings):
            try:
                with open(path, "rb") as handle:
                    data = handle.read(MAX_DEFINITION_FILE + 1)
            except OSError as exc:
                warnings.append("%s cannot be read: %s" % (path, exc.strerror or exc))
                continue
            if len(data) > MAX_DEFINITION_FILE:
                continue
            vm = vm_from_definition_file(path, data.decode("utf-8", "replace"))
            if vm is None:
                continue
            if vm["pid"] is None:
                vm["pid"] = read_pidfile(os.path.join(vm["run_dir"], vm["name"] + vm["instance"] + ".pid"))
            vm["pid"] = live_pid(vm["pid"], vm["started"])
            vms.append(vm)
    return vms


def socket_name(path):
    """The name of an unmanaged QMP socket's VM when QEMU does not say: its file name without .qmp."""
    base = os.path.basename(path)
    return base[:-len(".qmp")] if base.endswith(".qmp") and len(base) > len(".qmp") else base


def same_path(path):
    return os.path.realpath(path) if path else ""


def unmanaged_sockets(socket_dirs, known, warnings):
    """The *.qmp sockets directly in `socket_dirs` that are not in `known` (real paths)."""
    found = []
    for folder in unique_folders(socket_dirs):
        for path in list_folder(folder, ".qmp", "socket_dirs folder", warnings, want_socket=True):
            if same_path(path) not in known:
                known.add(same_path(path))
                found.append(path)
    return found


# -- asking QEMU ------------------------------------------------------------------------------

class _ProbeClient(QMPClient):
    """A QMP client that notes the pid of the process listening on the socket (SO_PEERCRED) as soon as
    the connection is made, so that it is known even when no greeting follows."""

    server_pid = None

    def _open_socket(self):
        sock = super()._open_socket()
        try:
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            self.server_pid = pid or None
        except OSError:
            pass
        return sock


def not_answering(exc, path, timeout):
    """(state, state_msg) for a socket whose connection failed with `exc`."""
    reason = getattr(exc, "reason", None) if isinstance(exc, QMPConnectError) else None
    if reason == "busy":
        return "busy", ("%s accepts connections but sends no QMP greeting within %g s: another client holds it"
                        % (path, timeout))
    if reason == "missing":
        return "dead", "%s does not exist: no QEMU runs there" % path
    if reason == "refused":
        return "dead", "%s refuses connections: no QEMU listens there (it exited)" % path
    if reason == "not_socket":
        return "error", "%s is not a socket" % path
    if reason == "permission":
        return "error", "%s cannot be opened: permission denied" % path
    return "error", str(exc) or exc.__class__.__name__


def backend_name(device):
    """The name of a query-block entry: its BlockBackend's name, else its device's qdev id (or path)."""
    if device.get("device"):
        return device["device"]
    qdev = device.get("qdev") or ""
    found = _PERIPHERAL.match(qdev)
    return found.group(1) if found else qdev


def needs_named_nodes(block):
    """Whether a disk's top node is a filter, so the format node below must be found among the named nodes."""
    return any((d.get("inserted") or {}).get("drv") in FILTER_DRIVERS for d in block)


def format_node(inserted, nodes):
    """The format node of a disk: its top node, or, below filters, the named node with the image's
    format and file name (None when it cannot be found)."""
    if inserted.get("drv") not in FILTER_DRIVERS:
        return inserted
    image = inserted.get("image") or {}
    while image.get("format") in FILTER_DRIVERS and isinstance(image.get("backing-image"), dict):
        image = image["backing-image"]
    for node in nodes or ():
        if node.get("drv") in FILTER_DRIVERS or node.get("drv") != image.get("format"):
            continue
        if (node.get("image") or {}).get("filename", node.get("file")) == image.get("filename"):
            return node
    return None


def disks_from(block, nodes=None):
    """The disks of a query-block answer (`nodes`: query-named-block-nodes, needed below filters), each
    {device, node_name, file, format, virtual_size, bitmaps}; drives without a medium are left out."""
    disks = []
    for device in block:
        inserted = device.get("inserted")
        if not inserted:
            continue
        node = format_node(inserted, nodes) or inserted
        image = node.get("image") or {}
        bitmaps = []
        for info in node.get("dirty-bitmaps") or []:
            if info.get("name"):  # a job's own bitmaps have none
                bitmap = normalise_bitmap(node.get("node-name"), info)
                del bitmap["node"]
                bitmaps.append(bitmap)
        disks.append({
            "device": backend_name(device),
            "node_name": node.get("node-name"),
            "file": node.get("file"),
            "format": node.get("drv") or image.get("format"),
            "virtual_size": image.get("virtual-size"),
            "bitmaps": sorted(bitmaps, key=lambda b: b["name"]),
        })
    return disks


def jobs_from(jobs):
    return [{"id": job.get("id"), "type": job.get("type"), "status": job.get("status")} for job in jobs]


def version_of(greeting):
    """("7.2.0", package) from a QMP greeting."""
    version = (greeting or {}).get("version") or {}
    qemu = version.get("qemu") or {}
    numbers = [qemu.get(key) for key in ("major", "minor", "micro")]
    text = ".".join(str(n) for n in numbers) if all(isinstance(n, int) for n in numbers) else None
    package = version.get("package")
    return text, package.strip() if isinstance(package, str) else None


def ask_qemu(path, timeout):
    """What the QEMU on QMP socket `path` says: {state, state_msg, qemu_version, qemu_package, name,
    server_pid, disks, jobs, commands}. `commands` are the (command, arguments) sent. Never raises for a
    socket that does not answer; the connection is closed before it returns."""
    seen = {"state": "error", "state_msg": "", "qemu_version": None, "qemu_package": None, "name": None,
            "server_pid": None, "disks": None, "jobs": None, "commands": []}
    client = _ProbeClient(socket_path=path, timeout=timeout)

    def query(command, arguments=None):
        seen["commands"].append((command, arguments))
        return client.execute(command, arguments)

    try:
        try:
            client.connect()
        except QMPError as exc:
            seen["state"], seen["state_msg"] = not_answering(exc, path, timeout)
            return seen
        finally:
            seen["server_pid"] = client.server_pid
        seen["qemu_version"], seen["qemu_package"] = version_of(client.greeting)
        try:
            status = query("query-status").get("status")
        except QMPError as exc:
            seen["state_msg"] = "QEMU greets on %s but does not answer query-status: %s" % (path, exc)
            return seen
        seen["state"] = status if isinstance(status, str) and status not in NOT_ANSWERING else "error"
        problems = []
        for step in ("name", "disks", "jobs"):
            try:
                if step == "name":
                    seen["name"] = query("query-name").get("name")
                elif step == "disks":
                    block = query("query-block")
                    nodes = query("query-named-block-nodes", {"flat": True}) if needs_named_nodes(block) else None
                    seen["disks"] = disks_from(block, nodes)
                else:
                    seen["jobs"] = jobs_from(query("query-jobs"))
            except QMPError as exc:
                problems.append("%s: %s" % (step, exc))
                if not client.connected:
                    break
        seen["state_msg"] = "; ".join(problems)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        seen["state"], seen["state_msg"] = "error", "%s: %s" % (path, exc)
    finally:
        client.close()
    return seen


# -- backups -----------------------------------------------------------------------------------

def backup_summary(backup_dir, name):
    """{last_backup, backups, backup_msg} of VM `name` from backup_dir/NAME, read without a lock.

    A folder that cannot be read (or a backup run changing it meanwhile) leaves backup_msg saying why."""
    out = {"last_backup": None, "backups": 0, "backup_msg": ""}
    if not backup_dir:
        return out
    try:
        return _read_backups(os.path.join(backup_dir, name), out)
    except Exception as exc:  # pylint: disable=broad-except
        # What the VM's backups are is a detail of its listing: it never turns the VM into an error.
        return {"last_backup": None, "backups": 0, "backup_msg": str(exc) or exc.__class__.__name__}


def _read_backups(root, out):
    catalog = Catalog(root)
    usable = 0
    for backup in catalog.committed():
        if backup.chain.damage is not None:
            continue
        try:
            catalog.lineage(backup)
        except BackupChainError:
            continue
        usable += 1
    out["backups"] = usable
    newest = catalog.newest_committed()
    if newest is not None:
        out["last_backup"] = {"label": newest.label, "chain": newest.chain.id, "level": newest.level,
                              "finished": newest.manifest.get("finished"), "dir": newest.dir}
    if catalog.problems:
        out["backup_msg"] = "; ".join(catalog.problems)
    return out


# -- the listing ---------------------------------------------------------------------------------

def _entry(vm, seen, managed):
    entry = {
        "name": vm["name"],
        "instance": vm.get("instance", ""),
        "qmp_socket": vm["qmp_socket"],
        "extra_qmp_socket": vm.get("extra_qmp_socket") or "",
        "run_dir": vm.get("run_dir") or os.path.dirname(vm["qmp_socket"]),
        "definition_file": vm.get("definition_file") or "",
        "managed": managed,
        "pid": vm.get("pid") if managed else seen["server_pid"],
        "state": seen["state"],
        "state_msg": seen["state_msg"],
        "qemu_version": seen["qemu_version"],
        "qemu_package": seen["qemu_package"],
        "disks": seen["disks"],
        "jobs": seen["jobs"],
        "definition": vm.get("definition") if managed else None,
    }
    if managed and seen["name"] and seen["name"] != vm["name"]:
        note = "the QEMU answering on %s is named %s, not %s" % (vm["qmp_socket"], seen["name"], vm["name"])
        entry["state_msg"] = "; ".join(m for m in (entry["state_msg"], note) if m)
    return entry


def _inspect(vm, timeout, backup_dir):
    seen = ask_qemu(vm["qmp_socket"], timeout)
    if vm.get("managed") is False:
        vm["name"] = seen["name"] or socket_name(vm["qmp_socket"])
    entry = _entry(vm, seen, vm.get("managed", True))
    entry.update(backup_summary(backup_dir, entry["name"]) if _plain_name(entry["name"])
                 else {"last_backup": None, "backups": 0,
                       "backup_msg": "the name %r cannot name a backup folder" % entry["name"]})
    return entry, seen["commands"], seen["server_pid"]


def _plain_name(name):
    return bool(name) and "/" not in name and "\x00" not in name and name not in (".", "..")


def count_commands(per_socket):
    """Each distinct command sent, in the order first sent, with `repeated` when sent to more than one socket."""
    counted = []
    for commands in per_socket:
        for command, arguments in commands:
            entry = {"execute": command}
            if arguments:
                entry["arguments"] = arguments
            for known in counted:
                if known["entry"] == entry:
                    known["count"] += 1
                    break
            else:
                counted.append({"entry": entry, "count": 1})
    return [dict(c["entry"], repeated=c["count"]) if c["count"] > 1 else c["entry"] for c in counted]


def host_inventory(run_dirs=DEFAULT_RUN_DIRS, socket_dirs=(), backup_dir=DEFAULT_BACKUP_DIR,
                   timeout=DEFAULT_TIMEOUT, max_workers=MAX_WORKERS):
    """{vms, warnings, qmp_commands}: every VM of this host, sorted by name and instance (see the
    qmp_host_info module for the keys of each)."""
    warnings = []
    vms = managed_vms(run_dirs, warnings)
    for vm in vms:
        vm["managed"] = True
    known = set()
    for vm in vms:
        known.update(same_path(p) for p in (vm["qmp_socket"], vm["extra_qmp_socket"]) if p)
    for path in unmanaged_sockets(socket_dirs, known, warnings):
        vms.append({"name": None, "instance": "", "qmp_socket": path, "extra_qmp_socket": "",
                    "run_dir": os.path.dirname(path), "definition_file": "", "pid": None, "definition": None,
                    "managed": False})
    results = []
    if vms:
        workers = max(1, min(int(max_workers), len(vms)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_inspect, vm, timeout, backup_dir) for vm in vms]
            for vm, future in zip(vms, futures):
                try:
                    results.append(future.result())
                except Exception as exc:  # pylint: disable=broad-except
                    # One VM never fails the listing: it is shown with what went wrong.
                    seen = {"state": "error", "state_msg": "%s: %s" % (vm["qmp_socket"], exc), "qemu_version": None,
                            "qemu_package": None, "name": None, "server_pid": None, "disks": None, "jobs": None}
                    if vm.get("managed") is False:
                        vm["name"] = socket_name(vm["qmp_socket"])
                    entry = _entry(vm, seen, vm.get("managed", True))
                    entry.update(last_backup=None, backups=0, backup_msg="")
                    results.append((entry, [], None))
    # A socket of its own that a managed VM's QEMU also listens on is that VM, not another one.
    managed_pids = set(entry["pid"] for entry, dummy, dummy in results if entry["managed"] and entry["pid"])
    listed = [entry for entry, dummy, server_pid in results
              if entry["managed"] or not (server_pid and server_pid in managed_pids)]
    listed.sort(key=lambda e: (e["name"], e["instance"], e["qmp_socket"]))
    return {"vms": listed, "warnings": warnings, "qmp_commands": count_commands(c for dummy, c, dummy in results)}
