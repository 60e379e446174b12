# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""QEMU jobs: reading them, acting on them, and one waiter every module shares.

The waiter follows JOB_STATUS_CHANGE and BLOCK_JOB_* events and re-reads the
job's state on each event, polling as the fallback, so it neither misses an
event that came before it started waiting nor hangs on one that never comes.
Every module of the collection starts its jobs with auto-dismiss off, so a
job's error stays readable until a module has read it.
"""

from __future__ import annotations

import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPTimeoutError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import normalise_job

ENDED = frozenset(["concluded", "null"])
JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_READY",
              "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING")
# Job types that reach `ready` and wait to be completed.
COMPLETABLE_TYPES = frozenset(["mirror", "commit"])


class JobWaitTimeout(Exception):
    def __init__(self, jobs, waited):
        super().__init__("timed out")
        self.jobs = jobs
        self.waited = waited


def event_job_id(event):
    data = event.get("data", {})
    return data.get("id", data.get("device"))


def read_jobs_by_id(query, schema):
    """{id: normalised job} of every job QEMU knows.

    Uses query-jobs alone where QEMU has it (its status covers what a waiter
    needs); older QEMUs have only query-block-jobs.
    """
    if schema.feature("query_jobs"):
        return dict((job["id"], normalise_job(job)) for job in query("query-jobs"))
    return dict((job["device"], normalise_job(None, job)) for job in query("query-block-jobs"))


def read_job(query, schema, job_id):
    """One job with its block-job details (ready, speed, ...), or None."""
    jobs = read_jobs_by_id(query, schema)
    if job_id not in jobs:
        return None
    if schema.feature("query_jobs"):
        for block_job in query("query-block-jobs"):
            if block_job["device"] == job_id:
                job = dict(jobs[job_id])
                job.update(normalise_job(None, block_job))
                # query-jobs' view of these is the current one.
                for key in ("status", "current", "total", "error", "type", "id"):
                    job[key] = jobs[job_id][key]
                return job
    return jobs[job_id]


def job_command(schema, verb, job_id):
    """(command, arguments) for a job verb: the job-* command where QEMU has it,
    else the older block-job-* one. `soft-cancel` ends a ready mirror without
    switching to its target, after it copied what was in flight."""
    if verb == "soft-cancel":
        return "block-job-cancel", {"device": job_id, "force": False}
    if schema.has_command("job-" + verb):
        return "job-" + verb, {"id": job_id}
    if verb in ("dismiss", "finalize"):
        return "block-job-" + verb, {"id": job_id}
    if verb == "cancel":
        return "block-job-cancel", {"device": job_id, "force": True}
    return "block-job-" + verb, {"device": job_id}


def progress_percent(job):
    if not job or not job.get("total"):
        return None
    return round(100.0 * (job.get("current") or 0) / job["total"], 1)


class JobWaiter:
    """Waits until jobs reach a wanted state, or end, or a timeout passes."""

    def __init__(self, qm, poll_interval=1.0):
        self.qm = qm
        self.poll_interval = poll_interval
        # When each job was seen to end: QEMU's event timestamp where one came.
        self.ended_at = {}

    def wait(self, job_ids, until, timeout, on_poll=None):
        """Wait until `until(job)` holds for every job in job_ids, or it ended.

        Returns ({id: job or None}, seconds waited). A job that vanished is
        None. Raises JobWaitTimeout with the last view of the jobs.
        `on_poll(jobs)` sees each reading of the jobs while they go on (to
        show progress, or to stop waiting by raising).
        """
        job_ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        wanted = frozenset(job_ids)
        start = time.monotonic()
        deadline = start + timeout
        while True:
            known = read_jobs_by_id(self.qm.query, self.qm.schema)
            jobs = dict((job_id, known.get(job_id)) for job_id in job_ids)
            for job_id, job in jobs.items():
                if job is not None and job["status"] in ENDED:
                    self.ended_at.setdefault(job_id, time.time())
            if all(job is None or job["status"] in ENDED or until(job) for job in jobs.values()):
                return jobs, round(time.monotonic() - start, 3)
            if on_poll is not None:
                on_poll(jobs)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobWaitTimeout(jobs, round(time.monotonic() - start, 3))
            try:
                event = self.qm.client.wait_for_event(
                    JOB_EVENTS, match=lambda event: event_job_id(event) in wanted,
                    timeout=min(self.poll_interval, remaining))
            except QMPTimeoutError:
                continue  # poll again
            if event.get("data", {}).get("status") == "concluded" and "timestamp" in event:
                stamp = event["timestamp"]
                self.ended_at[event_job_id(event)] = stamp["seconds"] + stamp["microseconds"] / 1e6

    def wait_status(self, job_ids, statuses, timeout, on_poll=None):
        statuses = frozenset(statuses)
        return self.wait(job_ids, lambda job: job["status"] in statuses, timeout, on_poll)
