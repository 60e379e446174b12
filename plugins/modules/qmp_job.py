#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_job
short_description: Wait for, complete, pause, resume, cancel or dismiss a QEMU job
version_added: 0.1.0
description:
  - Brings one QEMU job (a backup, mirror, commit, stream, image creation, ...) to the wanted
    state and waits for it, following QEMU's job events with polling as the fallback.
  - The modules of this collection start every job with C(auto-dismiss) off, so a finished
    job stays in QEMU, with its error if it failed, until it is dismissed with O(state=absent).
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  id:
    description:
      - The job id.
    type: str
    required: true
  state:
    description:
      - V(concluded) waits until the job has ended, and fails with QEMU's error text when it
        ended with an error. A job waiting to be finalized (started with C(auto-finalize) off)
        is finalized first.
      - V(ready) waits until a mirror or active commit job is ready to be completed (its
        target holds the same data as its source and follows new writes).
      - V(completed) completes a job. A ready mirror or commit job pivots to its target
        (waiting for it to become ready first); any other job is waited on until it ends.
        Fails with QEMU's error text when the job failed.
      - V(cancelled) cancels a running job and waits until it has ended. A job that already
        ended is unchanged.
      - V(paused) and V(running) pause and resume a job.
      - V(absent) dismisses a job that has ended, so QEMU forgets it (and its id can be used
        again). A job that is still running fails; cancel it or wait for it first.
    type: str
    choices: [concluded, ready, completed, cancelled, paused, running, absent]
    default: concluded
  force:
    description:
      - With O(state=cancelled), V(false) lets a mirror that is ready copy what is still in flight and end without
        switching the device to its target (C(block-job-cancel) with C(force=false)), so the target is a
        consistent copy, as the last step of moving storage. V(true) stops any job at once.
    type: bool
    default: true
notes:
  - O(wait_timeout) (by default O(timeout)) is how long the module waits for the job. When it passes,
    the module fails and the job goes on; run the module again to wait longer.
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Wait up to an hour for a backup job and fail with QEMU's error if it failed
  qemu.qmp.qmp_job:
    socket: /run/qemu/vm1.qmp
    id: backup-disk0
    state: concluded
    wait_timeout: 3600
  register: backup_job

- name: Show how much it copied
  ansible.builtin.debug:
    msg: "{{ backup_job.job.current }} of {{ backup_job.job.total }} bytes in {{ backup_job.waited }}s"

- name: Forget the finished job
  qemu.qmp.qmp_job:
    socket: /run/qemu/vm1.qmp
    id: backup-disk0
    state: absent
"""

RETURN = r"""
job:
  description:
    - The job as QEMU reports it afterwards (before, in check mode); null when QEMU has no such job.
  returned: always
  type: dict
  contains:
    id:
      description: Job id.
      type: str
    type:
      description: Job type, for example V(backup) or V(mirror).
      type: str
    status:
      description: Job status, for example V(running), V(ready) or V(concluded).
      type: str
    current:
      description: Progress so far, in the job's units (bytes for block jobs).
      type: int
    total:
      description: Estimated total, in the same units.
      type: int
    error:
      description: QEMU's error text when the job failed (V(Operation canceled) when it was cancelled), else null.
      type: str
  sample: {"id": "backup-disk0", "type": "backup", "status": "concluded", "current": 1073741824, "total": 1073741824, "error": null}
progress:
  description: Percent done (current over total), when QEMU gives a total.
  returned: when QEMU has the job
  type: float
  sample: 100.0
waited:
  description: Seconds the module waited for the job (0 when it did not have to).
  returned: when O(state) is V(concluded), V(ready), V(completed) or V(cancelled)
  type: float
  sample: 12.5
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent. A query sent
      several times in a row while waiting is listed once, with C(repeated) giving the count.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "query-jobs", "repeated": 12}, {"execute": "job-dismiss", "arguments": {"id": "backup-disk0"}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "Job 'backup-disk0' in state 'running' cannot accept command verb 'dismiss'"}
