# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup engine: one backup, restore or verify of a VM's chains, on the host, on one QMP connection.

How a backup never loses a write. Each backup point has its own bitmap,
added in the same `transaction` that starts the jobs, so it records every
write from the backup's instant on. The bitmap the backup reads (the one of
the point before, or the chain's full bitmap) is only read, never cleared
(`bitmap-mode: never`, or a frozen copy in pull mode): it keeps recording.
It is removed only after the new backup is durably committed (images synced
and checked, checksums computed, manifest written and synced). Until then a
failure, or a kill at any instant, leaves the old bitmap holding every write
since the last committed backup; the next run removes what the failed one
added. This is the checkpoint model libvirt uses.

One backup of a VM at a time: a run holds an exclusive flock on the VM's
backup folder from start to end; restores and verifies hold it shared.
What an interrupted run leaves (jobs, nodes, exports, an NBD server,
qemu-nbd processes, an unfinished folder, bitmaps no manifest names) is
found by its names and the run's journal, and removed by the next run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import tempfile
import time

from ansible_collections.qemu.qmp.plugins.module_utils.backup_catalog import (
    DAMAGE_FILE,
    FILE_MODE,
    JOB_PREFIX,
    LOCK_FILE,
    NODE_PATTERN,
    PULL_SUFFIX,
    UNFINISHED,
    BackupChainError,
    Catalog,
    chains_to_delete,
    keep_bitmaps,
    plan_backup,
)
from ansible_collections.qemu.qmp.plugins.module_utils.backup_digest import file_digest
from ansible_collections.qemu.qmp.plugins.module_utils.backup_host import (
    DirLock,
    Journal,
    Tool,
    allocated_size,
    check_image,
    check_output,
    direct_io_works,
    existing_output,
    fsync_path,
    human,
    iso,
    os_error,
    output_difference,
    progress_text,
    remove_tree,
    stop_process,
    utc_now,
)
from ansible_collections.qemu.qmp.plugins.module_utils.backup_live import (
    JOB_PREFIX as JOB_PREFIX_LIVE,
    chain_of_backing,
    create_overlay,
    marker_path,
    qcow2_backing,
    read_marker,
    streaming_nodes,
    write_marker,
)
from ansible_collections.qemu.qmp.plugins.module_utils.backup_manifest import MANIFEST_FORMAT, manifest_errors
from ansible_collections.qemu.qmp.plugins.module_utils.backup_prune import (
    PRUNE_JOURNAL,
    Pruner,
    data_bytes,
    plan_prune,
    prune_summary,
)
from ansible_collections.qemu.qmp.plugins.module_utils.backup_retention import policy_is_empty
from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import Abandoned, unlink_quietly, write_json
from ansible_collections.qemu.qmp.plugins.module_utils.nbd_client import (
    STATE_DIRTY,
    STATE_ZERO,
    NBDClient,
    NBDError,
    copy_extents,
)
from ansible_collections.qemu.qmp.plugins.module_utils.host_budget import HostBudget
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_block import ImageCreator
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient, QMPCommandError, QMPError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_jobs import (
    ENDED,
    JobWaiter,
    JobWaitTimeout,
    job_command,
    read_jobs_by_id,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_nbd import (
    add_export,
    read_exports,
    remove_export,
    start_server,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_bitmaps, read_block_nodes

# The QMP commands a long run lists in its result: the first ones, then a count.
MAX_COMMANDS = 400


class Settings:
    """What a run was asked to do (the module's parameters, by their names)."""

    def __init__(self, params):
        self.__dict__.update(params)


class Engine:
    """One run: a backup, a restore or a verify of one VM's backup folder."""

    def __init__(self, qm, settings, reporter):
        self.qm = qm
        self.s = settings
        self.reporter = reporter
        self.root = settings.dir
        self.warnings = []
        self.cleaned = []
        self.tool = Tool(reporter)
        self.journal = Journal(self.root)
        self.timings = {}
        # Seconds the backup waited for a slot of the host's budget.
        self.budget_wait = 0.0
        # Set once the manifest of the backup is in place: from then on the backup counts, and stays.
        self.committed = False
        # qemu-nbd from the same place as the qemu-img in use.
        folder = os.path.dirname(settings.qemu_img) if hasattr(settings, "qemu_img") else ""
        self.qemu_nbd = os.path.join(folder, "qemu-nbd") if folder else "qemu-nbd"

    @contextlib.contextmanager
    def step(self, name):
        """Time a step of the run (reported as `timings`, so a slow step shows)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - start, 3)

    # -- QEMU ----------------------------------------------------------------

    def connect(self):
        self.qm.open_connection()

    def close(self):
        self.qm.close_connection()

    def commands(self):
        commands = self.qm.commands
        if len(commands) > MAX_COMMANDS:
            return commands[:MAX_COMMANDS] + [{"omitted": len(commands) - MAX_COMMANDS}]
        return commands

    def read_disks(self):
        """The disks to back up: nodes attached to the VM's devices, or the ones named, with size and format."""
        nodes = dict((n.get("node-name"), n) for n in read_block_nodes(self.qm.query, self.qm.schema))
        attached = []
        for device in self.qm.query("query-block"):
            node = (device.get("inserted") or {}).get("node-name")
            if node and device.get("qdev") and not device.get("removable", False):
                attached.append({"node": node, "device": device.get("qdev")})
        if self.s.disks:
            by_node = dict((d["node"], d) for d in attached)
            wanted = []
            for node in self.s.disks:
                if node not in nodes:
                    raise BackupChainError("QEMU has no block node %s (its disks: %s)" % (
                        node, ", ".join(sorted(by_node)) or "none"))
                wanted.append(by_node.get(node) or {"node": node, "device": None})
            attached = wanted
        for disk in attached:
            node = nodes.get(disk["node"], {})
            disk["size"] = int(node.get("image", {}).get("virtual-size", 0))
            disk["drv"] = node.get("drv")
        return attached

    def bitmaps(self):
        return read_bitmaps(self.qm.query, self.qm.schema)

    def remove_bitmap(self, node, name):
        self.qm.change("block-dirty-bitmap-remove", {"node": node, "name": name})

    # -- recovery ------------------------------------------------------------

    def leftovers(self, catalog):
        """What an interrupted run left: (jobs, exports, nodes) of the collection in QEMU."""
        jobs = dict((i, j) for i, j in read_jobs_by_id(self.qm.query, self.qm.schema).items() if i.startswith(JOB_PREFIX))
        exports = [e for e in (read_exports(self.qm) or {}) if NODE_PATTERN.match(e)]
        nodes = [n["node-name"] for n in read_block_nodes(self.qm.query, self.qm.schema)
                 if NODE_PATTERN.match(n.get("node-name") or "")]
        return jobs, exports, nodes

    def recover(self, catalog):
        """Remove what an interrupted run left, in QEMU and on disk (we hold the lock: its run is over)."""
        jobs, exports, nodes = self.leftovers(catalog)
        running = [i for i, j in jobs.items() if j["status"] not in ENDED]
        for job_id in running:
            self.qm.change(*job_command(self.qm.schema, "cancel", job_id))
        if running:
            try:
                jobs, dummy = JobWaiter(self.qm).wait_status(list(jobs), ENDED, self.qm.wait_timeout)
            except JobWaitTimeout:
                raise BackupChainError("jobs %s of an interrupted backup did not end after being cancelled"
                                       % ", ".join(running))
        for job_id, job in jobs.items():
            if job is not None:
                self.qm.change(*job_command(self.qm.schema, "dismiss", job_id))
                self.cleaned.append("job %s" % job_id)
        for export in exports:
            remove_export(self.qm, export, force=True)
            self.cleaned.append("NBD export %s" % export)
        journal = self.journal.load()
        if journal.get("nbd_server"):
            try:
                self.qm.change("nbd-server-stop")
                self.cleaned.append("QEMU's NBD server")
            except QMPCommandError:
                pass  # QEMU was restarted since, or the server was stopped
        for node in nodes:
            self.qm.change("blockdev-del", {"node-name": node})
            self.cleaned.append("block node %s" % node)
        for entry in journal.get("qemu_nbd", []):
            if stop_process(entry.get("pid", 0), entry.get("socket", "qemu-nbd")):
                self.cleaned.append("qemu-nbd (pid %s)" % entry.get("pid"))
        if journal.get("socket_dir"):
            shutil.rmtree(journal["socket_dir"], ignore_errors=True)
        for backup in catalog.unfinished():
            shutil.rmtree(backup.dir, ignore_errors=True)
            self.cleaned.append("unfinished backup %s" % backup.label)
            catalog.forget(backup)
            try:
                os.rmdir(backup.chain.dir)  # the chain had nothing else
            except OSError:
                pass
        for path in catalog.temp_files:
            unlink_quietly(path)
            self.cleaned.append("temporary manifest %s" % path)
        for chain in catalog.chains.values():
            for backup in chain.backups:
                if backup.committed and backup.unfinished:
                    # Killed between writing the manifest and removing the marker: it is committed.
                    os.unlink(os.path.join(backup.dir, UNFINISHED))
                    backup.unfinished = False
        self.journal.clear()

    def catalog_warnings(self, catalog):
        for backup in catalog.lost():
            self.warnings.append("backup %s has no manifest (lost or deleted): it is kept, since later backups may "
                                 "be based on it, but cannot be restored or checked" % backup.dir)
        for backup in catalog.damaged():
            self.warnings.append("backup %s cannot be used: %s" % (backup.label, backup.problem))
        self.warnings.extend(catalog.problems)

    # -- backup --------------------------------------------------------------

    def backup(self):
        started, begin = utc_now(), time.monotonic()
        self.reporter.phase("waiting for the lock of %s" % self.root)
        try:
            os.makedirs(self.root, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise os_error("cannot create the backup folder %s" % self.root, exc)
        with DirLock(self.root, True, self.s.lock_timeout, self.reporter, "a backup"):
            # The host's budget is taken after the VM's lock: a run that would be refused waits for no slot.
            with HostBudget(self.s.budget_dir, "backup", self.s.host_budget, self.s.wait_timeout, self.reporter,
                            "backup of %s" % self.s.name, BackupChainError) as budget:
                self.budget_wait = budget.waited
                self.reporter.phase("connecting to QEMU")
                self.connect()
                try:
                    return self._backup(started, begin)
                finally:
                    self.close()

    def _backup(self, started, begin):
        self.reporter.phase("cleaning up after interrupted runs")
        finished = Pruner(self, {}).finish_interrupted()
        if finished:
            self.cleaned.append(finished)
        catalog = Catalog(self.root)
        self.recover(catalog)
        self.catalog_warnings(catalog)
        disks = self.read_disks()
        bitmaps = self.bitmaps()
        plan = plan_backup(catalog, disks, bitmaps, self.s.level, self.s.mode, self.s.bitmap_prefix,
                           started.strftime("%Y%m%dT%H%M%SZ"))
        self.warnings.extend(plan["warnings"])
        self.remove_stale_bitmaps(bitmaps, keep_bitmaps(catalog))
        self.check_plan(plan)
        run = (PullRun if self.s.mode == "pull" else PushRun)(self, plan)
        try:
            with self.step("copy"):
                copied = run.take()
            manifest = self.commit(plan, copied, catalog.next_generation(), started, begin)
        except BaseException as exc:
            if not self.committed:
                failure = self.rollback(plan, run)
                raise self.failed(plan, exc, failure)
            raise
        removed = self.after_commit(plan)
        pruned = self.prune_after_commit()
        # The checksums stay in the manifest: a big disk has thousands.
        disks = [dict((k, v) for k, v in d.items() if k != "digest") for d in manifest["disks"]]
        return {
            "changed": True, "skipped": False, "level": plan["level"], "chain": plan["chain"],
            "sequence": plan["sequence"], "based_on": plan["based_on"], "dir": plan["dir"],
            "manifest": plan["manifest_path"], "duration": manifest["duration"], "disks": disks,
            "bytes_copied": sum(d["bytes_copied"] for d in disks),
            "bytes_written": sum(d["bytes_written"] for d in disks),
            "msg": "%s in %.1fs: %s" % (self.announce(plan), manifest["duration"], "; ".join(
                "%s %s written (%s %s)" % (d["node"], human(d["bytes_written"]), human(d["bytes_copied"]),
                                           "read over NBD" if self.s.mode == "pull"
                                           else "copied by the job, zeros included") for d in disks)),
            "cleaned": self.cleaned, "removed_chains": removed, "pruned": pruned, "warnings": self.warnings,
            "timings": self.timings, "budget_wait": self.budget_wait, "qmp_commands": self.commands(),
        }

    def failed(self, plan, exc, rollback_failure):
        if isinstance(exc, Abandoned):
            message = "the run stopped: %s" % exc
        elif isinstance(exc, QMPError):
            message = str(exc)
        elif isinstance(exc, OSError):
            message = "%s%s" % (exc.strerror or exc, " (%s)" % exc.filename if exc.filename else "")
        else:
            message = "%s: %s" % (type(exc).__name__, exc)
        what = "%s backup %d of chain %s of %s" % (plan["level"], plan["sequence"], plan["chain"], self.s.name)
        if rollback_failure:
            text = ("%s failed: %s. Undoing it failed too (%s); the next run cleans up, and the chain goes on from "
                    "its last committed backup" % (what, message, rollback_failure))
        else:
            text = ("%s failed; nothing of it was kept, and the next backup copies every write since the last "
                    "committed one: %s" % (what, message))
        details = dict(getattr(exc, "details", {}) or {})
        details.update(warnings=self.warnings, cleaned=self.cleaned, qmp_commands=self.commands())
        return BackupChainError(text, **details)

    def check_plan(self, plan):
        if not self.qm.schema.feature("backup_bitmap_mode"):
            raise BackupChainError("this QEMU has no bitmap-mode for blockdev-backup (QEMU 4.2 and later have "
                                   "it): the backup chains need it")

    def remove_stale_bitmaps(self, bitmaps, keep):
        """Bitmaps of the prefix that no chain needs only cost writes (an interrupted run's, an old chain's)."""
        prefix = self.s.bitmap_prefix + "-"
        for bitmap in bitmaps:
            if bitmap["name"].startswith(prefix) and bitmap["name"] not in keep:
                self.remove_bitmap(bitmap["node"], bitmap["name"])
                self.cleaned.append("bitmap %s on %s" % (bitmap["name"], bitmap["node"]))

    def bitmap_actions(self, plan, disk):
        """The new bitmaps of a backup, added at its instant, in its transaction."""
        actions = []
        for name in plan["add_bitmaps"]:
            data = {"node": disk["node"], "name": name}
            if disk.get("drv") == "qcow2":
                data["persistent"] = True  # they survive a clean restart of QEMU
            actions.append({"type": "block-dirty-bitmap-add", "data": data})
        return actions

    def follow(self, plan, job_ids):
        """Wait for the jobs to end, reporting progress; returns the jobs as they ended."""
        start = time.monotonic()
        nodes = dict((d["job_id"], d["node"]) for d in plan["disks"])

        def on_poll(jobs):
            failed = [j for j in jobs.values() if j and j["status"] in ENDED and j.get("error")]
            if failed:
                # One disk failed: the backup failed; stop the others now rather than at their end.
                raise BackupChainError("QEMU's backup job failed: %s" % "; ".join(
                    "disk %s: %s" % (nodes[j["id"]], j["error"]) for j in failed))
            elapsed = max(0.001, time.monotonic() - start)
            parts = []
            for job_id in job_ids:
                job = jobs.get(job_id) or {}
                current, total = job.get("current") or 0, job.get("total") or 0
                parts.append(progress_text(nodes[job_id], current, total, elapsed))
            self.reporter.progress("%s: %s" % (self.announce(plan), "; ".join(parts)))

        try:
            jobs, dummy = JobWaiter(self.qm).wait_status(job_ids, ENDED, self.s.wait_timeout, on_poll)
        except JobWaitTimeout:
            raise BackupChainError("the backup did not end within %gs (wait_timeout)" % self.s.wait_timeout)
        return jobs

    def announce(self, plan):
        based = "" if plan["based_on"] is None else " (based on backup %d)" % plan["based_on"]
        return "%s backup %d of chain %s%s" % (plan["level"], plan["sequence"], plan["chain"], based)

    def commit(self, plan, copied, generation, started, begin):
        """Sync, check and sum the images, then write the manifest: from then on the backup counts."""
        self.reporter.phase("%s: syncing the images" % self.announce(plan))
        with self.step("sync"):
            for disk in plan["disks"]:
                try:
                    fsync_path(disk["image_path"])
                except OSError as exc:
                    raise os_error("syncing image %s of disk %s" % (disk["image_path"], disk["node"]), exc)
            fsync_path(plan["dir"], directory=True)
            # What each image takes once on disk; the job's count includes every zero a full backup reads.
            written = dict((d["node"], allocated_size(d["image_path"])) for d in plan["disks"])
        checked = bool(self.s.verify)
        if checked:
            for disk in plan["disks"]:
                self.reporter.phase("%s: checking %s (qemu-img check)" % (self.announce(plan), disk["image"]))
                with self.step("check"):
                    self.tool.run([self.s.qemu_img, "check", "-q", "-f", "qcow2", disk["image_path"]],
                                  "checking image %s of disk %s" % (disk["image_path"], disk["node"]))
        with self.step("checksums"):
            digests = self.checksums(plan)
        finished = utc_now()

        manifest = {
            "format": MANIFEST_FORMAT, "vm": self.s.name, "host": socket.gethostname(), "chain": plan["chain"],
            "generation": generation, "sequence": plan["sequence"], "level": plan["level"], "mode": self.s.mode,
            "based_on": plan["based_on"], "bitmap": plan["since_bitmap"], "full_bitmap": plan["full_bitmap"],
            "started": iso(started), "finished": iso(finished), "duration": round(time.monotonic() - begin, 3),
            "qemu": dict((k, self.qm.client.version[k]) for k in ("major", "minor", "micro", "package")),
            "disks": [],
        }
        definition = self.vm_definition()
        if definition is not None:
            manifest["definition"] = definition
        for disk in plan["disks"]:
            result = copied.get(disk["node"], {})
            manifest["disks"].append({
                "node": disk["node"], "device": disk.get("device"), "image": disk["image"], "backing": disk["backing"],
                "virtual_size": int(disk["size"]), "image_size": digests[disk["node"]]["size"],
                "bytes_copied": int(result.get("bytes") or 0), "bytes_written": written[disk["node"]],
                "duration": result.get("duration"),
                "checked": checked, "digest": digests[disk["node"]],
            })
        errors = manifest_errors(manifest)
        if errors:
            raise BackupChainError("the manifest of %s would be invalid: %s" % (plan["dir"], "; ".join(errors)))
        self.reporter.phase("%s: writing the manifest" % self.announce(plan))
        with self.step("manifest"):
            self.write_manifest(plan, manifest)
        self.committed = True
        # Stopping now would only leave work for the next run.
        self.reporter.can_abandon = False
        try:
            os.unlink(os.path.join(plan["dir"], UNFINISHED))
            fsync_path(plan["dir"], directory=True)
        except OSError as exc:
            self.warnings.append("the backup is committed, but its marker %s could not be removed (%s); the next "
                                 "run removes it" % (os.path.join(plan["dir"], UNFINISHED), exc.strerror or exc))
        return manifest

    def vm_definition(self):
        """The VM's definition, as the vm role saved it when it started the VM, or None."""
        path = getattr(self.s, "definition_file", None)
        if not path:
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                definition = json.load(handle).get("definition")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            self.warnings.append("the VM's definition %s cannot be read (%s): the backup does not carry it" % (path, exc))
            return None
        if not isinstance(definition, dict):
            return None
        socket_path = self.qm.params.get("socket")
        if socket_path and definition.get("qmp_socket") and \
                os.path.realpath(definition["qmp_socket"]) != os.path.realpath(socket_path):
            # Another VM's definition (a default taken from the play): never restore this VM as that one.
            self.warnings.append("the definition in %s is of the VM on %s, not of the one backed up (%s): the backup "
                                 "does not carry it" % (path, definition["qmp_socket"], socket_path))
            return None
        return definition

    def prune_after_commit(self):
        """Apply the retention policy once the backup is committed. A failure leaves the backup as it is, and
        is a warning: the next backup or prune finishes or retries it."""
        policy = getattr(self.s, "retention", None) or {}
        if policy_is_empty(policy):
            return None
        try:
            return Pruner(self, policy).run()
        except (BackupChainError, OSError) as exc:
            self.warnings.append("the backup is committed, but pruning failed: %s" % exc)
            return None

    def checksums(self, plan):
        digests = {}
        for disk in plan["disks"]:
            self.reporter.phase("%s: computing the checksums of %s" % (self.announce(plan), disk["image"]))
            try:
                size = os.path.getsize(disk["image_path"])
                digests[disk["node"]] = file_digest(disk["image_path"], progress=lambda done, size=size, disk=disk: (
                    self.reporter.progress("%s: checksums of %s: %s" % (
                        self.announce(plan), disk["image"], progress_text(disk["node"], done, size, None)))))
            except OSError as exc:
                raise os_error("computing the checksums of image %s of disk %s" % (disk["image_path"], disk["node"]), exc)
        return digests

    def write_manifest(self, plan, manifest):
        try:
            # A backup holds the guest's data: its images get the mode of the rest of the catalog.
            for disk in plan["disks"]:
                os.chmod(disk["image_path"], FILE_MODE)
            write_json(plan["manifest_path"], manifest, durable=True, mode=FILE_MODE, indent=2)
        except OSError as exc:
            raise os_error("writing the manifest %s" % plan["manifest_path"], exc)

    def rollback(self, plan, run):
        """Undo an uncommitted backup; returns what could not be undone (text), or None."""
        failures = []
        self.reporter.can_abandon = False

        def attempt(what, action):
            try:
                action()
            except (QMPError, OSError, NBDError) as exc:
                failures.append("%s: %s" % (what, exc))

        if self.qm.client is not None and self.qm.client.connected:
            attempt("stopping its jobs", run.undo)
            attempt("removing the bitmaps it added", lambda: self.remove_added_bitmaps(plan))
        else:
            failures.append("QEMU is not connected any more")
        attempt("removing %s" % plan["dir"], lambda: remove_tree(plan["dir"]))
        if os.path.isdir(plan["chain_dir"]) and not os.listdir(plan["chain_dir"]):
            attempt("removing %s" % plan["chain_dir"], lambda: os.rmdir(plan["chain_dir"]))
        if not failures:
            self.journal.clear()
        return "; ".join(failures) or None

    def remove_added_bitmaps(self, plan):
        existing = set((b["node"], b["name"]) for b in self.bitmaps())
        names = list(plan["add_bitmaps"])
        if plan["read_bitmap"]:
            names.append(plan["read_bitmap"] + PULL_SUFFIX)
        for disk in plan["disks"]:
            for name in names:
                if (disk["node"], name) in existing:
                    self.remove_bitmap(disk["node"], name)

    def after_commit(self, plan):
        """Drop the bitmaps the committed backup replaced, and chains beyond the ones to keep."""
        self.reporter.phase("%s: committed; dropping replaced bitmaps" % self.announce(plan))
        keep = {plan["since_bitmap"], plan["full_bitmap"]}
        prefix = self.s.bitmap_prefix + "-"
        try:
            for bitmap in self.bitmaps():
                if bitmap["name"].startswith(prefix) and bitmap["name"] not in keep:
                    self.remove_bitmap(bitmap["node"], bitmap["name"])
        except QMPError as exc:
            self.warnings.append("the backup is committed, but a bitmap it replaced could not be removed (%s); the "
                                 "next run removes it" % exc)
        removed = []
        catalog = Catalog(self.root)
        for chain in chains_to_delete(catalog, self.s.keep_chains, plan["chain"]):
            try:
                remove_tree(chain.dir)
                removed.append(chain.id)
            except OSError as exc:
                self.warnings.append("old chain %s could not be deleted: %s" % (chain.dir, exc.strerror or exc))
        self.journal.clear()
        return removed

    # -- check mode ----------------------------------------------------------

    def refuse_while_running(self):
        """Fail at once, naming it, while a backup of the VM runs (it holds the VM's QMP socket too)."""
        if os.path.exists(os.path.join(self.root, LOCK_FILE)):
            with DirLock(self.root, False, 0, self.reporter, "a backup"):
                pass

    def plan_only(self):
        """What a backup would do now, changing nothing (check mode)."""
        catalog = Catalog(self.root)
        self.catalog_warnings(catalog)
        jobs, exports, nodes = self.leftovers(catalog)
        would_clean = (["job %s" % j for j in jobs] + ["NBD export %s" % e for e in exports]
                       + ["block node %s" % n for n in nodes]
                       + ["unfinished backup %s" % b.label for b in catalog.unfinished()])
        for backup in catalog.unfinished():
            catalog.forget(backup)
        disks = self.read_disks()
        bitmaps = self.bitmaps()
        started = utc_now()
        plan = plan_backup(catalog, disks, bitmaps, self.s.level, self.s.mode, self.s.bitmap_prefix,
                           started.strftime("%Y%m%dT%H%M%SZ"))
        self.warnings.extend(plan["warnings"])
        keep = keep_bitmaps(catalog)
        prefix = self.s.bitmap_prefix + "-"
        would_clean += ["bitmap %s on %s" % (b["name"], b["node"]) for b in bitmaps
                        if b["name"].startswith(prefix) and b["name"] not in keep]
        counts = dict(((b["node"], b["name"]), b["count"]) for b in bitmaps)
        planned = []
        for disk in plan["disks"]:
            copy = disk["size"] if plan["read_bitmap"] is None else counts.get((disk["node"], plan["read_bitmap"]), 0)
            planned.append({"node": disk["node"], "device": disk["device"], "image": disk["image"],
                            "backing": disk["backing"], "virtual_size": disk["size"], "bytes_to_copy": copy})
        self.check_plan(plan)
        deleted = [c.id for c in chains_to_delete(catalog, self.s.keep_chains, plan["chain"])]
        return {
            "changed": True, "skipped": False, "level": plan["level"], "chain": plan["chain"],
            "sequence": plan["sequence"], "based_on": plan["based_on"], "dir": plan["dir"],
            "manifest": plan["manifest_path"], "disks": planned,
            "msg": "would take %s: %s" % (self.announce(plan), "; ".join(
                "%s %s to copy" % (d["node"], human(d["bytes_to_copy"])) for d in planned)),
            "bytes_to_copy": sum(d["bytes_to_copy"] for d in planned),
            "bitmaps": {"read": plan["read_bitmap"], "add": plan["add_bitmaps"],
                        "drop_after_commit": plan["drop_bitmaps"]},
            "would_clean": would_clean, "would_remove_chains": deleted, "warnings": self.warnings,
            "qmp_commands": self.commands(),
        }

    def skip_reason(self):
        """Why no backup is due (max_age), or None. Reads only the folder: no lock, no QEMU."""
        if not self.s.max_age:
            return None, None
        newest = Catalog(self.root).newest_committed()
        if newest is None:
            return None, None
        finished = newest.manifest.get("finished", "")
        try:
            moment = datetime.datetime.strptime(finished, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            return None, None
        age = (utc_now() - moment).total_seconds()
        if age < -60:
            self.warnings.append("the newest backup %s finished at %s, in the future of this host's clock (%s): "
                                 "the clock was set back; taking a backup" % (newest.label, finished, iso(utc_now())))
            return None, None
        if age < self.s.max_age:
            return finished, ("the newest backup (%s) finished at %s, within max_age (%ss)"
                              % (newest.label, finished, self.s.max_age))
        return None, None

    # -- restore and verify --------------------------------------------------

    def restore_point(self):
        """The point to restore and the backups it reads, for the disk asked for."""
        catalog = Catalog(self.root)
        backup = catalog.point(self.s.point)
        lineage = catalog.lineage(backup)
        node = self.s.disk
        for base in lineage:
            if base.disk(node) is None:
                raise BackupChainError("backup %s holds no disk %s (it holds %s)" % (
                    base.label, node, ", ".join(d["node"] for d in base.manifest["disks"])))
        return backup, lineage

    def restore_plan(self):
        """What a restore would do (check mode): the point, and whether its images are all there."""
        if not self.s.disk:
            return self.restore_vm(check=True)
        backup, lineage = self.restore_point()
        problems = []
        for base in lineage:
            disk = base.disk(self.s.disk)
            image = os.path.join(base.chain.dir, disk["image"])
            if not os.path.exists(image) or os.path.getsize(image) != disk["image_size"]:
                problems.append("image %s is missing or not %d bytes" % (image, disk["image_size"]))
        if problems:
            raise BackupChainError("backup %s of disk %s cannot be restored: %s" % (
                backup.label, self.s.disk, "; ".join(problems)), problems=problems)
        image = backup.images()[self.s.disk]
        self.refuse_open_outputs({self.s.disk: self.s.output})
        held = self.output_holds(backup, self.s.disk, image, self.s.output)
        return {"changed": not held, "chain": backup.chain.id, "sequence": backup.sequence, "level": backup.level,
                "backup_finished": backup.manifest.get("finished"), "disk": self.s.disk, "image": image,
                "output": self.s.output, "verified": [], "would_verify": [b.label for b in lineage],
                "msg": self.restore_message(backup, held, would=True)}

    def output_holds(self, backup, node, image, output):
        """Whether `output` already holds disk `node` as of `backup` (then a restore has nothing to write).
        Raises when the output is there and must not be replaced: not a regular file (even with force), or an
        image with other content, without force."""
        if existing_output(output) is None:
            return False
        self.reporter.phase("comparing %s with disk %s as of backup %s" % (output, node, backup.label))
        why = output_difference(
            self.tool, self.s.qemu_img, output, image, backup.disk(node)["virtual_size"],
            lambda percent: self.reporter.progress("comparing %s with disk %s as of backup %s: %.1f%%" % (
                output, node, backup.label, percent)))
        if why is None:
            return True
        if not self.s.force:
            raise BackupChainError("%s exists and does not hold disk %s as of backup %s: %s; set force to "
                                   "overwrite it" % (output, node, backup.label, why), output=output, difference=why)
        return False

    def restore_message(self, backup, held, would=False):
        point = "disk %s as of backup %s" % (self.s.disk, backup.label)
        if held:
            return "%s already holds %s: nothing to write" % (self.s.output, point)
        if would:
            return "would restore %s into %s" % (point, self.s.output)
        return "restored %s into %s, checked" % (point, self.s.output)

    def refuse_unfinished_prune(self):
        path = os.path.join(self.root, PRUNE_JOURNAL)
        if os.path.exists(path):
            raise BackupChainError("a prune of %s was interrupted (%s): its images are being folded; run the prune "
                                   "again (or a backup) to finish it, then retry" % (self.root, path), journal=path)

    def restore(self):
        if not self.s.disk:
            return self.restore_vm()
        begin = time.monotonic()
        with DirLock(self.root, False, self.s.lock_timeout, self.reporter, "a restore"):
            self.refuse_unfinished_prune()
            backup, lineage = self.restore_point()
            node, output = self.s.disk, self.s.output
            self.refuse_open_outputs({node: output})
            self.refuse_damaged(backup, lineage, [node])
            image = backup.images()[node]
            held = self.restore_disk(backup, node, output)
            return {
                "changed": not held, "chain": backup.chain.id, "sequence": backup.sequence, "level": backup.level,
                "backup_finished": backup.manifest.get("finished"), "disk": node, "image": image, "output": output,
                "verified": [b.label for b in lineage], "msg": self.restore_message(backup, held),
                "warnings": self.warnings, "duration": round(time.monotonic() - begin, 3),
            }

    def refuse_damaged(self, backup, lineage, nodes):
        found = self.verify_backups(lineage, nodes=nodes, check=False)
        if found:
            self.record_damage(found)
            problems = [p for dummy, p in found]
            raise BackupChainError("backup %s of disk %s cannot be restored: %s" % (
                backup.label, ", ".join(nodes), "; ".join(problems)), problems=problems)

    def restore_disk(self, backup, node, output):
        """Restore one disk (its lineage checked already). Returns whether the output held it already."""
        image = backup.images()[node]
        held = self.output_holds(backup, node, image, output)
        if not held:
            self.write_restored(node, backup, image, output)
        return held

    # -- whole-VM restore ----------------------------------------------------

    def vm_restore_target(self):
        """The point of a whole-VM restore, what it reads, and {node: output}; in place only when confirmed."""
        self.refuse_unfinished_prune()
        catalog = Catalog(self.root)
        backup = catalog.point(self.s.point)
        lineage = catalog.lineage(backup)
        outputs = self.vm_outputs(backup)
        if self.s.in_place and not self.s.force:
            raise BackupChainError("restoring VM %s in place replaces its disks (%s) with backup %s: set force to "
                                   "confirm it" % (self.s.name, ", ".join(sorted(outputs.values())), backup.label))
        return backup, lineage, outputs

    def vm_outputs(self, backup):
        """{node: output path} of every disk of the point: in the output folder, or in place (the paths the VM's
        definition gives)."""
        nodes = [d["node"] for d in backup.manifest["disks"]]
        if not self.s.in_place:
            if not self.s.output_dir:
                raise BackupChainError("a restore of every disk needs output_dir (a folder for the images) or "
                                       "in_place; name disk to restore one disk into output")
            return dict((node, os.path.join(self.s.output_dir, node + ".qcow2")) for node in nodes)
        definition = backup.manifest.get("definition")
        if not definition:
            raise BackupChainError("backup %s does not carry the VM's definition (it was not started by the "
                                   "qemu.qmp.vm role, or the backup is older): restore it into output_dir"
                                   % backup.label)
        paths = dict((d.get("node_name"), d.get("path")) for d in definition.get("disks") or [])
        missing = [n for n in nodes if not paths.get(n)]
        if missing:
            raise BackupChainError("the VM's definition in backup %s has no path for disk %s"
                                   % (backup.label, ", ".join(missing)))
        return dict((node, paths[node]) for node in nodes)

    def refuse_open_outputs(self, outputs):
        """An output a running QEMU holds open is never replaced: that QEMU would go on with the old file."""
        for node, output in sorted(outputs.items()):
            if existing_output(output) is None:
                continue
            rc, out, err = self.tool.call([self.s.qemu_img, "info", "--output=json", output], "reading %s" % output)
            if rc != 0 and "lock" in (err + out):
                raise BackupChainError("%s (disk %s) is open in a running QEMU: stop the VM that uses it before "
                                       "restoring into it (%s)" % (output, node, (err or out).strip().splitlines()[0]),
                                       output=output)

    def restored_definition(self, backup, outputs):
        """The VM's definition from the manifest, its disks at the restored images, ready for the vm role."""
        definition = backup.manifest.get("definition")
        if not definition:
            return None
        definition = json.loads(json.dumps(definition))
        definition.pop("incoming", None)  # saved on a migration's destination: a restored VM boots
        for disk in definition.get("disks") or []:
            if disk.get("node_name") in outputs:
                disk.update(path=outputs[disk["node_name"]], format="qcow2")
        return definition

    def restore_vm(self, check=False):
        begin = time.monotonic()
        with DirLock(self.root, False, self.s.lock_timeout, self.reporter, "a restore"):
            backup, lineage, outputs = self.vm_restore_target()
            self.refuse_open_outputs(outputs)
            if check:
                disks = [{"disk": node, "output": output, "changed": not self.output_holds(
                    backup, node, backup.images()[node], output)} for node, output in outputs.items()]
            else:
                self.refuse_damaged(backup, lineage, list(outputs))
                if self.s.output_dir:
                    try:
                        os.makedirs(self.s.output_dir, mode=0o750, exist_ok=True)
                    except OSError as exc:
                        raise os_error("cannot create the output folder %s" % self.s.output_dir, exc)
                disks = [{"disk": node, "output": output, "changed": not self.restore_disk(backup, node, output)}
                         for node, output in outputs.items()]
            changed = [d["disk"] for d in disks if d["changed"]]
            point = "VM %s as of backup %s" % (self.s.name, backup.label)
            if not changed:
                msg = "every disk of %s is restored already: nothing to write" % point
            else:
                msg = "%s %s (%s)%s" % ("would restore" if check else "restored", point, ", ".join(
                    "%s into %s" % (d["disk"], d["output"]) for d in disks if d["changed"]),
                    "" if check else ", checked")
            result = {
                "changed": bool(changed), "chain": backup.chain.id, "sequence": backup.sequence,
                "level": backup.level, "backup_finished": backup.manifest.get("finished"), "restored": disks,
                "definition": self.restored_definition(backup, outputs), "msg": msg, "warnings": self.warnings,
            }
            if check:
                result.update(would_verify=[b.label for b in lineage], verified=[])
            else:
                result.update(verified=[b.label for b in lineage], duration=round(time.monotonic() - begin, 3))
            return result

    # -- live restore ----------------------------------------------------------

    def live_prepare(self, check=False):
        """The first half of a live restore: each disk's final image, an empty overlay on the backup point,
        created in an instant. The VM then starts on them (the role), and live_restore() copies the data."""
        with DirLock(self.root, False, self.s.lock_timeout, self.reporter, "a restore"):
            backup, lineage, outputs = self.vm_restore_target()
            marker_file = marker_path(backup.chain.dir, self.s.name)
            marker = read_marker(marker_file) or {}
            images = backup.images()
            done_before = marker.get("point") == backup.label and marker.get("outputs") == outputs
            disks, create = [], []
            for node, output in outputs.items():
                held = existing_output(output) is not None and (
                    os.path.realpath(qcow2_backing(output) or "/") == os.path.realpath(images[node])
                    or (done_before and marker.get("state") == "copied" and qcow2_backing(output) == ""))
                if not held:
                    if existing_output(output) is not None and not self.s.force:
                        raise BackupChainError("%s exists and is not a live restore of disk %s as of backup %s; set "
                                               "force to replace it" % (output, node, backup.label), output=output)
                    create.append(node)
                disks.append({"disk": node, "output": output, "changed": not held})
            problems = self.restore_problems(lineage, list(outputs))
            if problems:
                raise BackupChainError("backup %s cannot be restored: %s" % (backup.label, "; ".join(problems)),
                                       problems=problems)
            if create and not check:
                self.refuse_open_outputs(dict((n, outputs[n]) for n in create))
                if self.s.output_dir:
                    os.makedirs(self.s.output_dir, mode=0o750, exist_ok=True)
                write_marker(marker_file, {"vm": self.s.name, "point": backup.label, "outputs": outputs,
                                           "state": "running from the backup", "started": iso(utc_now())})
                for node in create:
                    try:
                        create_overlay(self.tool, self.s.qemu_img, outputs[node], images[node],
                                       backup.disk(node)["virtual_size"])
                    except OSError as exc:
                        raise os_error("creating the live-restore image %s" % outputs[node], exc)
            point = "VM %s as of backup %s" % (self.s.name, backup.label)
            return {
                "changed": bool(create), "chain": backup.chain.id, "sequence": backup.sequence, "level": backup.level,
                "backup_finished": backup.manifest.get("finished"), "restored": disks, "live": True,
                "definition": self.restored_definition(backup, outputs), "warnings": self.warnings,
                "msg": ("%s live: %s, each backed by the backup until its data is copied" % (
                    "would restore " + point if check else "restored " + point, ", ".join(
                        "%s in %s" % (d["disk"], d["output"]) for d in disks))) if create
                else "%s is live-restored already: nothing to create" % point,
            }

    def restore_problems(self, lineage, nodes):
        """Images of the point that are missing or not of their recorded size (the cheap checks: a live restore
        starts the VM at once, and checks the checksums once the data is copied)."""
        problems = []
        for base in lineage:
            for node in nodes:
                disk = base.disk(node)
                image = os.path.join(base.chain.dir, disk["image"])
                if not os.path.exists(image) or os.path.getsize(image) != disk["image_size"]:
                    problems.append("image %s is missing or not %d bytes" % (image, disk["image_size"]))
        return problems

    def live_restore_plan(self):
        """What the copy would do (check mode): the disks that still read from the backup."""
        with self.qm.connected():
            streaming = streaming_nodes(read_block_nodes(self.qm.query, self.qm.schema), self.root)
        return {"changed": bool(streaming), "disks": [{"disk": n, "reads": b} for n, b in sorted(streaming.items())],
                "warnings": self.warnings,
                "msg": ("would copy %s from the backup into the VM's own images" % ", ".join(sorted(streaming)))
                if streaming else "VM %s runs from its own images: no disk reads from %s" % (self.s.name, self.root)}

    def live_restore(self):
        """The second half: copy into each overlay what it still reads from the backup (block-stream), while the
        VM runs, then check the backup's checksums."""
        begin = time.monotonic()
        self.connect()
        try:
            return self._live_restore(begin)
        finally:
            self.close()

    def _live_restore(self, begin):
        nodes = read_block_nodes(self.qm.query, self.qm.schema)
        streaming = streaming_nodes(nodes, self.root)
        jobs = read_jobs_by_id(self.qm.query, self.qm.schema)
        if not streaming:
            return {"changed": False, "disks": [], "warnings": self.warnings,
                    "msg": "VM %s runs from its own images: no disk reads from %s" % (self.s.name, self.root)}
        places = set(chain_of_backing(self.root, b) for b in streaming.values())
        if len(places) != 1:
            raise BackupChainError("the disks of VM %s read from several backups (%s): restore them one at a time"
                                   % (self.s.name, ", ".join(sorted("/".join(p) for p in places))))
        chain_id, name = places.pop()
        catalog = Catalog(self.root)
        backup = catalog.point("%s/%s" % (chain_id, name.split("-")[0]))
        job_ids = dict((JOB_PREFIX_LIVE + node, node) for node in streaming)
        self.reporter.phase("live restore of VM %s: copying %s from backup %s" % (
            self.s.name, ", ".join(sorted(streaming)), backup.label))
        try:
            for job_id, node in sorted(job_ids.items()):
                if job_id in jobs:
                    if jobs[job_id]["status"] not in ENDED:
                        continue  # an earlier run's copy goes on: follow it
                    self.qm.change(*job_command(self.qm.schema, "dismiss", job_id))
                data = {"job-id": job_id, "device": node, "auto-dismiss": False}
                if self.s.speed:
                    data["speed"] = self.s.speed
                self.qm.change("block-stream", data)
            start = time.monotonic()

            def on_poll(current):
                elapsed = max(0.001, time.monotonic() - start)
                self.reporter.progress("live restore of VM %s: %s" % (self.s.name, "; ".join(
                    progress_text(node, (current.get(job_id) or {}).get("current") or 0,
                                  (current.get(job_id) or {}).get("total") or 0, elapsed)
                    for job_id, node in sorted(job_ids.items()))))

            try:
                ended, dummy = JobWaiter(self.qm).wait_status(list(job_ids), ENDED, self.s.wait_timeout, on_poll)
            except JobWaitTimeout:
                raise BackupChainError("the copy did not end within %gs (wait_timeout)" % self.s.wait_timeout)
        except BaseException as exc:
            self.reporter.can_abandon = False
            self.cancel_jobs(list(job_ids))
            what = "stopped" if isinstance(exc, Abandoned) else "failed"
            raise BackupChainError("the live restore's copy %s (%s); VM %s goes on running from backup %s, and "
                                   "running the copy again resumes it" % (what, exc, self.s.name, backup.label))
        failed = []
        for job_id, node in sorted(job_ids.items()):
            job = ended.get(job_id) or {}
            if job:
                self.qm.change(*job_command(self.qm.schema, "dismiss", job_id))
            if not job or job.get("error"):
                failed.append("disk %s: %s" % (node, job.get("error") or "its job vanished"))
        if failed:
            raise BackupChainError("the live restore's copy failed: %s; VM %s goes on running from backup %s, and "
                                   "running the copy again resumes it" % ("; ".join(failed), self.s.name, backup.label))
        left = streaming_nodes(read_block_nodes(self.qm.query, self.qm.schema), self.root)
        if left:
            raise BackupChainError("after the copy, disks %s still read from the backup" % ", ".join(sorted(left)))
        marker_file = marker_path(backup.chain.dir, self.s.name)
        marker = read_marker(marker_file) or {"vm": self.s.name, "point": backup.label}
        write_marker(marker_file, dict(marker, state="copied", copied=iso(utc_now())))
        # The data came from the backup unchecked, to start at once: check it now.
        self.reporter.phase("live restore of VM %s: checking backup %s against its checksums" % (
            self.s.name, backup.label))
        found = self.verify_backups(catalog.lineage(backup), nodes=list(streaming), check=False)
        if found:
            self.record_damage(found)
            problems = [p for dummy, p in found]
            raise BackupChainError("VM %s runs from its own images now, but backup %s was damaged: its data may be "
                                   "wrong: %s" % (self.s.name, backup.label, "; ".join(problems)), problems=problems)
        copied = dict((node, (ended.get(job_id) or {}).get("current") or 0) for job_id, node in job_ids.items())
        return {
            "changed": True, "chain": backup.chain.id, "sequence": backup.sequence, "level": backup.level,
            "disks": [{"disk": node, "bytes_copied": copied[node]} for node in sorted(copied)],
            "bytes_copied": sum(copied.values()), "duration": round(time.monotonic() - begin, 3),
            "verified": [b.label for b in catalog.lineage(backup)], "warnings": self.warnings,
            "msg": "VM %s runs from its own images: %s copied from backup %s while it ran, in %.1fs; the backup's "
                   "checksums match" % (self.s.name, human(sum(copied.values())), backup.label,
                                        time.monotonic() - begin),
        }

    def cancel_jobs(self, job_ids):
        """Stop our copy jobs (best effort: QEMU may be gone); the VM goes on from the backup chain."""
        try:
            jobs = read_jobs_by_id(self.qm.query, self.qm.schema)
            ours = [j for j in job_ids if j in jobs]
            for job_id in ours:
                if jobs[job_id]["status"] not in ENDED:
                    self.qm.change(*job_command(self.qm.schema, "cancel", job_id))
            JobWaiter(self.qm).wait_status(ours, ENDED, 30)
            for job_id in ours:
                self.qm.change(*job_command(self.qm.schema, "dismiss", job_id))
        except (QMPError, OSError) as exc:
            self.warnings.append("the copy jobs could not be stopped cleanly: %s" % exc)

    def write_restored(self, node, backup, image, output):
        """Flatten `image` into a new file beside `output`, check it, then rename it over `output`: the output
        name only ever holds a complete, checked image. The new file is created exclusively (never through a
        symlink), and removed when anything fails or the run is stopped."""
        folder = os.path.dirname(os.path.abspath(output))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(output), suffix=".restore", dir=folder)
        except OSError as exc:
            raise os_error("cannot create the restored image in %s" % folder, exc)
        try:
            self.reporter.phase("restoring %s from backup %s" % (node, backup.label))
            self.tool.run([self.s.qemu_img, "convert", "-p", "-O", "qcow2", image, tmp],
                          "restoring %s into %s" % (image, output),
                          progress=lambda percent: self.reporter.progress(
                              "restoring disk %s from backup %s: %.1f%%" % (node, backup.label, percent)))
            self.reporter.phase("checking the restored image")
            self.tool.run([self.s.qemu_img, "check", "-q", "-f", "qcow2", tmp], "checking the restored image")
            try:
                mine, there = os.fstat(fd), os.lstat(tmp)
                if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
                    raise BackupChainError("the restored image %s was replaced while it was written; %s is left "
                                           "as it was" % (tmp, output), output=output)
                os.fchmod(fd, FILE_MODE)
                os.fsync(fd)
                check_output(output, self.s.force)  # again: something may have appeared there meanwhile
                os.rename(tmp, output)
                fsync_path(folder, directory=True)
            except OSError as exc:
                raise os_error("putting the restored image in place as %s" % output, exc)
        except BaseException:
            unlink_quietly(tmp)
            raise
        finally:
            os.close(fd)

    def verify(self):
        begin = time.monotonic()
        with DirLock(self.root, False, self.s.lock_timeout, self.reporter, "a verify"):
            self.refuse_unfinished_prune()
            catalog = Catalog(self.root)
            self.catalog_warnings(catalog)
            spec = str(self.s.point or "all")
            if spec == "all":
                backups = [b for c in catalog.ordered() for b in c.backups if b.committed]
                broken = catalog.lost() + catalog.damaged()
            elif spec == "latest" or "/" in spec:
                backups, broken = catalog.lineage(catalog.point(spec)), []
            else:
                chain = catalog.chains.get(spec)
                if chain is None:
                    raise BackupChainError("there is no chain %s under %s (chains: %s)" % (
                        spec, self.root, ", ".join(c.id for c in catalog.ordered())))
                backups = [b for b in chain.backups if b.committed]
                broken = [b for b in catalog.lost() + catalog.damaged() if b.chain is chain]
            found = [(b, "backup %s: %s" % (b.label, b.problem or "its manifest %s is missing (lost or deleted)"
                                            % b.manifest_path)) for b in broken]
            found += self.verify_backups(backups, check=self.s.verify)
            self.record_damage(found, checked=set(b.chain.id for b in backups) if spec == "all" or (
                spec != "latest" and "/" not in spec) else set())
            problems = [p for dummy, p in found]
            self.record_verified(backups, set(b.label for b, dummy in found))
            self.warnings.extend("unfinished backup %s: the next backup removes it" % b.dir for b in catalog.unfinished())
            result = {
                "changed": False, "verified": [b.label for b in backups], "problems": problems,
                "images": sum(len(b.manifest["disks"]) for b in backups), "warnings": self.warnings,
                "duration": round(time.monotonic() - begin, 3),
            }
            if problems:
                raise BackupChainError("%d problem%s found in the backups of %s: %s" % (
                    len(problems), "" if len(problems) == 1 else "s", self.root, "; ".join(problems)), **result)
            return result

    def record_verified(self, backups, damaged):
        """When each backup was last verified, and whether it was sound, for the catalog."""
        path = os.path.join(self.root, VERIFIED_FILE)
        records = read_verified(self.root)
        now = iso(utc_now())
        for backup in backups:
            records[backup.label] = {"at": now, "sound": backup.label not in damaged}
        try:
            write_json(path, records, durable=True, mode=FILE_MODE, indent=1)
        except OSError as exc:
            self.warnings.append("could not record what was verified in %s: %s" % (path, exc.strerror or exc))

    # -- prune and catalog ---------------------------------------------------

    def policy(self):
        return getattr(self.s, "retention", None) or {}

    def prune(self):
        begin = time.monotonic()
        with DirLock(self.root, True, self.s.lock_timeout, self.reporter, "a prune"):
            before = self.point_labels()
            result = Pruner(self, self.policy()).run()
            return self.prune_result(result, before, self.point_labels(), begin)

    def prune_plan(self):
        """What a prune would remove and fold (check mode): reads only."""
        before = self.point_labels()
        result = Pruner(self, self.policy()).run(check=True)
        after = [label for label in before if result["kept"].get(label) is not None] if result["actions"] else before
        return self.prune_result(result, before, after, None)

    def point_labels(self):
        return [b.label for c in Catalog(self.root).ordered() for b in c.backups if b.committed]

    def prune_result(self, result, before, after, begin):
        done = result["done"] if begin is not None else result["actions"]
        outcome = {
            "changed": bool(done), "policy": result["policy"], "kept": result["kept"],
            "actions": done, "skipped_chains": result["skipped"], "points": after,
            "msg": ("" if begin is not None or not done else "would ") + prune_summary(result),
            "warnings": self.warnings,
            "diff": {"before": "".join(p + "\n" for p in before), "after": "".join(p + "\n" for p in after),
                     "before_header": self.root, "after_header": self.root},
        }
        if begin is not None:
            outcome["duration"] = round(time.monotonic() - begin, 3)
        return outcome

    def catalog(self):
        """Every chain and point, as data and as a table. Reads only: no lock (a point may change under a
        prune that runs meanwhile, and the next listing shows it)."""
        catalog = Catalog(self.root)
        self.catalog_warnings(catalog)
        if os.path.exists(os.path.join(self.root, PRUNE_JOURNAL)):
            self.warnings.append("a prune was interrupted: the next prune or backup finishes it")
        policy = self.policy()
        kept = plan_prune(catalog, policy)["kept"] if not policy_is_empty(policy) else {}
        verified = read_verified(self.root)
        chains = []
        for chain in catalog.ordered() + catalog.unordered():
            points = []
            for backup in chain.backups:
                point = {"point": backup.label, "sequence": backup.sequence, "level": backup.level}
                if not backup.committed:
                    point["state"] = "unfinished" if backup.unfinished else (backup.problem or "no manifest")
                    points.append(point)
                    continue
                manifest = backup.manifest
                check = verified.get(backup.label) or {}
                point.update(
                    state="damaged" if chain.damage is not None else "committed",
                    based_on=manifest.get("based_on"), finished=manifest.get("finished"),
                    disks=[d["node"] for d in manifest["disks"]], data_bytes=data_bytes(backup),
                    image_bytes=sum(int(d["image_size"]) for d in manifest["disks"]),
                    verified=check.get("at") if check.get("sound") else None,
                    kept_by=kept.get(backup.label) if kept else None,
                    folded=[f["sequence"] for f in manifest.get("folded", [])],
                    definition="definition" in manifest)
                points.append(point)
            chains.append({"chain": chain.id, "damaged": chain.damage is not None, "points": points})
        table = catalog_table(chains, bool(kept))
        return {"changed": False, "chains": chains, "table": table, "warnings": self.warnings,
                "msg": "%d chain%s, %d point%s in %s" % (
                    len(chains), "" if len(chains) == 1 else "s", sum(len(c["points"]) for c in chains),
                    "" if sum(len(c["points"]) for c in chains) == 1 else "s", self.root)}

    def record_damage(self, found, checked=()):
        """Mark the chains where damage was found, so backups do not build on them; unmark the chains of
        `checked` (checked whole) found sound."""
        by_chain = {}
        for backup, problem in found:
            by_chain.setdefault(backup.chain, []).append(problem)
        for chain, problems in by_chain.items():
            path = os.path.join(chain.dir, DAMAGE_FILE)
            try:
                write_json(path, {"found": iso(utc_now()), "problems": problems}, durable=True, mode=FILE_MODE, indent=2)
            except OSError as exc:
                self.warnings.append("could not record the damage in %s: %s" % (path, exc.strerror or exc))
        damaged = set(c.id for c in by_chain)
        for chain_id in checked:
            if chain_id in damaged:
                continue
            try:
                os.unlink(os.path.join(self.root, chain_id, DAMAGE_FILE))
                self.warnings.append("chain %s was marked damaged, and is sound now: the mark is removed" % chain_id)
            except OSError:
                pass

    def verify_backups(self, backups, nodes=None, check=False):
        """Problems of the backups' images (missing, wrong size, checksum, qemu-img check), as (backup, text)."""
        problems = []
        for backup in backups:
            if backup.manifest.get("format") == 1:
                self.warnings.append("backup %s was written without checksums: only its sizes are checked"
                                     % backup.label)
            for disk in backup.manifest["disks"]:
                if nodes is not None and disk["node"] not in nodes:
                    continue
                image = os.path.join(backup.chain.dir, disk["image"])
                if not os.path.exists(image):
                    problems.append((backup, "image %s of disk %s is missing" % (image, disk["node"])))
                    continue
                size = os.path.getsize(image)
                if size != disk["image_size"]:
                    problems.append((backup, "image %s of disk %s is %d bytes, its manifest says %d (%s)" % (
                        image, disk["node"], size, disk["image_size"],
                        "truncated" if size < disk["image_size"] else "grown")))
                    continue
                self.reporter.phase("verifying %s" % image)
                problems += [(backup, p) for p in check_image(
                    self.tool, self.s.qemu_img, image, disk.get("digest"), disk["node"],
                    lambda done, image=image, size=size, node=disk["node"]: self.reporter.progress(
                        "verifying %s: %s" % (image, progress_text(node, done, size, None))))]
                if check:
                    try:
                        self.tool.run([self.s.qemu_img, "check", "-q", "-f", "qcow2", image],
                                      "checking image %s" % image)
                    except BackupChainError as exc:
                        problems.append((backup, str(exc)))
        return problems


VERIFIED_FILE = ".verified.json"


def read_verified(root):
    try:
        with open(os.path.join(root, VERIFIED_FILE), encoding="utf-8") as handle:
            records = json.load(handle)
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def catalog_table(chains, with_policy):
    """The catalog for people: one line per point."""
    header = ["point", "level", "finished", "disks", "data", "verified"] + (["kept by"] if with_policy else [])
    rows = []
    for chain in chains:
        for point in chain["points"]:
            if "finished" not in point:
                rows.append([point["point"], point["level"], point["state"], "", "", ""] + ([""] if with_policy else []))
                continue
            level = point["level"] + ("+%d folded" % len(point["folded"]) if point["folded"] else "")
            rows.append([point["point"], level, point["finished"], ",".join(point["disks"]), human(point["data_bytes"]),
                         (point["verified"] or "no") + (" DAMAGED" if point["state"] == "damaged" else "")]
                        + ([point["kept_by"] or "(removed by the next prune)"] if with_policy else []))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + rows]


class PushRun:
    """QEMU writes the backup into target images (blockdev-backup)."""

    def __init__(self, engine, plan):
        self.e = engine
        self.qm = engine.qm
        self.plan = plan
        self.nodes = []
        self.job_ids = [d["job_id"] for d in plan["disks"]]
        self.started = False

    def make_folder(self):
        plan = self.plan
        try:
            os.makedirs(plan["chain_dir"], mode=0o750, exist_ok=True)
            os.mkdir(plan["dir"], 0o750)
            open(os.path.join(plan["dir"], UNFINISHED), "w").close()
            fsync_path(plan["dir"], directory=True)
            fsync_path(plan["chain_dir"], directory=True)
        except OSError as exc:
            raise os_error("creating the backup folder %s" % plan["dir"], exc)

    def file_options(self):
        # O_DIRECT with native AIO bypasses the page cache: a full backup takes about 0.6 times as long
        # as `qemu-img convert` + sync (bench/backup_throughput.py).
        wanted = str(self.e.s.target_direct).lower()
        if wanted == "true" or (wanted == "auto" and direct_io_works(self.plan["dir"])):
            return {"cache": {"direct": True}, "aio": "native"}
        return {}

    def create_image(self, disk, node, path, backing=None, backing_header=None, file_options=None):
        create = {"size": disk["size"], "cluster_size": self.e.s.cluster_size, "options": self.e.s.target_options}
        if backing_header:
            create["backing_file"] = backing_header
        try:
            ImageCreator(self.qm, node).create({"driver": "file", "filename": path}, "qcow2", create)
        except QMPError as exc:
            raise BackupChainError("creating image %s of disk %s: %s" % (path, disk["node"], exc))
        options = {"driver": "qcow2", "node-name": node, "file": dict({"driver": "file", "filename": path},
                                                                      **(file_options or {}))}
        options["backing"] = backing
        self.qm.change("blockdev-add", options)
        self.nodes.append(node)

    def freeze(self):
        return GuestFreeze(self.e.s.guest_agent_socket, self.qm.timeout, self.e.warnings)

    def transaction(self, job_actions):
        actions = []
        for disk in self.plan["disks"]:
            actions.extend(self.e.bitmap_actions(self.plan, disk))
        actions.extend(job_actions)
        # No grouped completion (QEMU refuses it beside bitmap actions), and none is needed: the jobs
        # never change a bitmap, and a failed disk fails the whole backup.
        arguments = {"actions": actions}
        with self.freeze():
            self.qm.change("transaction", arguments)
        self.started = True

    def take(self):
        plan = self.plan
        self.make_folder()
        options = self.file_options()
        self.e.reporter.phase("%s: creating the target images" % self.e.announce(plan))
        for disk in plan["disks"]:
            self.create_image(disk, disk["target"], disk["image_path"], backing_header=disk["backing_header"],
                              file_options=options)
        jobs = []
        for disk in plan["disks"]:
            data = {"job-id": disk["job_id"], "device": disk["node"], "target": disk["target"],
                    "sync": "full" if plan["read_bitmap"] is None else "bitmap", "auto-dismiss": False}
            if plan["read_bitmap"]:
                # Read only: the bitmap keeps every bit until this backup is committed.
                data.update({"bitmap": plan["read_bitmap"], "bitmap-mode": "never"})
            if self.e.s.speed:
                data["speed"] = self.e.s.speed
            if self.e.s.perf and self.qm.schema.feature("backup_perf"):
                data["x-perf"] = self.e.s.perf
            jobs.append({"type": "blockdev-backup", "data": data})
        start = time.monotonic()
        self.e.reporter.phase("%s: starting" % self.e.announce(plan))
        self.transaction(jobs)
        ended = self.e.follow(plan, self.job_ids)
        copied = self.finish_jobs(ended, start)
        for node in list(self.nodes):
            self.qm.change("blockdev-del", {"node-name": node})
            self.nodes.remove(node)
        return copied

    def finish_jobs(self, jobs, start):
        copied, failed = {}, []
        for disk in self.plan["disks"]:
            job = jobs.get(disk["job_id"])
            if job is None:
                failed.append("disk %s: its job %s vanished" % (disk["node"], disk["job_id"]))
                continue
            self.qm.change(*job_command(self.qm.schema, "dismiss", disk["job_id"]))
            if job.get("error"):
                failed.append("disk %s: %s" % (disk["node"], job["error"]))
            ended = time.monotonic() - start
            copied[disk["node"]] = {"bytes": job.get("current") or 0, "duration": round(ended, 3)}
        if failed:
            raise BackupChainError("QEMU's backup job failed: %s" % "; ".join(failed))
        return copied

    def undo(self):
        jobs = read_jobs_by_id(self.qm.query, self.qm.schema)
        ours = [j for j in self.job_ids if j in jobs]
        running = [j for j in ours if jobs[j]["status"] not in ENDED]
        for job_id in running:
            self.qm.change(*job_command(self.qm.schema, "cancel", job_id))
        if running:
            JobWaiter(self.qm).wait_status(ours, ENDED, self.qm.wait_timeout)
        for job_id in ours:
            self.qm.change(*job_command(self.qm.schema, "dismiss", job_id))
        present = set(n["node-name"] for n in read_block_nodes(self.qm.query, self.qm.schema))
        for node in self.nodes:
            if node in present:
                self.qm.change("blockdev-del", {"node-name": node})
        self.nodes = []


class PullRun(PushRun):
    """QEMU serves each disk as it was at the backup's instant over its NBD server, with the frozen bitmap;
    the engine reads what changed into images backed by the earlier backup, through qemu-nbd."""

    def __init__(self, engine, plan):
        super().__init__(engine, plan)
        self.socket_dir = None
        self.server = False
        self.exports = []
        self.servers = []  # (pid, socket) of qemu-nbd

    def take(self):
        plan = self.plan
        self.make_folder()
        self.socket_dir = tempfile.mkdtemp(prefix="qmpbk.", dir="/tmp")  # unix socket paths are short
        self.e.journal.record(socket_dir=self.socket_dir)
        nbd_socket = os.path.join(self.socket_dir, "nbd.sock")
        try:
            start_server(self.qm, {"type": "unix", "path": nbd_socket})
        except QMPCommandError as exc:
            raise BackupChainError("pull mode starts QEMU's NBD server, which failed (%s); if another NBD server "
                                   "runs in this QEMU, stop it first (qemu.qmp.qmp_nbd state=absent)" % exc.desc)
        self.server = True
        self.e.journal.record(nbd_server=True)
        self.e.reporter.phase("%s: creating the point-in-time views" % self.e.announce(plan))
        for disk in plan["disks"]:
            self.create_image(disk, disk["target"], os.path.join(plan["dir"], disk["node"] + ".fleece.qcow2"),
                              backing=disk["node"])
        read = plan["read_bitmap"]
        frozen = read + PULL_SUFFIX if read else None
        actions = []
        for disk in plan["disks"]:
            if frozen:
                # A frozen copy to export: the bitmap it copies keeps recording, and keeps its bits.
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": disk["node"], "name": frozen, "disabled": True}})
                actions.append({"type": "block-dirty-bitmap-merge",
                                "data": {"node": disk["node"], "target": frozen, "bitmaps": [read]}})
            actions.append({"type": "blockdev-backup", "data": {
                "job-id": disk["job_id"], "device": disk["node"], "target": disk["target"], "sync": "none",
                "auto-dismiss": False}})
        self.transaction(actions)
        for disk in plan["disks"]:
            add_export(self.qm, disk["target"], disk["target"], bitmaps=[frozen] if frozen else [])
            self.exports.append(disk["target"])
        counts = dict(((b["node"], b["name"]), b["count"]) for b in self.e.bitmaps()) if frozen else {}
        copied = {}
        for disk in plan["disks"]:
            copied[disk["node"]] = self.read_disk(disk, nbd_socket, frozen, counts.get((disk["node"], frozen)))
        self.stop_serving()
        return copied

    def read_disk(self, disk, nbd_socket, frozen, dirty):
        """Copy one disk's changes (or, for a full backup, its data) from QEMU's view into its image."""
        plan = self.plan
        path = disk["image_path"]
        argv = [self.e.s.qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % self.e.s.cluster_size]
        if disk["backing_header"]:
            argv += ["-b", disk["backing_header"], "-F", "qcow2"]
        self.e.tool.run(argv + [path, str(disk["size"])], "creating image %s of disk %s" % (path, disk["node"]))
        target_socket = os.path.join(self.socket_dir, disk["target"] + ".sock")
        pid_file = os.path.join(self.socket_dir, disk["target"] + ".pid")
        self.e.tool.run([self.e.qemu_nbd, "--fork", "-f", "qcow2", "--cache=writeback", "--socket", target_socket,
                         "--pid-file", pid_file, path], "serving image %s with qemu-nbd" % path)
        with open(pid_file, encoding="utf-8") as handle:
            pid = int(handle.read().strip())
        self.servers.append((pid, target_socket))
        self.e.journal.record(qemu_nbd=[{"pid": p, "socket": s} for p, s in self.servers])
        start = time.monotonic()
        total = dirty if frozen else disk["size"]
        announce = self.e.announce(plan)

        def progress(done):
            self.e.reporter.progress("%s: %s" % (announce, progress_text(
                disk["node"], done, total, time.monotonic() - start)))

        try:
            source = NBDClient(nbd_socket, disk["target"],
                               "qemu:dirty-bitmap:" + frozen if frozen else "base:allocation")
            try:
                target = NBDClient(target_socket, "")
                try:
                    if frozen:
                        copied, dummy = copy_extents(source, target, lambda flags: flags & STATE_DIRTY, progress)
                    else:
                        copied, dummy = copy_extents(source, target, lambda flags: not flags & STATE_ZERO, progress)
                finally:
                    target.close()
            finally:
                source.close()
        except (NBDError, OSError) as exc:
            raise BackupChainError("reading disk %s from QEMU's NBD export into %s: %s" % (disk["node"], path, exc))
        self.stop_nbd(pid, target_socket)
        return {"bytes": copied, "duration": round(time.monotonic() - start, 3)}

    def stop_nbd(self, pid, target_socket):
        stop_process(pid, target_socket)
        self.servers = [s for s in self.servers if s[0] != pid]
        self.e.journal.record(qemu_nbd=[{"pid": p, "socket": s} for p, s in self.servers])

    def stop_serving(self):
        for export in list(self.exports):
            remove_export(self.qm, export, force=True)
            self.exports.remove(export)
        jobs = read_jobs_by_id(self.qm.query, self.qm.schema)
        ours = [j for j in self.job_ids if j in jobs]
        for job_id in ours:
            if jobs[job_id]["status"] not in ENDED:
                self.qm.change(*job_command(self.qm.schema, "cancel", job_id))
        ended, dummy = JobWaiter(self.qm).wait_status(ours, ENDED, self.qm.wait_timeout)
        broken = [j for j in ended.values() if j and j.get("error") and "cancel" not in j["error"].lower()]
        for job_id in ours:
            self.qm.change(*job_command(self.qm.schema, "dismiss", job_id))
        for node in list(self.nodes):
            self.qm.change("blockdev-del", {"node-name": node})
            self.nodes.remove(node)
        for disk in self.plan["disks"]:
            try:
                os.unlink(os.path.join(self.plan["dir"], disk["node"] + ".fleece.qcow2"))
            except FileNotFoundError:
                pass
        if self.server:
            self.qm.change("nbd-server-stop")
            self.server = False
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        self.e.journal.clear()
        if broken:
            raise BackupChainError("the point-in-time view broke while it was read: %s" % "; ".join(
                "job %s: %s" % (j["id"], j["error"]) for j in broken))

    def undo(self):
        for pid, target_socket in list(self.servers):
            self.stop_nbd(pid, target_socket)
        present = read_exports(self.qm) or {}
        for export in self.exports:
            if export in present:
                remove_export(self.qm, export, force=True)
        self.exports = []
        super().undo()
        if self.server:
            try:
                self.qm.change("nbd-server-stop")
            except QMPCommandError:
                pass
            self.server = False
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


class GuestFreeze:
    """Freezes the guest's file systems through the QEMU guest agent for the instant a backup starts."""

    def __init__(self, path, timeout, warnings):
        self.path = path
        self.timeout = timeout
        self.warnings = warnings
        self.client = None

    def __enter__(self):
        if not self.path:
            return self
        self.client = QMPClient(socket_path=self.path, timeout=self.timeout, protocol="guest-agent")
        self.client.connect()
        self.client.execute("guest-fsfreeze-freeze")
        return self

    def __exit__(self, *exc):
        if self.client is None:
            return False
        try:
            self.client.execute("guest-fsfreeze-thaw")
        except QMPError as error:
            self.warnings.append("thawing the guest's file systems failed: %s" % error)
        finally:
            self.client.close()
        return False
