# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: backup_plan
short_description: Plan the next backup of a VM from its backup chains and QEMU's bitmaps
version_added: 0.1.0
description:
  - Used by the C(qemu.qmp.backup) role. Decides the level of the next backup (a new full chain when
    the requested or the automatic level cannot be taken safely, with the reasons as warnings), where its
    images go, which image each one is based on, and which bitmaps it uses and anchors.
  - A chain is trusted only when its manifests are complete, every image they name exists, the disks are
    the same, and the bitmap the next backup needs exists on every disk, records, and is neither busy
    nor inconsistent.
options:
  _input:
    description:
      - The manifests found under the VM's backup folder, each a dictionary with C(path) and C(content) (the
        manifest), or the results of C(ansible.builtin.slurp) on them (C(source) and base64 C(content)).
        Unreadable manifests do not count.
    type: list
    elements: dict
    required: true
  images:
    description: Paths of the image files that exist under the VM's backup folder.
    type: list
    elements: str
    required: true
  disks:
    description: The disks to back up, each with C(node), C(size) (bytes) and optionally C(device).
    type: list
    elements: dict
    required: true
  bitmaps:
    description: QEMU's bitmaps, as C(qemu.qmp.qmp_info) reports them.
    type: list
    elements: dict
    required: true
  level:
    description: V(auto), V(full), V(incremental) or V(differential).
    type: str
    required: true
  root:
    description: The VM's backup folder.
    type: str
    required: true
  chain_id:
    description: The id a new chain gets (a UTC timestamp such as V(20261122T013000Z)).
    type: str
    required: true
  prefix:
    description: Prefix of the bitmap names the backups use.
    type: str
    required: true
  keep_chains:
    description: How many chains to keep, the new one included.
    type: int
    default: 2
  mode:
    description:
      - V(push) or V(pull). A pull-mode incremental freezes the bitmap it reads and anchors a new one.
    type: str
    default: push
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Plan the next backup
  ansible.builtin.set_fact:
    plan: >-
      {{ manifests | qemu.qmp.backup_plan(images=image_paths, disks=disks, bitmaps=info.bitmaps, level='auto',
         root='/var/lib/backup/vm1', chain_id='20261122T013000Z', prefix='qemu-qmp-backup') }}
"""

RETURN = r"""
_value:
  description: The plan (level, chain, sequence, folder, manifest path, bitmap, anchors, disks with images
    and backing images, warnings, old chains to delete after success, stale bitmaps to remove).
  type: dict
