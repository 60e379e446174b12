# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A live migration's steps on each host, each on one QMP connection.

`Incoming` prepares a destination QEMU started with `-incoming defer`: the
same capabilities and parameters as the source, a writable NBD export of
each disk to copy (on the address the source reaches, under names of this
migration), and the migration listener on that address.

`Outgoing` runs the whole migration on the source, as one detached run that
the controller follows: it mirrors the disks into the destination's exports,
starts the migration, follows it (progress on each poll, the convergence
policy applied as passes go by), and does the switch-over itself. From
`pre-switchover`, where QEMU holds the guest stopped, it completes the
mirrors and continues the migration in the same process: no Ansible task
runs while the guest is paused. Any failure before the hand-over undoes what
it did and leaves the VM running on the source. Its message says where the VM
runs then, as read from the source (its run state, its migration's state, and
whether its process still lives), never as assumed.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time

from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import Abandoned
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError, QMPError, QMPTimeoutError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_jobs import JobWaitTimeout, JobWaiter, read_jobs_by_id
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_migration import (
    ACTIVE, MIGRATION_EVENTS, MigrationError, as_boolean, configure, listening_address, read_info, uri_matches)
from ansible_collections.qemu.qmp.plugins.module_utils import qmp_nbd
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_status

CONVERGE_POLICIES = ("cancel", "downtime", "postcopy", "auto-converge")
MIRROR_JOB = "qemu-qmp-mirror-%s"
COPY_NODE = "qemu-qmp-copy-%s"
# How long the mirrors may take to finish once the guest is paused, before the migration is given up.
SWITCH_OVER_TIMEOUT = 60.0
MiB = 1024 * 1024


def human_bytes(count):
    count = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return ("%d %s" % (count, unit)) if unit == "B" else ("%.1f %s" % (count, unit))
        count /= 1024
    return "%d B" % count  # pragma: no cover


def split_tcp_uri(uri):
    """(host, port) of tcp:HOST:PORT, or None for any other URI."""
    kind, dummy, rest = uri.partition(":")
    if kind != "tcp":
        return None
    host, dummy, port = rest.rpartition(":")
    return host.strip("[]"), port.split(",")[0]


def refuse_any_address(host, what):
    if host in ("", "0.0.0.0", "::", "[::]"):
        raise MigrationError("%s would listen on every address (%r): give the address the source reaches "
                             "this host at" % (what, host))


def free_port(host):
    """A TCP port free on `host` now (the kernel's choice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def listening_tcp_ports(pid):
    """{(host, port)} of the TCP sockets process `pid` listens on, from /proc (QEMU does not report its NBD
    server's address)."""
    inodes = set()
    try:
        for name in os.listdir("/proc/%d/fd" % pid):
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, name))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(table, encoding="ascii") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != "0A" or fields[9] not in inodes:
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc shows each 32-bit word in host order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
            found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def set_tls(parameters, schema, tls_creds, tls_hostname=None):
    """The migration parameters for TLS on (the credentials' id) or off (empty), where QEMU has them."""
    parameters = dict(parameters)
    if schema.has_argument("migrate-set-parameters", "tls-creds"):
        parameters["tls-creds"] = tls_creds or ""
    elif tls_creds:
        raise MigrationError("this QEMU cannot encrypt migrations (no tls-creds migration parameter)")
    if tls_hostname and tls_creds:
        parameters["tls-hostname"] = tls_hostname
    return parameters


def capabilities_for(converge, capabilities, copies, side):
    """The capabilities of one side: the user's, with what the policy and the disk copies need."""
    capabilities = dict((name, as_boolean("capability " + name, state)) for name, state in capabilities.items())
    if converge == "postcopy":
        # QEMU sends RAM over several connections (multifd) or switches to post-copy, not both.
        capabilities.update({"postcopy-ram": True, "multifd": False})
    if converge == "auto-converge" and side == "source":
        capabilities["auto-converge"] = True
    if copies and side == "source":
        capabilities["pause-before-switchover"] = True
    return capabilities


