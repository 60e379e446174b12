# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backups of one VM on disk: its chains, what can be trusted, and the plan of the next backup.

The layout of a VM's backup folder (ROOT):

    ROOT/.lock                          one backup at a time (flock)
    ROOT/.journal.json                  what an unfinished run started outside its folder
    ROOT/CHAIN/NNNN-LEVEL/DISK.qcow2    the images of one backup
    ROOT/CHAIN/NNNN-LEVEL/.unfinished   present while the backup is being written
    ROOT/CHAIN/NNNN-LEVEL.json          its manifest, written last: the commit record
    ROOT/CHAIN/.damaged                 what a verify or a restore found wrong in the chain

A backup is committed when its manifest is in place. A folder with the
`.unfinished` marker and no manifest is a backup that never committed; it
may be removed, but only while no later backup of its chain exists. A
folder with neither is a committed backup whose manifest was lost: it is
kept, since later backups may be backed by its images, and its chain does
not go on.

Chains are ordered by the generation their manifests record (a counter of
the VM's backups), not by their names or times: clocks go back.
"""

from __future__ import annotations

import errno
import json
import os
import re

from ansible_collections.qemu.qmp.plugins.module_utils.backup_manifest import manifest_errors
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPError

LEVELS = ("full", "incremental", "differential")
CHAIN_FOLDER = re.compile(r"^[0-9]{8}T[0-9]{6}Zx*$")
BACKUP_FOLDER = re.compile(r"^([0-9]{4,})-(full|incremental|differential)$")
MANIFEST_FILE = re.compile(r"^([0-9]{4,})-(full|incremental|differential)\.json$")
UNFINISHED = ".unfinished"
LOCK_FILE = ".lock"
JOURNAL_FILE = ".journal.json"
# The mode of the files a run writes: manifests, the lock, damage records, and restored images.
FILE_MODE = 0o640
# Written into a chain's folder when a verify or a restore found damage in it: backups do not build on it.
DAMAGE_FILE = ".damaged"
# Temporary manifests: written, synced, then renamed into place.
MANIFEST_TEMP = re.compile(r"^\.[0-9]{4,}-(full|incremental|differential)\.json\..+\.tmp$")

# Names of what a backup creates in QEMU, so a later run can find what an interrupted one left.
JOB_PREFIX = "qemu-qmp-backup-"
NODE_PATTERN = re.compile(r"^qmpbk[0-9]+$")
PULL_SUFFIX = ".pull"


class BackupChainError(QMPError):
    """A backup, restore or verify that cannot go on; `details` go into the failed result."""

    def __init__(self, message, **details):
        super().__init__(message)
        self.details = details


def since_bitmap(prefix, chain, sequence):
    """The bitmap that records what changes after backup `sequence` of `chain`."""
    return "%s-%s-%04d" % (prefix, chain, sequence)


def full_bitmap(prefix, chain):
    """The bitmap that records what changes after the chain's full backup."""
    return "%s-%s-full" % (prefix, chain)


class Backup:
    """One backup folder and its manifest, as found on disk."""

    def __init__(self, chain, sequence, level):
        self.chain = chain
        self.sequence = sequence
        self.level = level
        self.name = "%04d-%s" % (sequence, level)
        self.dir = os.path.join(chain.dir, self.name)
        self.manifest_path = self.dir + ".json"
        self.has_dir = False
        self.has_manifest_file = False
        self.unfinished = False
        self.manifest = None
        # Why the manifest cannot be trusted, or None.
        self.problem = None

    @property
    def committed(self):
        return self.manifest is not None

    @property
    def label(self):
        return "%s/%s" % (self.chain.id, self.name)

    def read(self):
        """Read and check the manifest, if there is one."""
        if not self.has_manifest_file:
            return
        try:
            with open(self.manifest_path, encoding="utf-8") as handle:
                manifest = json.load(handle)
        except ValueError as exc:
            self.problem = "manifest %s is not valid JSON (truncated or damaged?): %s" % (self.manifest_path, exc)
            return
        except OSError as exc:
            self.problem = "manifest %s cannot be read: %s" % (self.manifest_path, exc.strerror or exc)
            return
        errors = manifest_errors(manifest)
        if not errors:
            errors = self._consistency(manifest)
        if errors:
            self.problem = "manifest %s is not a valid manifest: %s" % (self.manifest_path, "; ".join(errors[:5]))
            return
        self.manifest = manifest

    def _consistency(self, manifest):
        errors = []
        for key, want in (("chain", self.chain.id), ("sequence", self.sequence), ("level", self.level)):
            if manifest.get(key) != want:
                errors.append("its %s is %r, its file name says %r" % (key, manifest.get(key), want))
        for disk in manifest.get("disks", []):
            image = disk.get("image", "")
            if not isinstance(image, str) or not image.startswith(self.name + "/") or ".." in image:
                errors.append("image %r is not in the backup's own folder" % (image,))
            backing = disk.get("backing")
            if backing is not None and (not isinstance(backing, str) or ".." in backing or "/" not in backing
                                        or backing.startswith("/")):
                errors.append("backing %r is not an image of the chain" % (backing,))
        return errors

    def images(self):
        """{node: absolute image path} of a committed backup."""
        return dict((d["node"], os.path.join(self.chain.dir, d["image"])) for d in self.manifest["disks"])

    def disk(self, node):
        for disk in self.manifest["disks"]:
            if disk["node"] == node:
                return disk
        return None


def holds_whole_disk(backup):
    """A full backup, or a point a prune folded its full backup into: its images have no backing file."""
    return backup.manifest.get("based_on") is None and (
        backup.level == "full" or any(f.get("level") == "full" for f in backup.manifest.get("folded", [])))


class Chain:
    def __init__(self, root, chain_id):
        self.id = chain_id
        self.dir = os.path.join(root, chain_id)
        self.by_name = {}
        self.damage = None  # what a verify or a restore recorded as damaged, or None

    @property
    def backups(self):
        return sorted(self.by_name.values(), key=lambda b: (b.sequence, b.name))

    def backup(self, sequence):
        for backup in self.backups:
            if backup.sequence == sequence:
                return backup
        return None

    @property
    def generation(self):
        """When the chain began among the VM's backups (0 for manifests that do not say)."""
        found = [b.manifest.get("generation", 0) for b in self.backups if b.committed]
        return min(found) if found else 0

    def order_key(self):
        committed = [b for b in self.backups if b.committed]
        started = committed[0].manifest.get("started", "") if committed else ""
        return (self.generation, started, self.id)

    def newest(self):
        """The newest backup folder of the chain that is not an unfinished one, or None."""
        for backup in reversed(self.backups):
            if not backup.unfinished or backup.has_manifest_file:
                return backup
        return None


class Catalog:
    """Everything under one VM's backup folder."""

    def __init__(self, root):
        self.root = root
        self.chains = {}
        self.problems = []  # folders or files that could not be read
        self.temp_files = []
        self.scan()

    def scan(self):
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise BackupChainError("cannot read the backup folder %s: %s" % (self.root, exc.strerror or exc))
        for name in names:
            path = os.path.join(self.root, name)
            if CHAIN_FOLDER.fullmatch(name) and os.path.isdir(path):
                self._scan_chain(name, path)

    def _scan_chain(self, chain_id, path):
        chain = Chain(self.root, chain_id)
        try:
            names = os.listdir(path)
        except OSError as exc:
            self.problems.append("cannot read chain folder %s: %s" % (path, exc.strerror or exc))
            return
        for name in names:
            folder, manifest = BACKUP_FOLDER.fullmatch(name), MANIFEST_FILE.fullmatch(name)
            match = folder or manifest
            if MANIFEST_TEMP.fullmatch(name):
                self.temp_files.append(os.path.join(path, name))
            if not match:
                continue
            key = "%s-%s" % match.groups()
            backup = chain.by_name.get(key)
            if backup is None:
                backup = chain.by_name[key] = Backup(chain, int(match.group(1)), match.group(2))
            if folder and os.path.isdir(os.path.join(path, name)):
                backup.has_dir = True
                backup.unfinished = os.path.exists(os.path.join(path, name, UNFINISHED))
            elif manifest:
                backup.has_manifest_file = True
        for backup in chain.by_name.values():
            backup.read()
        if DAMAGE_FILE in names:
            try:
                with open(os.path.join(path, DAMAGE_FILE), encoding="utf-8") as handle:
                    chain.damage = json.load(handle)
            except (OSError, ValueError) as exc:
                chain.damage = {"problems": ["%s cannot be read: %s" % (os.path.join(path, DAMAGE_FILE), exc)]}
            if not isinstance(chain.damage, dict):
                chain.damage = {"problems": ["%s is not a JSON object" % os.path.join(path, DAMAGE_FILE)]}
        self.chains[chain_id] = chain

    # -- views ---------------------------------------------------------------

    def ordered(self):
        """Chains with a committed backup, oldest first: the order of the others is unknown (their
        manifests say when they were taken), so they are never taken for the newest, nor deleted."""
        return sorted((c for c in self.chains.values() if any(b.committed for b in c.backups)), key=Chain.order_key)

    def unordered(self):
        """Chains holding backups none of whose manifests can be read (lost or damaged)."""
        return [c for c in self.chains.values()
                if c.newest() is not None and not any(b.committed for b in c.backups)]

    def newest_chain(self):
        chains = self.ordered()
        return chains[-1] if chains else None

    def committed(self):
        return [b for c in self.chains.values() for b in c.backups if b.committed]

    def next_generation(self):
        return 1 + max([b.manifest.get("generation", 0) for b in self.committed()] or [0])

    def newest_committed(self):
        """The last committed backup taken (by generation, then finish time), or None."""
        backups = self.committed()
        if not backups:
            return None
        return max(backups, key=lambda b: (b.manifest.get("generation", 0), b.manifest.get("finished", "")))

    def unfinished(self):
        """Backups that never committed and that nothing depends on: safe to remove."""
        found = []
        for chain in self.chains.values():
            backups = chain.backups
            for index, backup in enumerate(backups):
                later = backups[index + 1:]
                if backup.unfinished and not backup.has_manifest_file and not later:
                    found.append(backup)
        return found

    def lost(self):
        """Backup folders without a manifest that must be kept (a lost manifest, or later backups exist)."""
        removable = set(id(b) for b in self.unfinished())
        return [b for c in self.chains.values() for b in c.backups
                if b.has_dir and not b.has_manifest_file and id(b) not in removable]

    def damaged(self):
        """Backups whose manifest exists but cannot be trusted."""
        return [b for c in self.chains.values() for b in c.backups if b.problem]

    def forget(self, backup):
        """Drop a removed backup from the catalog."""
        backup.chain.by_name.pop(backup.name, None)
        if not backup.chain.by_name:
            self.chains.pop(backup.chain.id, None)

    # -- points --------------------------------------------------------------

    def point(self, spec):
        """The committed backup that `spec` names: latest, CHAIN or CHAIN/SEQUENCE.

        Never falls back to an older backup when the one named is damaged.
        """
        spec = str(spec or "latest").strip()
        if not self.ordered() and not self.unordered():
            raise BackupChainError("there are no backups under %s" % self.root)
        if spec == "latest":
            for chain in self.unordered():
                backup = chain.newest()
                raise BackupChainError(
                    "which backup is the latest is unknown: no manifest of chain %s can be read (%s); name a point "
                    "(CHAIN/SEQUENCE) to restore" % (chain.id, backup.problem or "manifest %s is missing"
                                                     % backup.manifest_path), damaged=backup.manifest_path)
            chain, sequence = self.newest_chain(), None
        else:
            chain_id, dummy, sequence = spec.partition("/")
            chain = self.chains.get(chain_id)
            if chain is None or chain.newest() is None:
                raise BackupChainError("there is no chain %s under %s (chains: %s)" % (
                    chain_id, self.root, ", ".join(sorted(c.id for c in self.chains.values()))))
            if sequence:
                try:
                    sequence = int(sequence)
                except ValueError:
                    raise BackupChainError("backup point %s: the part after / is a backup's sequence number" % spec)
            else:
                sequence = None
        backup = chain.newest() if sequence is None else chain.backup(sequence)
        if backup is None:
            raise BackupChainError("chain %s has no backup %s (it has %s)" % (
                chain.id, sequence, ", ".join(str(b.sequence) for b in chain.backups if not b.unfinished)))
        if not backup.committed:
            raise BackupChainError("backup %s cannot be used: %s" % (
                backup.label, backup.problem or "its manifest %s is missing (lost or deleted)" % backup.manifest_path),
                damaged=backup.manifest_path)
        return backup

    def lineage(self, backup):
        """The backups whose images a point reads: itself, its base, ... down to the full. Raises when one is
        missing or damaged."""
        found, seen = [backup], set()
        while found[-1].manifest.get("based_on") is not None:
            current = found[-1]
            if current.sequence in seen:
                raise BackupChainError("the backups of chain %s are based on each other in a loop (at %s)"
                                       % (current.chain.id, current.label))
            seen.add(current.sequence)
            base = current.chain.backup(current.manifest["based_on"])
            if base is None:
                raise BackupChainError("backup %s is based on backup %d of its chain, which is gone"
                                       % (current.label, current.manifest["based_on"]))
            if not base.committed:
                raise BackupChainError("backup %s is based on %s, which cannot be used: %s" % (
                    current.label, base.label, base.problem or "its manifest %s is missing (lost or deleted)"
                    % base.manifest_path), damaged=base.manifest_path)
            found.append(base)
        if not holds_whole_disk(found[-1]):
            raise BackupChainError("backup %s does not lead to a full backup" % backup.label)
        return found


# -- planning the next backup -----------------------------------------------

def chain_problem(chain, disks, bitmaps, prefix):
    """Why the next backup cannot continue `chain`, or None."""
    if chain.damage is not None:
        problems = chain.damage.get("problems") or ["?"]
        return "a verify or a restore found it damaged at %s: %s (%s)" % (
            chain.damage.get("found", "?"), problems[0], os.path.join(chain.dir, DAMAGE_FILE))
    backups = chain.backups
    for backup in backups:
        if backup.problem:
            return backup.problem
        if not backup.committed:
            return "backup %s has no manifest (lost or deleted), so its data cannot be checked" % backup.label
    if backups[0].manifest.get("based_on") is not None or not holds_whole_disk(backups[0]):
        return "its first backup is not a full one"
    # Pruned points leave gaps in the numbers; what must hold is that every base is there.
    sequences = set(b.sequence for b in backups)
    for backup in backups:
        base = backup.manifest.get("based_on")
        if base is not None and base not in sequences:
            return "backup %s is based on backup %d, which is gone" % (backup.label, base)
    last = backups[-1].manifest
    if last.get("format") != 2:
        return "it was written by an older version of the collection, without checksums"
    wanted = sorted(d["node"] for d in disks)
    held = sorted(d["node"] for d in last["disks"])
    if held != wanted:
        return "it holds other disks (%s) than this backup (%s)" % (", ".join(held), ", ".join(wanted))
    sizes = dict((d["node"], d["size"]) for d in disks)
    for disk in last["disks"]:
        if disk["virtual_size"] != sizes.get(disk["node"]):
            return "disk %s changed size (%d bytes, the chain has %d)" % (
                disk["node"], sizes.get(disk["node"]), disk["virtual_size"])
    for backup in backups:
        for disk in backup.manifest["disks"]:
            path = os.path.join(chain.dir, disk["image"])
            try:
                size = os.stat(path).st_size
            except OSError as exc:
                return "its image %s %s" % (path, "is missing" if exc.errno == errno.ENOENT
                                            else "cannot be read: %s" % (exc.strerror or exc))
            if size != disk["image_size"]:
                return "its image %s is %d bytes, its manifest says %d (damaged or truncated)" % (
                    path, size, disk["image_size"])
    by_key = dict(((b["node"], b["name"]), b) for b in bitmaps)
    own = "%s-%s-" % (prefix, chain.id)
    for node in wanted:
        for name, what in ((last["bitmap"], "what changed since backup %d" % backups[-1].sequence),
                           (last["full_bitmap"], "what changed since the full backup")):
            bitmap = by_key.get((node, name))
            if bitmap is None:
                others = sorted(n for (where, n) in by_key if where == node and n.startswith(own)
                                and n not in (last["bitmap"], last["full_bitmap"]))
                if others and name == last["bitmap"]:
                    return ("disk %s carries bitmap %s of an older backup of this chain, not %s of its newest backup: "
                            "the disk was rolled back to an older copy or replaced" % (node, others[0], name))
                return ("bitmap %s (%s) is missing on disk %s (QEMU was restarted without it, the disk was "
                        "replaced, or the bitmap was removed)" % (name, what, node))
            if bitmap.get("inconsistent"):
                return "bitmap %s on disk %s is inconsistent (QEMU did not stop cleanly)" % (name, node)
            if bitmap.get("busy"):
                return "bitmap %s on disk %s is busy (a job or a migration uses it)" % (name, node)
            if not bitmap.get("recording"):
                return "bitmap %s on disk %s does not record writes" % (name, node)
    return None


def plan_backup(catalog, disks, bitmaps, level, mode, prefix, chain_id):
    """The next backup: its level, chain, folder, images, and the bitmaps it reads, adds and drops.

    `disks` are [{node, device, size, drv}] and `bitmaps` QEMU's (normalised).
    A chain that cannot safely go on gives a new full chain and a warning,
    whatever level was asked for.
    """
    if level not in ("auto",) + LEVELS:
        raise BackupChainError("level must be auto, full, incremental or differential, not %r" % (level,))
    if not disks:
        raise BackupChainError("there are no disks to back up")
    warnings = []
    newest = catalog.newest_chain()
    if level == "full":
        plan_level = "full"
    elif newest is None:
        if level != "auto":
            warnings.append("no backup chain exists yet: taking a full backup instead of the %s one asked for" % level)
        plan_level = "full"
    else:
        wanted = "incremental" if level == "auto" else level
        problem = chain_problem(newest, disks, bitmaps, prefix)
        if problem:
            warnings.append("starting a new full chain instead of the %s backup: chain %s cannot go on: %s"
                            % (wanted, newest.id, problem))
            plan_level = "full"
        else:
            plan_level = wanted

    if plan_level == "full":
        chain = chain_id
        while chain in catalog.chains:
            chain += "x"  # two chains begun within one second, or a clock set back
        sequence, base, read = 0, None, None
        keep_full = full_bitmap(prefix, chain)
        adds = [since_bitmap(prefix, chain, 0), keep_full]
        drops = []  # after commit: every other bitmap of the prefix, found then
    else:
        chain = newest.id
        backups = newest.backups
        last = backups[-1]
        sequence = last.sequence + 1
        base = backups[0] if plan_level == "differential" else last
        keep_full = last.manifest["full_bitmap"]
        read = keep_full if plan_level == "differential" else last.manifest["bitmap"]
        adds = [since_bitmap(prefix, chain, sequence)]
        drops = [last.manifest["bitmap"]]

    chain_dir = os.path.join(catalog.root, chain)
    name = "%04d-%s" % (sequence, plan_level)
    base_images = dict((d["node"], d["image"]) for d in base.manifest["disks"]) if base else {}
    planned = []
    for index, disk in enumerate(disks):
        image = "%s/%s.qcow2" % (name, disk["node"])
        backing = base_images.get(disk["node"])
        planned.append({
            "node": disk["node"],
            "device": disk.get("device"),
            "size": disk["size"],
            "drv": disk.get("drv"),
            "target": "qmpbk%d" % index,
            "job_id": JOB_PREFIX + disk["node"],
            "image": image,
            "image_path": os.path.join(chain_dir, image),
            "backing": backing,
            # Written into the image relative to it, so a chain can be moved or copied whole.
            "backing_header": os.path.join("..", backing) if backing else None,
        })
    return {
        "level": plan_level,
        "new_chain": plan_level == "full",
        "chain": chain,
        "sequence": sequence,
        "name": name,
        "mode": mode,
        "chain_dir": chain_dir,
        "dir": os.path.join(chain_dir, name),
        "manifest_path": os.path.join(chain_dir, name + ".json"),
        "based_on": base.sequence if base else None,
        "read_bitmap": read,
        "since_bitmap": adds[0],
        "full_bitmap": keep_full,
        "add_bitmaps": adds,
        "drop_bitmaps": drops,
        "disks": planned,
        "warnings": warnings,
    }


def keep_bitmaps(catalog):
    """The bitmaps the newest chain needs to go on; every other bitmap of the prefix is stale."""
    chain = catalog.newest_chain()
    if chain is None or not chain.backups or not chain.backups[-1].committed:
        return set()
    last = chain.backups[-1].manifest
    return {last["bitmap"], last["full_bitmap"]}


def chains_to_delete(catalog, keep_chains, current):
    """The oldest chains beyond `keep_chains`; the chain just written is always kept."""
    chains = [c for c in catalog.ordered() if c.id != current]
    keep = max(1, int(keep_chains)) - 1  # the current chain counts
    return chains[:max(0, len(chains) - keep)]