"""

import base64
import binascii
import json
import os
import re

from ansible.errors import AnsibleFilterError

LEVEL_NAMES = ("full", "incremental", "differential")


BACKUP_FOLDER = re.compile(r"^[0-9]{4,}-(full|incremental|differential)$")
CHAIN_FOLDER = re.compile(r"^[0-9]{8}T[0-9]{6}Zx*$")


def _is_backup_folder(path, root):
    """Whether `path` is ROOT/CHAIN/NNNN-LEVEL, the only folders the role writes images into."""
    chain_dir, name = os.path.split(os.path.normpath(path))
    parent, chain = os.path.split(chain_dir)
    return (os.path.normpath(parent) == os.path.normpath(root) and bool(CHAIN_FOLDER.match(chain))
            and bool(BACKUP_FOLDER.match(name)))


def _manifests(entries):
    """(path, manifest) of each entry: {path, content} or an ansible.builtin.slurp result."""
    found = []
    for entry in entries or []:
        if entry.get("skipped") or entry.get("failed"):
            continue
        path = entry.get("path") or entry.get("source") or ""
        content = entry.get("content")
        if isinstance(content, str):
            try:
                content = json.loads(base64.b64decode(content).decode("utf-8"))
            except (ValueError, UnicodeDecodeError, binascii.Error):
                continue  # an unreadable manifest: its backup does not count
        if isinstance(content, dict):
            found.append((path, content))
    return found


def _by_chain(manifests):
    chains = {}
    for path, content in _manifests(manifests):
        if content.get("format") != 1:
            continue
        chain = content.get("chain")
        if chain and os.path.basename(os.path.dirname(path)) == chain:
            chains.setdefault(chain, []).append(content)
    for backups in chains.values():
        backups.sort(key=lambda m: m.get("sequence", 0))
    return chains


def _chain_problem(backups, images, disks, bitmaps, root, level):
    """Why the newest chain cannot take a `level` backup now, or None."""
    if not backups or backups[0].get("level") != "full" or backups[0].get("sequence") != 0:
        return "its full backup's manifest is missing"
    sequences = [b.get("sequence") for b in backups]
    if sequences != list(range(len(backups))):
        return "its manifests are not numbered 0 to %d" % (len(backups) - 1)
    last = backups[-1]
    wanted = sorted(d["node"] for d in disks)
    if sorted(d["node"] for d in last.get("disks", [])) != wanted:
        return "it holds other disks (%s) than this backup (%s)" % (
            ", ".join(sorted(d["node"] for d in last.get("disks", []))), ", ".join(wanted))
    sizes = dict((d["node"], d["size"]) for d in disks)
    chain_dir = os.path.join(root, backups[0]["chain"])
    for backup in backups:
        for disk in backup.get("disks", []):
            if not os.path.join(chain_dir, disk.get("image", "")) in images:
                return "its image %s is missing" % os.path.join(chain_dir, disk.get("image", ""))
    for disk in last["disks"]:
        if disk.get("virtual_size") != sizes.get(disk["node"]):
            return "disk %s changed size" % disk["node"]
    name = last.get("full_bitmap") if level == "differential" else last.get("bitmap")
    if not name:
        return "its manifest names no bitmap"
    by_key = dict(((b.get("node"), b.get("name")), b) for b in bitmaps)
    for node in wanted:
        bitmap = by_key.get((node, name))
        if bitmap is None:
            return "bitmap %s is missing on node %s (QEMU was restarted without it, or it was removed)" % (name, node)
        if bitmap.get("inconsistent"):
            return "bitmap %s on node %s is inconsistent (QEMU did not stop cleanly)" % (name, node)
        if bitmap.get("busy"):
            return "bitmap %s on node %s is busy (another job or a migration uses it)" % (name, node)
        if not bitmap.get("recording"):
            return "bitmap %s on node %s does not record writes" % (name, node)
    return None


def backup_plan(manifests, images, disks, bitmaps, level, root, chain_id, prefix, keep_chains=2, mode="push"):
    if level not in ("auto",) + LEVEL_NAMES:
        raise AnsibleFilterError("level must be auto, full, incremental or differential, not %r" % (level,))
    if not disks:
        raise AnsibleFilterError("there are no disks to back up")
    images = set(images or [])
    chains = _by_chain(manifests or [])
    newest = max(chains) if chains else None
    warnings = []
    if level == "full":
        plan_level = "full"
    elif newest is None:
        if level != "auto":
            warnings.append("no backup chain exists yet: taking a full backup instead of the %s one asked for" % level)
        plan_level = "full"
    else:
        wanted = "incremental" if level == "auto" else level
        problem = _chain_problem(chains[newest], images, disks, bitmaps, root, wanted)
        if problem:
            warnings.append("starting a new full chain instead of taking the %s backup: chain %s cannot "
                            "continue: %s" % (wanted, newest, problem))
            plan_level = "full"
        else:
            plan_level = wanted

    if plan_level == "full":
        chain = chain_id
        while chain in chains:
            chain += "x"  # two full backups within a second
        sequence, base = 0, None
        bitmap = None
        next_bitmap, full_bitmap = "%s-%s" % (prefix, chain), "%s-%s-full" % (prefix, chain)
        anchors = [next_bitmap, full_bitmap]
    else:
        chain = newest
        backups = chains[newest]
        last = backups[-1]
        sequence = last["sequence"] + 1
        base = backups[0] if plan_level == "differential" else last
        next_bitmap, full_bitmap = last["bitmap"], last["full_bitmap"]
        bitmap = full_bitmap if plan_level == "differential" else next_bitmap
        anchors = []
        if mode == "pull" and plan_level == "incremental":
            # Pull mode freezes the bitmap it reads; a new one records from that instant.
            next_bitmap = "%s-%s-%04d" % (prefix, chain, sequence)
            anchors = [next_bitmap]

    chain_dir = os.path.join(root, chain)
    name = "%04d-%s" % (sequence, plan_level)
    base_images = dict((d["node"], d["image"]) for d in base["disks"]) if base else {}
    planned = []
    for index, disk in enumerate(disks):
        image = "%s/%s.qcow2" % (name, disk["node"])
        backing = base_images.get(disk["node"])
        planned.append({
            "node": disk["node"],
            "device": disk.get("device"),
            "size": disk["size"],
            "target_node": "qmpbk%d" % index,
            "job_id": "qemu-qmp-backup-%s" % disk["node"],
            "image": image,
            "image_path": os.path.join(chain_dir, image),
            "backing": backing,
            "backing_path": os.path.join(chain_dir, backing) if backing else None,
            # Written into the image relative to it, so a chain can be moved or copied whole.
            "backing_header": os.path.join("..", backing) if backing else None,
        })

    finished = [m.get("finished") for backups in chains.values() for m in backups if m.get("finished")]
    # A backup folder with a manifest file is finished, even if the file cannot be read:
    # later backups may be based on its images.
    manifest_paths = set(entry.get("path") or entry.get("source") for entry in manifests or [])
    partial = sorted(set(os.path.dirname(i) for i in images
                         if _is_backup_folder(os.path.dirname(i), root)
                         and os.path.dirname(i) + ".json" not in manifest_paths))
    ours = [b for b in bitmaps if str(b.get("name", "")).startswith(prefix + "-")]
    keep_names = {next_bitmap, full_bitmap, bitmap}
    all_chains = sorted(set(chains) | {chain})
    return {
        "level": plan_level,
        "new_chain": plan_level == "full",
        "chain": chain,
        "sequence": sequence,
        "name": name,
        "chain_dir": chain_dir,
        "dir": os.path.join(chain_dir, name),
        "manifest_path": os.path.join(chain_dir, name + ".json"),
        "based_on": base["sequence"] if base else None,
        "bitmap": bitmap,
        "anchors": anchors,
        "next_bitmap": next_bitmap,
        "full_bitmap": full_bitmap,
        "disks": planned,
        # The disks as qemu.qmp.qmp_backup takes them.
        "job_disks": [{"node": d["node"], "target": d["target_node"], "job_id": d["job_id"]} for d in planned],
        "warnings": warnings,
        # When the newest backup of any chain finished (ISO 8601, UTC), or None.
        "last_finished": max(finished) if finished else None,
        # Image folders without a manifest: backups that did not finish.
        "partial_dirs": partial,
        # After a successful full, bitmaps of other chains only cost writes.
        "stale_bitmaps": [{"node": b["node"], "name": b["name"]} for b in ours if b["name"] not in keep_names],
        # The chain being written is always kept, whatever keep_chains says.
        "old_chains": [os.path.join(root, c) for c in all_chains[:max(0, len(all_chains) - max(1, int(keep_chains)))]],
    }


def backup_manifest(plan, vm, mode, started, finished, duration, qemu, copied, stats, checked):
    """The manifest of a finished backup (see the role's files/manifest.schema.json)."""
    copied = dict((d["node"], d) for d in copied or [])
    sizes = dict((s.get("item", {}).get("node"), s.get("stat", {}).get("size", 0)) for s in stats or [])
    disks = []
    for disk in plan["disks"]:
        result = copied.get(disk["node"], {})
        disks.append({
            "node": disk["node"],
            "device": disk.get("device"),
            "image": disk["image"],
            "backing": disk["backing"],
            "virtual_size": int(disk["size"]),
            "image_size": int(sizes.get(disk["node"]) or 0),
            "bytes_copied": int(result.get("bytes") or 0),
            "duration": result.get("duration"),
            "checked": bool(checked),
        })
    return {
        "format": 1, "vm": vm, "chain": plan["chain"], "sequence": int(plan["sequence"]), "level": plan["level"],
        "mode": mode, "based_on": plan["based_on"], "bitmap": plan["next_bitmap"], "full_bitmap": plan["full_bitmap"],
        "started": started, "finished": finished, "duration": round(float(duration), 3),
        "qemu": {"major": int(qemu["major"]), "minor": int(qemu["minor"]), "micro": int(qemu["micro"]),
                 "package": str(qemu.get("package", ""))},
        "disks": disks,
    }


def backup_disks(block_devices, block_nodes, wanted=None):
    """The disks of a VM: the nodes attached to its devices (query-block), or the named ones."""
    nodes = dict((n.get("node-name"), n) for n in block_nodes or [])
    attached = []
    for device in block_devices or []:
        inserted = device.get("inserted") or {}
        node = inserted.get("node-name")
        if node and device.get("qdev") and not device.get("removable", False):
            attached.append({"node": node, "device": device.get("qdev"),
                             "size": int(nodes.get(node, {}).get("image", {}).get("virtual-size", 0))})
    if not wanted:
        return attached
    by_node = dict((d["node"], d) for d in attached)
    disks = []
    for node in wanted:
        if node in by_node:
            disks.append(by_node[node])
        elif node in nodes:
            disks.append({"node": node, "device": None,
                          "size": int(nodes[node].get("image", {}).get("virtual-size", 0))})
        else:
            raise AnsibleFilterError("QEMU has no block node %s (its disks: %s)"
                                     % (node, ", ".join(sorted(by_node)) or "none"))
    return disks


def backup_point(manifests, root, point="latest"):
    """The manifest of one backup: `latest`, a chain id (its newest backup), or CHAIN/SEQUENCE."""
    chains = _by_chain(manifests or [])
    if not chains:
        raise AnsibleFilterError("there are no backups under %s" % root)
    point = str(point or "latest")
    if point == "latest":
        chain, sequence = max(chains), None
    elif "/" in point:
        chain, sequence = point.split("/", 1)
        try:
            sequence = int(sequence)
        except ValueError:
            raise AnsibleFilterError("restore point %s: the part after / is a backup's sequence number" % point)
    else:
        chain, sequence = point, None
    if chain not in chains:
        raise AnsibleFilterError("there is no chain %s under %s (chains: %s)" % (chain, root, ", ".join(sorted(chains))))
    backups = chains[chain]
    if sequence is None:
        return backups[-1]
    for backup in backups:
        if backup.get("sequence") == sequence:
            return backup
    raise AnsibleFilterError("chain %s has no backup %d (it has %s)"
                             % (chain, sequence, ", ".join(str(b.get("sequence")) for b in backups)))


class FilterModule:
    def filters(self):
        return {"backup_plan": backup_plan, "backup_disks": backup_disks, "backup_point": backup_point,
                "backup_manifest": backup_manifest}