class Incoming:
    """The destination's side: exports for the disk copies, then the listener."""

    def __init__(self, qm, listen_uri, exports, nbd_address, tls_creds, capabilities, parameters):
        self.qm = qm
        self.listen_uri = listen_uri
        self.exports = exports  # [{"node": node name, "name": export name}]
        self.nbd_address = dict(nbd_address or {})
        self.tls_creds = tls_creds
        self.capabilities = capabilities
        self.parameters = parameters

    def prepare(self):
        qm = self.qm
        status = read_status(qm.query)["status"]
        listening = listening_address(read_info(qm))
        if status != "inmigrate":
            raise MigrationError("the destination QEMU is %s, not waiting for an incoming migration: start it "
                                 "with -incoming defer (the qemu.qmp.vm role's vm_incoming)" % status)
        # Addresses are checked before anything changes.
        tcp = split_tcp_uri(self.listen_uri)
        if tcp is not None and listening is None:
            refuse_any_address(tcp[0], "the migration listener")
        if self.exports and self.nbd_address.get("type") == "inet":
            refuse_any_address(self.nbd_address.get("host", ""), "the NBD server of the disk copies")
        if listening is not None and not self._listens_as_asked(listening):
            raise MigrationError("the destination already listens on %s, not %s" % (listening, self.listen_uri))
        before, after, changed = configure(qm, self.capabilities,
                                           set_tls(self.parameters, qm.schema, self.tls_creds))
        nbd = self._serve_disks() if self.exports else None
        if listening is None:
            qm.change("migrate-incoming", {"uri": self.listen_uri})
            listening = None if qm.check_mode else listening_address(read_info(qm))
        return {"listening": listening, "uri": self._source_uri(listening), "nbd": nbd,
                "configured": {"before": before, "after": after, "changed": changed}}

    def _listens_as_asked(self, listening):
        tcp = split_tcp_uri(self.listen_uri)
        if tcp is not None and tcp[1] == "0":  # any port the kernel chose, on that address
            return listening.get("type") == "inet" and listening.get("host") == tcp[0]
        return uri_matches(self.listen_uri, listening)

    def _source_uri(self, listening):
        if listening is None:
            return self.listen_uri
        if listening.get("type") == "unix":
            return "unix:" + listening["path"]
        host = listening["host"]
        return "tcp:%s:%s" % ("[%s]" % host if ":" in host else host, listening["port"])

    def _serve_disks(self):
        qm = self.qm
        address = self.nbd_address
        exports = qmp_nbd.read_exports(qm) or {}
        missing = [e for e in self.exports if e["name"] not in exports]
        if exports:
            address = self._running_server(address)
        else:
            address = self._start_server(address)
        for export in missing:
            qmp_nbd.add_export(qm, export["name"], export["node"], writable=True)
        return {"address": address, "exports": [e["name"] for e in self.exports]}

    def _running_server(self, address):
        """The address of the NBD server that already runs (a second call): the port the kernel chose is read
        from the sockets QEMU listens on."""
        if address.get("type") != "inet" or str(address.get("port", "0")) not in ("0", ""):
            return address
        pid = self.qm.client.peer_pid()
        migration = listening_address(read_info(self.qm)) or {}
        ports = sorted(port for host, port in listening_tcp_ports(pid) if host == address["host"]
                       and str(port) != str(migration.get("port"))) if pid else []
        if len(ports) != 1:
            raise MigrationError("the NBD server of this QEMU already runs, on a port that cannot be told "
                                 "(found %s): give nbd_address a port" % (ports or "none"))
        return dict(address, port=str(ports[0]))

    def _start_server(self, address):
        qm = self.qm
        chosen = str(address.get("port", "0")) if address.get("type") == "inet" else None
        for attempt in range(3):
            if chosen in ("0", ""):
                address["port"] = str(free_port(address["host"]))
            try:
                qmp_nbd.start_server(qm, address, tls_creds=self.tls_creds)
                return address
            except QMPCommandError as exc:
                # A port of the kernel's choice can be taken between the probe and QEMU's bind: try another.
                if chosen in ("0", "") and attempt < 2 and "in use" in exc.desc.lower():
                    continue
                raise MigrationError("the destination cannot serve the disk copies on %s: %s"
                                     % (qmp_nbd.export_uri(address, "") or address, exc.desc))
        return address  # pragma: no cover

    def close(self):
        """Remove this migration's exports, and the NBD server once it serves nothing else."""
        qm = self.qm
        exports = qmp_nbd.read_exports(qm)
        removed = []
        for export in self._expand(self.exports, exports):
            if exports is None or export["name"] in exports:
                try:
                    qmp_nbd.remove_export(qm, export["name"], force=True)
                    removed.append(export["name"])
                except QMPCommandError as exc:
                    if "not found" not in exc.desc.lower() and "no export" not in exc.desc.lower():
                        raise
        left = qmp_nbd.read_exports(qm) if not qm.check_mode else {}
        stopped = False
        if removed and not left:
            try:
                qm.change("nbd-server-stop")
                stopped = True
            except QMPCommandError as exc:
                if "not running" not in exc.desc:
                    raise
        return {"removed_exports": removed, "nbd_server_stopped": stopped,
                "status": read_status(qm.query)["status"], "migration": read_info(qm)["status"]}

    @staticmethod
    def _expand(wanted, exports):
        """The exports to close: a name that ends in `*-NODE` (an earlier run's, whose prefix is not known)
        stands for each export of that node whose name starts as it does and ends in -NODE."""
        out = []
        for export in wanted:
            stem, star, dummy = export["name"].partition("*")
            if not star:
                out.append(export)
                continue
            out.extend({"node": export["node"], "name": name} for name, found in sorted((exports or {}).items())
                       if found["node"] == export["node"] and name.startswith(stem)
                       and name.endswith("-" + export["node"]) and len(name) > len(stem) + len(export["node"]) + 1)
        return out


