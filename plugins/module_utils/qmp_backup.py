# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backups: one transaction of backup jobs across the disks of a VM.

The rules that keep a backup chain from losing data after a failure:
- every job of one backup starts in one `transaction` with grouped completion,
  so either every disk's job succeeds or none of them changes its bitmap;
- an incremental uses `bitmap-mode: on-success`: QEMU clears the bits it
  copied only when the whole backup succeeded;
- bitmaps that anchor a new chain are added just before the backup starts
  (a write in between is merely copied twice later, never missed) and are
  removed again when the backup fails;
- jobs run with auto-dismiss off, so their errors are read before they go.

Pull mode serves a point-in-time view instead: each disk's target is a
fleece overlay backed by the disk, kept by a `sync=none` job, and the bitmap
of the changes to read is frozen at the same instant. An outside reader
copies what the bitmap marks; only when it succeeded is the frozen bitmap
dropped, else it is merged back so nothing is lost.
"""

from __future__ import annotations

import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_jobs import (
    ENDED,
    JobWaiter,
    JobWaitTimeout,
    job_command,
    read_jobs_by_id,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_bitmaps, read_block_nodes

SYNC_FOR_MODE = {"full": "full", "incremental": "bitmap", "differential": "bitmap"}


class BackupError(Exception):
    """A backup that cannot start, or that failed; `disks` holds per-disk results."""

    def __init__(self, message, disks=None):
        super().__init__(message)
        self.disks = disks


class BackupRun:
    """One backup across several disks: plan, start, follow, finish."""

    def __init__(self, qm, mode, disks, bitmap=None, anchors=(), anchor_persistent=True,
                 anchor_granularity=None, speed=None, perf=None, compress=False, pull=False):
        self.qm = qm
        self.mode = mode
        self.disks = [dict(d, job_id=d.get("job_id") or "backup-" + d["node"]) for d in disks]
        self.bitmap = bitmap
        self.anchors = list(anchors or [])
        self.anchor_persistent = anchor_persistent
        self.anchor_granularity = anchor_granularity
        self.speed = speed
        self.perf = perf
        self.compress = compress
        self.pull = pull
        self.job_ids = [d["job_id"] for d in self.disks]
        self.started_at = None
        self.waiter = JobWaiter(qm)

    # -- reading -----------------------------------------------------------

    def jobs(self):
        known = read_jobs_by_id(self.qm.query, self.qm.schema)
        return dict((job_id, known.get(job_id)) for job_id in self.job_ids)

    def started(self):
        """True when this backup's jobs exist in QEMU (started earlier and not dismissed)."""
        jobs = self.jobs()
        present = [job_id for job_id, job in jobs.items() if job is not None]
        if present and len(present) != len(jobs):
            raise BackupError("only some of this backup's jobs exist in QEMU (%s, but not %s): another backup "
                              "is using these job ids; give each disk another job_id"
                              % (", ".join(present), ", ".join(j for j in jobs if j not in present)))
        return bool(present)

    # -- starting ----------------------------------------------------------

    def check(self):
        """Refuse what QEMU would refuse, or what would make a wrong backup, before asking QEMU."""
        schema = self.qm.schema
        if not schema.feature("backup_bitmap_mode") and self.mode != "full":
            raise BackupError("this QEMU has no bitmap-mode for blockdev-backup (QEMU 4.2 and later have it), "
                              "which incremental and differential backups need")
        if len(self.disks) > 1 and not schema.feature("transaction_completion_mode"):
            raise BackupError("this QEMU cannot group the completion of several backup jobs, so a backup of "
                              "several disks could leave their bitmaps out of step")
        nodes = dict((n["node-name"], n) for n in read_block_nodes(self.qm.query, schema))
        bitmaps = dict(((b["node"], b["name"]), b) for b in read_bitmaps(self.qm.query, schema, list(nodes.values())))
        seen = set()
        for disk in self.disks:
            for role in ("node", "target"):
                if disk[role] not in nodes:
                    raise BackupError("QEMU has no block node %s (the %s of disk %s)" % (disk[role], role, disk["node"]))
            if disk["node"] == disk["target"] or disk["target"] in seen:
                raise BackupError("target %s is used twice" % disk["target"])
            seen.add(disk["target"])
            if self.bitmap:
                bitmap = bitmaps.get((disk["node"], self.bitmap))
                if bitmap is None:
                    raise BackupError("node %s has no bitmap %s: an %s backup needs the bitmap the last backup "
                                      "anchored (take a full backup to start a new chain)"
                                      % (disk["node"], self.bitmap, self.mode))
                if bitmap["inconsistent"]:
                    raise BackupError("bitmap %s on node %s is inconsistent (QEMU did not stop cleanly): the "
                                      "changes it tracked are unknown, so take a full backup" % (self.bitmap, disk["node"]))
                if bitmap["busy"]:
                    raise BackupError("bitmap %s on node %s is busy (another job or a migration uses it)"
                                      % (self.bitmap, disk["node"]))
            for anchor in self.anchors:
                if (disk["node"], anchor) in bitmaps:
                    raise BackupError("node %s already has bitmap %s: a new backup cannot anchor it again "
                                      "(remove it first)" % (disk["node"], anchor))
            if self.anchors and self.anchor_persistent and nodes[disk["node"]].get("drv") != "qcow2":
                raise BackupError("node %s is %s: only qcow2 images can store persistent bitmaps "
                                  "(set anchor_persistent=false)" % (disk["node"], nodes[disk["node"]].get("drv")))

    def _job_arguments(self, disk):
        arguments = {"job-id": disk["job_id"], "device": disk["node"], "target": disk["target"],
                     "sync": SYNC_FOR_MODE[self.mode], "auto-dismiss": False}
        if self.mode != "full" or self.bitmap:
            arguments["bitmap"] = self.bitmap
            # on-success: QEMU clears what it copied only when the backup succeeded.
            arguments["bitmap-mode"] = "never" if self.mode == "differential" else "on-success"
        if self.speed:
            arguments["speed"] = self.speed
        if self.compress:
            arguments["compress"] = True
        if self.perf and self.qm.schema.feature("backup_perf"):
            arguments["x-perf"] = self.perf
        return arguments

    @property
    def export_bitmap(self):
        """In pull mode, the frozen bitmap a reader copies by (None for a full backup)."""
        if not self.pull or self.mode == "full":
            return None
        # A differential reads a frozen copy: the chain's base bitmap goes on recording.
        return self.bitmap + ".pull" if self.mode == "differential" else self.bitmap

    def _pull_actions(self, disk):
        """Bitmap actions at the instant of a pull-mode backup, for one disk."""
        actions = []
        if self.mode == "incremental":
            actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": disk["node"], "name": self.bitmap}})
        elif self.mode == "differential":
            frozen = {"node": disk["node"], "name": self.export_bitmap, "disabled": True}
            actions.append({"type": "block-dirty-bitmap-add", "data": frozen})
            actions.append({"type": "block-dirty-bitmap-merge", "data": {
                "node": disk["node"], "target": self.export_bitmap, "bitmaps": [self.bitmap]}})
        return actions

    def _anchor_actions(self, disk):
        """The new chain's bitmaps on one disk, as transaction actions."""
        actions = []
        for anchor in self.anchors:
            data = {"node": disk["node"], "name": anchor}
            if self.anchor_persistent:
                data["persistent"] = True
            if self.anchor_granularity:
                data["granularity"] = self.anchor_granularity
            actions.append({"type": "block-dirty-bitmap-add", "data": data})
        return actions

    def start_pull(self):
        """Anchors, frozen bitmaps and the fleece jobs, all at one instant."""
        actions = []
        for disk in self.disks:
            actions.extend(self._anchor_actions(disk))
            actions.extend(self._pull_actions(disk))
            actions.append({"type": "blockdev-backup", "data": {
                "job-id": disk["job_id"], "device": disk["node"], "target": disk["target"], "sync": "none",
                "auto-dismiss": False}})
        self.started_at = time.time()
        self.qm.change("transaction", {"actions": actions})

    def finish_pull(self, pulled):
        """Stop the fleece jobs; keep the new bitmaps only when the reader copied everything."""
        jobs = self.jobs()
        for job_id, job in jobs.items():
            if job is not None and job["status"] not in ENDED:
                self.qm.change(*job_command(self.qm.schema, "cancel", job_id))
        if not self.qm.check_mode:
            jobs, dummy = self.wait(self.qm.wait_timeout)
        broken = [j for j in jobs.values() if j and j.get("error") and "cancel" not in j["error"].lower()]
        self.dismiss(jobs)
        existing = set((b["node"], b["name"]) for b in read_bitmaps(self.qm.query, self.qm.schema))
        for disk in self.disks:
            node = disk["node"]
            if self.mode == "differential" and (node, self.export_bitmap) in existing:
                self.qm.change("block-dirty-bitmap-remove", {"node": node, "name": self.export_bitmap})
            if self.mode == "incremental":
                if pulled and not broken:
                    self.qm.change("block-dirty-bitmap-remove", {"node": node, "name": self.bitmap})
                else:
                    # Recording again before the merge: no write falls between the two.
                    self.qm.change("block-dirty-bitmap-enable", {"node": node, "name": self.bitmap})
                    for anchor in self.anchors:
                        if (node, anchor) in existing:
                            self.qm.change("block-dirty-bitmap-merge", {"node": node, "target": self.bitmap,
                                                                        "bitmaps": [anchor]})
        if not pulled or broken:
            self.remove_anchors()
        if broken:
            raise BackupError("the point-in-time view broke: " + "; ".join(
                "job %s: %s" % (j["id"], j["error"]) for j in broken), self.report(jobs))
        return self.report(jobs)

    def start(self):
        if self.pull:
            self.start_pull()
            return
        if self.anchors:
            # Added just before the backup: a write in between is copied again
            # by the next backup, never missed.
            actions = [a for disk in self.disks for a in self._anchor_actions(disk)]
            self.qm.change("transaction", {"actions": actions})
        arguments = {"actions": [{"type": "blockdev-backup", "data": self._job_arguments(d)} for d in self.disks]}
        if self.qm.schema.feature("transaction_completion_mode"):
            arguments["properties"] = {"completion-mode": "grouped"}
        self.started_at = time.time()
        try:
            self.qm.change("transaction", arguments)
        except Exception:
            self.remove_anchors()
            raise

    # -- following ---------------------------------------------------------

    def wait(self, timeout):
        """Wait up to `timeout` seconds for every job to end; returns (jobs, ended)."""
        try:
            jobs, dummy = self.waiter.wait_status(self.job_ids, ENDED, timeout)
            return jobs, True
        except JobWaitTimeout as exc:
            return exc.jobs, False

    def report(self, jobs, window=None, before=None):
        """Per-disk results; rate over `window` seconds when `before` holds earlier jobs."""
        disks = []
        for disk in self.disks:
            job = jobs.get(disk["job_id"]) or {}
            current, total = job.get("current") or 0, job.get("total") or 0
            entry = {
                "node": disk["node"], "target": disk["target"], "job_id": disk["job_id"],
                "status": job.get("status"), "bytes": current, "total": total,
                "percent": round(100.0 * current / total, 1) if total else (100.0 if job.get("status") in ENDED else 0.0),
                "error": job.get("error"),
                "result": _result_of(job),
            }
            if window and before and before.get(disk["job_id"]):
                entry["rate"] = int(max(0, current - (before[disk["job_id"]].get("current") or 0)) / window)
            ended = self.waiter.ended_at.get(disk["job_id"])
            if self.started_at is not None and ended is not None:
                entry["duration"] = round(max(0.0, ended - self.started_at), 3)
                if entry["duration"] > 0:
                    entry["rate"] = int(current / entry["duration"])
            disks.append(entry)
        return disks

    # -- finishing ---------------------------------------------------------

    def dismiss(self, jobs):
        for job_id, job in jobs.items():
            if job is not None:
                self.qm.change(*job_command(self.qm.schema, "dismiss", job_id))

    def remove_anchors(self):
        if not self.anchors:
            return
        existing = set((b["node"], b["name"]) for b in read_bitmaps(self.qm.query, self.qm.schema))
        for disk in self.disks:
            for anchor in self.anchors:
                if (disk["node"], anchor) in existing:
                    self.qm.change("block-dirty-bitmap-remove", {"node": disk["node"], "name": anchor})

    def finish(self, jobs):
        """Dismiss the ended jobs; on failure remove the anchors and raise BackupError."""
        disks = self.report(jobs)
        self.dismiss(jobs)
        failed = [d for d in disks if d["result"] != "success"]
        if failed:
            self.remove_anchors()
            raise BackupError("backup failed: " + "; ".join(
                "disk %s (job %s): %s" % (d["node"], d["job_id"], d["error"] or d["result"]) for d in failed), disks)
        return disks


def _result_of(job):
    if not job:
        return "missing"
    if job.get("status") not in ENDED:
        return "running"
    error = job.get("error")
    if not error:
        return "success"
    return "cancelled" if "cancel" in error.lower() else "failed"