"""

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_jobs import (
    COMPLETABLE_TYPES,
    ENDED,
    JobWaiter,
    JobWaitTimeout,
    job_command,
    progress_percent,
    read_job,
)

PAUSED = frozenset(["paused", "standby"])
WAITING_STATES = frozenset(["concluded", "ready", "completed", "cancelled"])
READY = frozenset(["ready"])


class JobPlan:
    """Reads the job, acts on it and waits, reporting failures with the job's state."""

    def __init__(self, qm):
        self.qm = qm
        self.job_id = qm.params["id"]
        self.waiter = JobWaiter(qm)
        self.waited = None

    def read(self):
        return read_job(self.qm.query, self.qm.schema, self.job_id)

    def act(self, verb):
        command, arguments = job_command(self.qm.schema, verb, self.job_id)
        self.qm.change(command, arguments)

    def wait(self, statuses):
        if self.qm.check_mode:
            return self.read()  # waiting changes nothing; check mode only reports
        try:
            jobs, waited = self.waiter.wait_status(self.job_id, statuses, self.qm.wait_timeout)
        except JobWaitTimeout as exc:
            self.waited = exc.waited
            job = exc.jobs[self.job_id]
            self.fail("job %s did not reach %s within wait_timeout=%gs (it is %s%s); it goes on"
                      % (self.job_id, "concluded" if statuses == ENDED else "/".join(sorted(statuses)),
                         self.qm.wait_timeout, job["status"], _progress_text(job)), job)
        self.waited = (self.waited or 0) + waited
        return self.read()

    def fail(self, msg, job):
        result = {"job": job}
        if self.waited is not None:
            result["waited"] = self.waited
        self.qm.fail(msg, **result)

    def fail_if_error(self, job):
        if job is not None and job["status"] in ENDED and job.get("error"):
            self.fail("job %s failed: %s" % (self.job_id, job["error"]), job)


def _progress_text(job):
    percent = progress_percent(job)
    return "" if percent is None else ", %s%% done" % percent


def ensure(plan, wanted, job):
    """Act towards `wanted` and wait; returns the job afterwards."""
    status = job["status"]
    if wanted == "concluded":
        if status in ENDED:
            return job
        if status == "pending":
            plan.act("finalize")
        return plan.wait(ENDED)

    if wanted == "ready":
        if status not in ENDED:
            job = plan.wait(READY)
        if job["status"] in ENDED:
            plan.fail_if_error(job)
            plan.fail("job %s has ended (%s) without becoming ready" % (plan.job_id, job["status"]), job)
        return job

    if wanted == "completed":
        if status in ENDED:
            return job
        if job["type"] in COMPLETABLE_TYPES:
            if status != "ready" and not plan.qm.check_mode:
                job = plan.wait(READY)
                if job["status"] in ENDED:
                    return job
            plan.act("complete")
        return plan.wait(ENDED)

    if wanted == "cancelled":
        if status in ENDED:
            return job
        plan.act("cancel" if plan.qm.params["force"] or status != "ready" else "soft-cancel")
        return plan.wait(ENDED)

    if wanted in ("paused", "running"):
        if status in ENDED:
            plan.fail("job %s has ended (%s): it cannot be %s" % (plan.job_id, status, wanted), job)
        if (status in PAUSED) == (wanted == "paused"):
            return job
        plan.act("pause" if wanted == "paused" else "resume")
        return job if plan.qm.check_mode else plan.read()

    # absent
    if status not in ENDED:
        plan.fail("job %s is %s: cancel it (state=cancelled) or wait until it ends (state=concluded) "
                  "before dismissing it" % (plan.job_id, status), job)
    plan.act("dismiss")
    return None if not plan.qm.check_mode else job


def main():
    qm = QMPModule(
        argument_spec=dict(
            id=dict(type="str", required=True),
            state=dict(type="str", default="concluded",
                       choices=["concluded", "ready", "completed", "cancelled", "paused", "running", "absent"]),
            force=dict(type="bool", default=True),
        ),
    )
    wanted = qm.params["state"]
    with qm.connected():
        plan = JobPlan(qm)
        before = plan.read()
        if before is None:
            if wanted == "absent":
                qm.exit(job=None, before={"job": None}, after={"job": None})
            qm.fail("QEMU has no job %s (it never started, or it was dismissed)" % plan.job_id, job=None)
        after = ensure(plan, wanted, before)
        if wanted in ("concluded", "completed"):
            plan.fail_if_error(after)
    result = {"job": after}
    if after is not None and progress_percent(after) is not None:
        result["progress"] = progress_percent(after)
    if plan.waited is not None or wanted in WAITING_STATES:
        result["waited"] = plan.waited or 0.0
    state_before = {"status": before["status"]}
    state_after = {"status": after["status"] if after else "absent"}
    if qm.check_mode and qm.changed:
        state_after = {"status": {"absent": "absent", "paused": "paused", "running": "running"}.get(
            wanted, "concluded")}
    qm.exit(before=state_before, after=state_after, **result)


if __name__ == "__main__":
    main()