class Outgoing:
    """The source's side: copies, migration, switch-over, and the undo of it all on failure."""

    def __init__(self, qm, settings, reporter):
        self.qm = qm
        self.s = settings
        self.reporter = reporter
        self.copies = settings["copies"]  # [{"node", "export"}]
        self.jobs = [MIRROR_JOB % copy["node"] for copy in self.copies]
        self.copy_nodes = [COPY_NODE % copy["node"] for copy in self.copies]
        self.was_running = None
        self.policy_steps = []
        self.downtime_limit = settings["downtime_limit"]
        self.postcopy_started = False
        self.paused_ms = None
        self.mirror_ms = None
        self.started = None
        self.source_pid = None

    # -- plan ---------------------------------------------------------------

    def parameters(self):
        parameters = dict(self.s["parameters"])
        parameters["downtime-limit"] = self.s["downtime_limit"]
        return set_tls(parameters, self.qm.schema, self.s["tls_creds"], self.s.get("tls_hostname"))

    def capabilities(self):
        return capabilities_for(self.s["converge"], self.s["capabilities"], self.copies, "source")

    def plan(self):
        """What a run would do, from the source's state (check mode)."""
        status = self._refuse_unless_ready()
        return {"vm_status": status, "uri": self.s["uri"], "copies": [
            {"node": c["node"], "export": c["export"], "server": self.s["nbd_server"]} for c in self.copies],
            "capabilities": self.capabilities(), "parameters": self.parameters(),
            "converge": self.s["converge"], "tls": bool(self.s["tls_creds"])}

    def already_migrated(self):
        """query-migrate's info when this QEMU already handed its VM over (a second run), else None."""
        info = read_info(self.qm)
        if read_status(self.qm.query)["status"] == "postmigrate" and info["status"] == "completed":
            return info
        return None

    def _refuse_unless_ready(self):
        status = read_status(self.qm.query)
        info = read_info(self.qm)
        if info["status"] in ACTIVE:
            raise MigrationError("a migration of this VM is under way (%s): wait for it, or cancel it with "
                                 "qemu.qmp.qmp_migrate state=cancelled" % info["status"])
        if status["status"] not in ("running", "paused", "prelaunch"):
            raise MigrationError("the VM is %s: only a running or paused VM (or one not started yet, prelaunch) can "
                                 "be migrated" % status["status"])
        known = read_jobs_by_id(self.qm.query, self.qm.schema)
        busy = [job_id for job_id in self.jobs if job_id in known]
        if busy:
            raise MigrationError("jobs %s of an earlier migration are still there: dismiss them with "
                                 "qemu.qmp.qmp_job state=absent" % ", ".join(busy))
        return status["status"]

    # -- run ----------------------------------------------------------------

    def run(self):
        qm = self.qm
        self.started = time.monotonic()
        # Which process runs the VM: when its socket breaks, whether the QEMU is gone is read from /proc.
        self.source_pid = qm.client.peer_pid() if qm.client is not None else None
        self.was_running = self._refuse_unless_ready() == "running"
        self.reporter.phase("configuring the migration")
        configure(qm, self.capabilities(), self.parameters())
        try:
            if self.copies:
                self._start_copies()
            self.reporter.phase("migrating to %s" % self.s["uri"])
            qm.change("migrate", {"uri": self.s["uri"]})
            info = self._follow()
        except (QMPError, Abandoned) as exc:
            self.reporter.can_abandon = False
            undone, where = self._roll_back()
            raise MigrationError("%s; %s" % (exc, undone), **dict(getattr(exc, "details", None) or {},
                                                                  policy_steps=self.policy_steps,
                                                                  source_pid=self.source_pid, vm_runs=where))
        self.reporter.can_abandon = False
        self._drop_copies()
        return self._result(info)

    def _result(self, info):
        ram = info.get("ram") or {}
        return {"changed": True, "status": info["status"], "uri": self.s["uri"],
                "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
                "setup_time_ms": info.get("setup-time"), "paused_before_switchover_ms": self.paused_ms,
                "mirror_finish_ms": self.mirror_ms, "transferred": ram.get("transferred"),
                "passes": ram.get("dirty-sync-count"), "postcopy": self.postcopy_started,
                "downtime_limit_ms": self.downtime_limit, "policy_steps": self.policy_steps,
                "copied_disks": [c["node"] for c in self.copies], "tls": bool(self.s["tls_creds"]),
                "seconds": round(time.monotonic() - self.started, 3), "info": info}

    # -- disk copies ----------------------------------------------------------

    def _start_copies(self):
        qm = self.qm
        self.reporter.phase("copying %d disk(s) to %s" % (len(self.copies), self.s["uri"]))
        for copy, job_id, node in zip(self.copies, self.jobs, self.copy_nodes):
            options = {"driver": "nbd", "node-name": node, "server": self.s["nbd_server"], "export": copy["export"]}
            if self.s["tls_creds"]:
                options["tls-creds"] = self.s["tls_creds"]
            qm.change("blockdev-add", options)
            arguments = {"job-id": job_id, "device": copy["node"], "target": node, "sync": "full",
                         "auto-dismiss": False}
            if self.s.get("copy_speed"):
                arguments["speed"] = self.s["copy_speed"]
            qm.change("blockdev-mirror", arguments)

        def show(jobs):
            done = sum(job.get("current-progress", 0) for job in jobs.values() if job)
            total = sum(job.get("total-progress", 0) for job in jobs.values() if job)
            self.reporter.progress("copying disks: %s of %s (%d%%)" % (
                human_bytes(done), human_bytes(total), 100 * done // total if total else 0))
            self._check_deadline("the disk copies")

        try:
            jobs, dummy = JobWaiter(qm, self.s["poll_interval"]).wait_status(
                self.jobs, ["ready"], self._left(), on_poll=show)
        except JobWaitTimeout:
            raise MigrationError("the disk copies were not in step within the migration's timeout")
        failed = dict((job_id, (job or {}).get("error") or "ended before it was in step")
                      for job_id, job in jobs.items() if job is None or job["status"] != "ready")
        if failed:
            raise MigrationError("a disk copy failed: %s" % "; ".join(
                "%s: %s" % item for item in sorted(failed.items())), copy_errors=failed)

    def _finish_copies(self):
        """With the guest paused: let each mirror copy what is still in flight and end."""
        qm = self.qm
        started = time.monotonic()
        for job_id in self.jobs:
            qm.change("block-job-cancel", {"device": job_id})  # ready, not forced: completes the copy
        try:
            jobs, dummy = JobWaiter(qm, 0.05).wait_status(self.jobs, ["concluded", "null"], SWITCH_OVER_TIMEOUT)
        except JobWaitTimeout:
            raise MigrationError("the disk copies did not finish within %ds of the guest's pause"
                                 % SWITCH_OVER_TIMEOUT)
        failed = dict((job_id, job["error"]) for job_id, job in jobs.items() if job and job.get("error"))
        if failed:
            raise MigrationError("a disk copy failed at the switch-over: %s" % "; ".join(
                "%s: %s" % item for item in sorted(failed.items())), copy_errors=failed)
        self.mirror_ms = round((time.monotonic() - started) * 1000, 1)

    def _drop_copies(self, force=False):
        """Dismiss the mirror jobs and remove the NBD client nodes (all that exist)."""
        qm = self.qm
        jobs = read_jobs_by_id(qm.query, qm.schema)
        for job_id in self.jobs:
            job = jobs.get(job_id)
            if job is None:
                continue
            if job["status"] not in ("concluded", "null"):
                qm.change("block-job-cancel", {"device": job_id, "force": True} if force else {"device": job_id})
                try:
                    JobWaiter(qm, 0.2).wait_status([job_id], ["concluded", "null"], 30)
                except JobWaitTimeout:
                    continue
            qm.change("job-dismiss", {"id": job_id})
        nodes = set(n.get("node-name") for n in qm.query("query-named-block-nodes", {"flat": True}))
        for node in self.copy_nodes:
            if node in nodes:
                qm.change("blockdev-del", {"node-name": node})

    # -- following ------------------------------------------------------------

    def _left(self):
        return max(0.0, self.s["timeout"] - (time.monotonic() - self.started))

    def _check_deadline(self, what):
        if self._left() <= 0:
            raise MigrationError("%s did not end within the migration's timeout (%ds)%s" % (
                what, self.s["timeout"], "" if self.s["converge"] != "cancel" else
                ": the guest may dirty memory faster than the link carries; choose a convergence policy "
                "(downtime, postcopy, auto-converge)"))

    def _follow(self):
        qm = self.qm
        while True:
            info = read_info(qm)
            status = info["status"]
            if status == "pre-switchover":
                if self.paused_ms is None:
                    self._switch_over()
                else:
                    # migrate-continue only wakes QEMU's migration thread: it leaves this state a moment later
                    self._check_deadline("the switch-over")
                    time.sleep(0.01)
                continue
            if status == "completed":
                return self._settled(info)
            if status in ("failed", "cancelled"):
                raise MigrationError("the migration %s: %s" % (
                    status, info.get("error-desc") or "QEMU gave no reason"), info=info)
            if status in ("postcopy-active", "postcopy-paused", "postcopy-recover"):
                self.reporter.can_abandon = False  # the guest runs on the destination: no way back
            self._converge(info)
            self.reporter.progress(self._line(info))
            if status != "postcopy-active":
                self._check_deadline("the migration")
            try:
                qm.client.wait_for_event(MIGRATION_EVENTS, timeout=min(self.s["poll_interval"], self._left() or 0.1))
            except QMPTimeoutError:
                pass

    def _settled(self, info):
        """QEMU 7.2 can report `completed` before it filled in its times: ask again briefly."""
        deadline = time.monotonic() + 3
        while not info.get("total-time") and time.monotonic() < deadline:
            time.sleep(0.05)
            info = read_info(self.qm)
        return info

    def _switch_over(self):
        """From pre-switchover (guest stopped) to migrate-continue, in this one process."""
        paused = time.monotonic()
        self.reporter.can_abandon = False
        self._finish_copies()
        self.qm.change("migrate-continue", {"state": "pre-switchover"})
        self.paused_ms = round((time.monotonic() - paused) * 1000, 1)

    def _line(self, info):
        ram = info.get("ram") or {}
        total, remaining = ram.get("total") or 0, ram.get("remaining") or 0
        percent = 100.0 * (total - remaining) / total if total else 0
        passes = ram.get("dirty-sync-count", 0)
        line = "%s: %.0f%% of RAM sent (%s transferred, %s left, pass %s) at %s/s" % (
            info["status"], percent, human_bytes(ram.get("transferred")), human_bytes(remaining),
            passes, human_bytes((ram.get("mbps") or 0) * 1e6 / 8))
        # QEMU estimates the downtime once it has measured how fast the guest dirties its RAM, after the first
        # pass; before, and in states without the field, it has no estimate (during the first pass it reports
        # the limit itself). Without one the line names the limit alone.
        if info.get("expected-downtime") is not None and passes > 1:
            return line + ", expected downtime %d ms (limit %d ms)" % (info["expected-downtime"], self.downtime_limit)
        return line + ", downtime limit %d ms" % self.downtime_limit

    def _converge(self, info):
        """Apply the convergence policy once the migration has made `converge_after_passes` passes."""
        policy = self.s["converge"]
        passes = (info.get("ram") or {}).get("dirty-sync-count", 0)
        if info["status"] != "active" or passes <= self.s["converge_after_passes"]:
            return
        if policy == "postcopy" and not self.postcopy_started:
            self.qm.change("migrate-start-postcopy")
            self.postcopy_started = True
            self.policy_steps.append({"pass": passes, "action": "postcopy"})
        elif policy == "downtime" and self.downtime_limit < self.s["downtime_ceiling"]:
            if self.policy_steps and self.policy_steps[-1]["pass"] >= passes:
                return  # one step per pass
            step = max(1, (self.s["downtime_ceiling"] - self.s["downtime_limit"]) // max(1, self.s["downtime_steps"]))
            self.downtime_limit = min(self.s["downtime_ceiling"], self.downtime_limit + step)
            self.qm.change("migrate-set-parameters", {"downtime-limit": self.downtime_limit})
            self.policy_steps.append({"pass": passes, "action": "downtime-limit", "value": self.downtime_limit})

    # -- undo ---------------------------------------------------------------

    def _roll_back(self):
        """Give the source its VM back. Returns (what is so now, for the message; where the VM runs: `source`,
        `destination`, `both` (post-copy: its memory is split between them), `nowhere` or `unknown`)."""
        qm = self.qm
        try:
            status = read_status(qm.query)
            info = read_info(qm)
            # A QEMU that was a migration's destination itself reports that migration `completed`: only the
            # run state tells that this one handed the VM over.
            if status["status"] == "postmigrate" and not self.postcopy_started:
                return ("the source had handed the VM over (run state %s, migration %s) before this failed: the VM "
                        "runs on the destination (%s) now. Both QEMUs are left as they are, the source stopped, so "
                        "that the VM never runs twice" % (status["status"], info["status"], self.s["uri"]),
                        "destination")
            if self.postcopy_started:
                return ("the migration failed in post-copy (%s), after the guest had started to run on the "
                        "destination (%s): the guest's memory is split between the two QEMUs. Both are left as "
                        "they are (the source %s); QEMU's postcopy recovery (migrate-recover) may still save the "
                        "VM" % (info["status"], self.s["uri"], status["status"]), "both")
            if info["status"] in ACTIVE:
                if info["status"] != "cancelling":
                    qm.change("migrate_cancel")
                deadline = time.monotonic() + 60
                while read_info(qm)["status"] in ACTIVE and time.monotonic() < deadline:
                    try:
                        qm.client.wait_for_event(MIGRATION_EVENTS, timeout=0.5)
                    except QMPTimeoutError:
                        pass
            self._drop_copies(force=True)
            status = read_status(qm.query)
            if self.was_running and not status["running"] and status["status"] not in ("postmigrate", "shutdown"):
                qm.change("cont")
                status = read_status(qm.query)
            if status["status"] in ("running", "paused", "prelaunch"):
                return ("the migration is cancelled%s, and the VM goes on %s on the source" % (
                    " and the disk copies stopped" if self.copies else "", status["status"]), "source")
            return ("the migration is cancelled, and the VM is %s on the source: check it with qemu.qmp.qmp_info"
                    % status["status"], "source")
        except QMPError as exc:
            return self._source_lost("undoing the migration failed too (%s)" % exc)
        except OSError as exc:  # the socket itself broke
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
            return self._source_lost("the connection to the source broke (%s)" % (exc.strerror or exc))

    def _source_lost(self, what):
        """The source's QMP connection is lost: tell from its process whether the QEMU is gone."""
        pid = self.source_pid
        if pid and not process_lives(pid):
            if self.postcopy_started:
                return ("the source QEMU (pid %d) is gone, killed or crashed during post-copy: the destination (%s) "
                        "ran the guest but cannot get the rest of its memory, so the VM is lost" % (pid, self.s["uri"]),
                        "nowhere")
            return ("the source QEMU (pid %d) is gone, killed or crashed, and the VM with it; the migration had not "
                    "completed, so the destination (%s) does not have the VM either: the VM is not running anywhere"
                    % (pid, self.s["uri"]), "nowhere")
        return ("%s; the source QEMU%s still runs, but its state cannot be read: check it with qemu.qmp.qmp_info"
                % (what, " (pid %d)" % pid if pid else ""), "unknown")


def process_lives(pid, wait=2.0):
    """Whether process `pid` lives; one that is ending (its sockets already closed) is given `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open("/proc/%d/stat" % pid, encoding="ascii", errors="replace") as handle:
                state = handle.read().rpartition(")")[2].split()[:1]
        except OSError:
            return False
        if state in (["Z"], ["X"]):
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
