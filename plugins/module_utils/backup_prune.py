# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pruning a VM's backups by a retention policy, without ever needing a new full backup.

The policy (backup_retention) says which points to keep. A point that falls
out of it goes in one of three ways:

- no point kept reads it (nothing is based on it, or only other points
  that go): its folder and manifest are removed, the newest first;
- exactly one point is based on it: it is folded into that point, together
  with the points between that the policy drops too (a day of increments at
  once). For each disk, `qemu-img commit -b OLDEST` writes the data of the
  later images into the oldest one, which only the dropped points read:
  the point kept reads those clusters from its own and the later images
  still, so its data stays what it was at every instant. Then the oldest
  image is renamed over the kept point's. The kept point now holds them all,
  backed by what the oldest was backed by; its manifest is rewritten with
  new checksums and the points it absorbed;
- several points are based on it (a full backup with differentials): it
  stays, as their base.

The newest point of the newest chain always stays: the next backup builds
on it. A chain whose points all fall out of the policy, and that is not the
newest, is deleted whole.

Crash safety: before each step the prune writes its journal (`.prune.json`
in the VM's backup folder), durably. A run that finds one finishes that step
first: the commit is redone (it writes the same data again), the renames not
yet done are done, the manifest is rewritten, the folded point removed. So a
prune killed at any instant leaves every kept point restorable, once rerun,
and equal to what it was. Restores and verifies refuse to read a chain while
its prune is unfinished.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil

from ansible_collections.qemu.qmp.plugins.module_utils.backup_catalog import (
    FILE_MODE,
    BackupChainError,
    Catalog,
)
from ansible_collections.qemu.qmp.plugins.module_utils.backup_digest import file_digest
from ansible_collections.qemu.qmp.plugins.module_utils.backup_live import MARKER_PREFIX, read_marker, reads_chain
from ansible_collections.qemu.qmp.plugins.module_utils.backup_host import (
    allocated_size,
    fsync_path,
    os_error,
    progress_text,
)
from ansible_collections.qemu.qmp.plugins.module_utils.backup_manifest import manifest_errors
from ansible_collections.qemu.qmp.plugins.module_utils.backup_retention import describe, policy_is_empty, select
from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import unlink_quietly, write_json

PRUNE_JOURNAL = ".prune.json"
NEWEST = "newest"  # the rule that keeps the newest point: the next backup is based on it


def finished_moment(backup):
    """When a backup finished, in the host's local time (the periods of the policy are local, as in PBS)."""
    text = backup.manifest.get("finished", "")
    try:
        moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    return moment.astimezone()


def users(chain):
    """The live restores that still read the chain (a VM runs on overlays backed by its images): [marker path]."""
    try:
        names = os.listdir(chain.dir)
    except OSError:
        return []
    markers = [os.path.join(chain.dir, n) for n in names if n.startswith(MARKER_PREFIX)]
    return [path for path in markers if reads_chain(read_marker(path) or {}, chain.dir)]


def plan_prune(catalog, policy):
    """What a prune does now: {"kept": {label: rule}, "actions": [...], "skipped": {chain id: why}}.

    Actions, in the order they run: ("delete_chain", chain), ("remove", backup), ("fold", [backups], into):
    the backups, oldest first, each based on the one before, the last the base of `into`.
    """
    chains = catalog.ordered()
    newest_chain = chains[-1] if chains else None
    by_key, points, sound, skipped = {}, [], [], {}
    for chain in chains:
        why = chain_skip_reason(catalog, chain)
        if why:
            skipped[chain.id] = why
            continue
        sound.append(chain)
        for backup in chain.backups:
            # Ties in time go by the order the backups were taken.
            key = (backup.manifest.get("generation", 0), backup.chain.id, backup.sequence)
            by_key[key] = backup
            points.append((key, finished_moment(backup)))
    kept = dict((by_key[key].label, rule) for key, rule in select(points, policy).items())
    if newest_chain is not None and newest_chain in sound:
        kept[newest_chain.backups[-1].label] = kept.get(newest_chain.backups[-1].label) or NEWEST
    actions = []
    for chain in sound:
        backups = chain.backups
        if all(kept.get(b.label) is None for b in backups):
            actions.append(("delete_chain", chain))
            continue
        based_on = dict((b.sequence, b.manifest.get("based_on")) for b in backups)
        # Points no kept point reads go first, newest first: a point is never left based on one removed.
        needed = set()
        for backup in backups:
            sequence = backup.sequence if kept.get(backup.label) is not None else None
            while sequence is not None and sequence not in needed:
                needed.add(sequence)
                sequence = based_on.get(sequence)
        for backup in reversed(backups):
            if backup.sequence not in needed:
                actions.append(("remove", backup))
                based_on.pop(backup.sequence)
        for backup in backups:
            if kept.get(backup.label) is not None or backup.sequence not in needed:
                continue
            dependents = [s for s, base in based_on.items() if base == backup.sequence]
            if len(dependents) == 1:
                into = chain.backup(dependents[0])
                last = actions[-1] if actions else None
                if last and last[0] == "fold" and last[2] is backup:
                    actions[-1] = ("fold", last[1] + [backup], into)  # one commit for a run of dropped points
                else:
                    actions.append(("fold", [backup], into))
                based_on[into.sequence] = based_on.pop(backup.sequence)
            else:
                kept[backup.label] = "base of %d points" % len(dependents)
    return {"kept": dict((label, rule) for label, rule in kept.items() if rule), "actions": actions,
            "skipped": skipped}


def chain_skip_reason(catalog, chain):
    """Why the prune leaves a chain alone, or None."""
    if chain.damage is not None:
        return "a verify or a restore found it damaged; verify it again once repaired"
    if any(b.problem or not b.committed or b.unfinished for b in chain.backups):
        return "it holds a backup without a readable manifest, or an unfinished one"
    for backup in chain.backups:
        if finished_moment(backup) is None:
            return "backup %s has no finish time" % backup.label
        try:
            catalog.lineage(backup)
        except BackupChainError as exc:
            return str(exc)
    if users(chain):
        return "a VM runs from it (a live restore): it is pruned once that VM's images hold their data"
    return None


def describe_action(action):
    if action[0] == "delete_chain":
        return "delete chain %s (%s)" % (action[1].id, ", ".join(b.name for b in action[1].backups))
    if action[0] == "remove":
        return "remove %s" % action[1].label
    return "fold %s into %s" % (", ".join(b.label for b in action[1]), action[2].name)


class Pruner:
    """Applies a policy to a VM's backup folder. The caller holds the folder's exclusive lock."""

    def __init__(self, engine, policy):
        self.e = engine
        self.policy = policy
        self.root = engine.root
        self.journal_path = os.path.join(self.root, PRUNE_JOURNAL)
        self.done = []

    # -- the journal -------------------------------------------------------------------

    def pending(self):
        try:
            with open(self.journal_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BackupChainError("the journal of an interrupted prune, %s, cannot be read (%s): nothing is pruned "
                                   "until it is repaired or removed by hand" % (self.journal_path, exc))
        return data if isinstance(data, dict) else None

    def record(self, step):
        write_json(self.journal_path, step, durable=True, mode=FILE_MODE, indent=1)

    def clear(self):
        unlink_quietly(self.journal_path)
        fsync_path(self.root, directory=True)

    # -- running ---------------------------------------------------------------------

    def finish_interrupted(self):
        """Finish the step an interrupted prune was in. Returns what it did (text), or None."""
        step = self.pending()
        if step is None:
            return None
        what = step.get("action")
        if what == "fold":
            self.fold_step(step)
        elif what in ("remove", "delete_chain"):
            self.remove_step(step)
        self.clear()
        return "finished an interrupted prune: %s" % step.get("text", what)

    def run(self, check=False):
        """Prune now (or, with `check`, only plan). Returns the plan's description and what was done."""
        if not check:
            finished = self.finish_interrupted()
            if finished:
                self.done.append(finished)
        elif self.pending():
            self.e.warnings.append("an interrupted prune is unfinished (%s): the next prune or backup finishes it"
                                   % self.journal_path)
        if policy_is_empty(self.policy):
            return {"policy": describe(self.policy), "kept": {}, "actions": [], "skipped": {}, "done": self.done}
        plan = plan_prune(Catalog(self.root), self.policy)
        texts = [describe_action(a) for a in plan["actions"]]
        if not check:
            for action, text in zip(plan["actions"], texts):
                self.e.reporter.phase("prune: %s" % text)
                if action[0] == "fold":
                    self.fold(action[1], action[2], text)
                else:
                    self.remove(action, text)
                self.done.append(text)
        return {"policy": describe(self.policy), "kept": plan["kept"], "actions": texts, "skipped": plan["skipped"],
                "done": self.done}

    # -- removing a point or a chain -------------------------------------------------

    def remove(self, action, text):
        if action[0] == "delete_chain":
            step = {"action": "delete_chain", "text": text, "chain": action[1].id}
        else:
            backup = action[1]
            step = {"action": "remove", "text": text, "chain": backup.chain.id, "name": backup.name}
        self.record(step)
        self.remove_step(step)
        self.clear()

    def remove_step(self, step):
        chain_dir = os.path.join(self.root, step["chain"])
        try:
            if step["action"] == "delete_chain":
                if os.path.isdir(chain_dir):
                    shutil.rmtree(chain_dir)
            else:
                self.remove_point(chain_dir, step["name"])
        except OSError as exc:
            raise os_error("prune: %s" % step.get("text"), exc)

    def remove_point(self, chain_dir, name):
        # The manifest first: a folder without one is never taken for a backup that can be restored.
        unlink_quietly(os.path.join(chain_dir, name + ".json"))
        folder = os.path.join(chain_dir, name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        fsync_path(chain_dir, directory=True)

    # -- folding a point into the one based on it -------------------------------------

    def fold(self, backups, into, text):
        # The plan was made before the folds ahead of this one, which rewrote these manifests.
        for point in backups + [into]:
            point.manifest, point.problem = None, None
            point.read()
            if not point.committed:
                raise BackupChainError("prune: cannot %s: %s" % (text, point.problem or "%s has no manifest"
                                                                 % point.label))
        # Damaged data is never folded into a kept point, where new checksums would hide it.
        found = self.e.verify_backups(backups + [into], check=False)
        if found:
            self.e.record_damage(found)
            raise BackupChainError("prune: cannot %s: %s" % (text, "; ".join(p for dummy, p in found)),
                                   problems=[p for dummy, p in found])
        step = {"action": "fold", "text": text, "chain": into.chain.id, "fold": [b.manifest for b in backups],
                "into": into.name}
        self.record(step)
        self.fold_step(step)
        self.clear()

    def fold_step(self, step):
        chain_dir = os.path.join(self.root, step["chain"])
        folded = step["fold"]
        oldest = folded[0]
        into_manifest_path = os.path.join(chain_dir, step["into"] + ".json")
        try:
            with open(into_manifest_path, encoding="utf-8") as handle:
                into = json.load(handle)
        except (OSError, ValueError) as exc:
            raise BackupChainError("prune: the manifest %s cannot be read (%s)" % (into_manifest_path, exc))
        images = dict((d["node"], d) for d in oldest["disks"])
        for disk in into["disks"]:
            older = images.get(disk["node"])
            if older is None:
                raise BackupChainError("prune: backup %s/%s holds disk %s, which %s/%s does not" % (
                    step["chain"], step["into"], disk["node"], step["chain"], point_name(oldest)))
            self.fold_disk(os.path.join(chain_dir, older["image"]), os.path.join(chain_dir, disk["image"]),
                           disk["node"], step["text"])
        self.rewrite_manifest(chain_dir, into_manifest_path, into, folded, step["text"])
        for manifest in folded:
            self.remove_point(chain_dir, point_name(manifest))

    def fold_disk(self, older, later, node, text):
        """Write the data of `later` and of the images between into `older`, then put `older` in `later`'s
        place. Done already when `older` is gone (the rename is the step's last act on the disk)."""
        if not os.path.exists(older):
            return
        qemu_img = self.e.s.qemu_img
        self.e.reporter.phase("prune: %s: disk %s (qemu-img commit)" % (text, node))
        # -b keeps `later` as it is (it implies -d): until the rename, the kept point reads what it read.
        self.e.tool.run([qemu_img, "commit", "-q", "-f", "qcow2", "-b", older, later],
                        "prune: committing %s into %s" % (later, older))
        try:
            os.chmod(older, FILE_MODE)
            fsync_path(older)
            os.rename(older, later)
            fsync_path(os.path.dirname(later), directory=True)
        except OSError as exc:
            raise os_error("prune: putting %s in place of %s" % (older, later), exc)

    def rewrite_manifest(self, chain_dir, path, into, folded, text):
        """The point now holds what it folded in: its base, backing files, sizes and checksums change."""
        manifest = dict(into)
        oldest = folded[0]
        backing = dict((d["node"], d["backing"]) for d in oldest["disks"])
        manifest["based_on"] = oldest["based_on"]
        # Rewritten again when a rerun finishes this step: the same points, once each.
        absorbed = dict((f["sequence"], f) for f in into.get("folded", []))
        for point in folded:
            absorbed.update((f["sequence"], f) for f in point.get("folded", []))
            absorbed[point["sequence"]] = {"sequence": point["sequence"], "level": point["level"],
                                           "finished": point["finished"]}
        manifest["folded"] = [absorbed[key] for key in sorted(absorbed)]
        disks = []
        for disk in into["disks"]:
            image = os.path.join(chain_dir, disk["image"])
            self.e.reporter.phase("prune: %s: checksums of %s" % (text, disk["image"]))
            try:
                if self.e.s.verify:
                    self.e.tool.run([self.e.s.qemu_img, "check", "-q", "-f", "qcow2", image],
                                    "prune: checking %s" % image)
                size = os.path.getsize(image)
                digest = file_digest(image, progress=lambda done, size=size, node=disk["node"]: (
                    self.e.reporter.progress("prune: %s: checksums: %s" % (
                        text, progress_text(node, done, size, None)))))
                written = allocated_size(image)
            except OSError as exc:
                raise os_error("prune: reading %s" % image, exc)
            disks.append(dict(disk, backing=backing[disk["node"]], image_size=digest["size"], digest=digest,
                              bytes_written=written))
        manifest["disks"] = disks
        errors = manifest_errors(manifest)
        if errors:
            raise BackupChainError("prune: the new manifest of %s would be invalid: %s" % (path, "; ".join(errors)))
        try:
            write_json(path, manifest, durable=True, mode=FILE_MODE, indent=2)
        except OSError as exc:
            raise os_error("prune: writing the manifest %s" % path, exc)


def point_name(manifest):
    return "%04d-%s" % (manifest["sequence"], manifest["level"])


def prune_summary(result):
    """One line for people."""
    if not result["actions"] and not result["done"]:
        return "nothing to prune (%s)" % result["policy"]
    return "%s: %s" % (result["policy"], "; ".join(result["done"] or result["actions"]))


def data_bytes(backup):
    return sum(int(d.get("bytes_written", d.get("image_size", 0))) for d in backup.manifest["disks"])
