#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_backup
short_description: Back up disks of a running QEMU, full, incremental or differential
version_added: 0.1.0
description:
  - Takes one backup across one or more disks of a VM into target nodes that already exist (see
    C(qemu.qmp.qmp_blockdev)), with QEMU's C(blockdev-backup) jobs started in one C(transaction), so
    every disk is copied as it was at the same instant.
  - With several disks the jobs complete as a group (C(completion-mode=grouped)), so either every
    disk's job succeeds or none of them changes its bitmap.
  - A failed or cancelled backup leaves every bitmap able to retry (incremental backups use
    C(bitmap-mode=on-success)), removes the bitmaps it anchored, and fails with QEMU's error for
    each disk.
  - This module is an action, not a state. Each run that starts jobs takes a new backup. A run
    that finds this backup's jobs already in QEMU (the same job ids, started with O(state=started)
    and not dismissed yet) follows and finishes those instead of starting again.
  - The C(qemu.qmp.backup) role builds backup chains, manifests and restores on top of this module.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
options:
  mode:
    description:
      - V(full) copies everything. Giving O(bitmap) re-anchors that existing bitmap at this backup,
        once it succeeded; O(anchor_bitmaps) starts new ones.
      - V(incremental) copies what O(bitmap) marks, and clears those bits only when the backup
        succeeded, so the next incremental starts where this one did.
      - V(differential) copies what O(bitmap) marks and leaves it as it is (use a bitmap anchored at
        the last full backup).
    type: str
    choices: [full, incremental, differential]
    required: true
  disks:
    description:
      - The disks to back up together.
    type: list
    elements: dict
    required: true
    suboptions:
      node:
        description: The disk's block node (the source).
        type: str
        required: true
      target:
        description: The target node, already added (for example with C(qemu.qmp.qmp_blockdev)).
        type: str
        required: true
      job_id:
        description: The backup job's id. Default C(backup-NODE).
        type: str
  bitmap:
    description:
      - The dirty bitmap, on every disk's node. Required with O(mode=incremental) and O(mode=differential).
    type: str
  anchor_bitmaps:
    description:
      - Bitmaps to add to every disk's node as the backup starts, so they track what changes after this
        backup (for example the bitmap of a new chain, and one that differential backups use). They are
        removed again when the backup fails. A bitmap of that name must not exist yet.
      - They are added just before the jobs start; a write in that short moment is copied again by the
        next backup, never missed.
    type: list
    elements: str
    default: []
  anchor_persistent:
    description: Make the anchored bitmaps persistent (stored in the qcow2 image, so they survive a restart).
    type: bool
    default: true
  anchor_granularity:
    description: Granularity of the anchored bitmaps in bytes. Default QEMU's choice (the image's cluster size).
    type: int
  state:
    description:
      - V(completed) starts the backup (unless its jobs already exist), waits up to O(wait_timeout) seconds until
        every job ended, dismisses the jobs, and fails with QEMU's error when a job failed.
      - V(started) starts the backup (unless its jobs already exist), waits up to O(poll) seconds, and reports
        each disk's progress without finishing. Run it again to follow the backup, then run the module with
        V(completed) to finish it.
    type: str
    choices: [completed, started]
    default: completed
  poll:
    description: With O(state=started), seconds to wait for the jobs before reporting their progress.
    type: float
    default: 0
  speed:
    description: Limit each job to this many bytes per second. Default no limit.
    type: int
  perf:
    description:
      - The backup jobs' performance options (QEMU's C(x-perf) of C(blockdev-backup), for example
        C(max-workers) and C(max-chunk)), used where QEMU has them and ignored elsewhere.
    type: dict
  compress:
    description: Write compressed clusters into the target (qcow2 targets only).
    type: bool
    default: false
  pull:
    description:
      - Serve a point-in-time view for a pull-mode backup instead of copying. Each disk's O(disks[].target) is a
        fleece overlay (a qcow2 whose backing is the disk's node); QEMU keeps the disk's old data in it as the
        guest writes (a C(sync=none) job). Export the targets with C(qemu.qmp.qmp_nbd) and read them.
      - With O(mode=incremental), O(bitmap) is frozen at the same instant and new O(anchor_bitmaps) start
        recording; RV(export_bitmap) is the bitmap to export. With O(mode=differential) a frozen copy of
        O(bitmap) is exported instead.
      - O(state=started) starts this. O(state=completed) stops it; with O(pulled=true) the frozen bitmap is
        dropped, else it is merged back with what was written since, so the next backup copies it all again.
    type: bool
    default: false
  pulled:
    description: With O(pull) and O(state=completed), whether the reader copied everything.
    type: bool
    default: false
attributes:
  check_mode:
    description: Checks the disks and bitmaps and validates the transaction against QEMU's schema, without starting it.
    support: full
  diff_mode:
    description: A backup has no before and after to show.
    support: none
notes:
  - O(wait_timeout) (by default O(timeout)) with O(state=completed) is how long the module waits for the jobs.
    When it passes, the module fails and the backup goes on; run it again to wait longer.
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Full backup of disk0 into target0, starting a new chain of incremental backups
  qemu.qmp.qmp_backup:
    socket: /run/qemu/vm1.qmp
    mode: full
    disks:
      - {node: disk0, target: target0}
    anchor_bitmaps: [chain1]
  register: full_backup

- name: Show how much was copied
  ansible.builtin.debug:
    msg: "{{ full_backup.disks[0].bytes }} bytes in {{ full_backup.disks[0].duration }}s"

- name: After the guest wrote, an incremental backup into target1 (a qcow2 backed by the full)
  qemu.qmp.qmp_backup:
    socket: /run/qemu/vm1.qmp
    mode: incremental
    bitmap: chain1
    disks:
      - {node: disk0, target: target1}
"""

RETURN = r"""
disks:
  description: Each disk's backup.
  returned: always
  type: list
  elements: dict
  contains:
    node:
      description: The source node.
      type: str
    target:
      description: The target node.
      type: str
    job_id:
      description: The job's id.
      type: str
    result:
      description: V(success), V(failed), V(cancelled) (another disk's job failed), or V(running).
      type: str
    error:
      description: QEMU's error text when the job failed.
      type: str
    bytes:
      description: Bytes copied so far.
      type: int
    total:
      description: Bytes the job has to copy.
      type: int
    percent:
      description: Percent done.
      type: float
    rate:
      description: Bytes per second (over the poll with O(state=started), over the whole job when it ended).
      type: int
    duration:
      description: Seconds from the start of the backup until the job ended, when this run started it.
      type: float
  sample: [{"node": "disk0", "target": "target0", "job_id": "backup-disk0", "result": "success", "error": null,
            "bytes": 1073741824, "total": 1073741824, "percent": 100.0, "rate": 402653184, "duration": 2.667}]
started:
  description: Whether this run started the backup (false when it found its jobs already in QEMU).
  returned: always
  type: bool
finished:
  description: Whether every job has ended (and, with O(state=completed), was dismissed).
  returned: always
  type: bool
anchor_bitmaps:
  description: The bitmaps this backup anchored; removed again when it failed.
  returned: always
  type: list
  elements: str
export_bitmap:
  description: With O(pull), the frozen bitmap to export to the reader (null for a full backup).
  returned: with O(pull)
  type: str
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent. A query sent
      several times in a row while waiting is listed once, with C(repeated) giving the count.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "transaction", "arguments": {"actions": []}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "Bitmap 'chain1' is currently in use by another operation"}
"""

import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_backup import BackupError, BackupRun
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule


def main():
    qm = QMPModule(
        argument_spec=dict(
            mode=dict(type="str", required=True, choices=["full", "incremental", "differential"]),
            disks=dict(type="list", elements="dict", required=True, options=dict(
                node=dict(type="str", required=True),
                target=dict(type="str", required=True),
                job_id=dict(type="str"),
            )),
            bitmap=dict(type="str"),
            anchor_bitmaps=dict(type="list", elements="str", default=[]),
            anchor_persistent=dict(type="bool", default=True),
            anchor_granularity=dict(type="int"),
            state=dict(type="str", default="completed", choices=["completed", "started"]),
            poll=dict(type="float", default=0),
            speed=dict(type="int"),
            perf=dict(type="dict"),
            compress=dict(type="bool", default=False),
            pull=dict(type="bool", default=False),
            pulled=dict(type="bool", default=False),
        ),
        required_if=[("mode", "incremental", ["bitmap"]), ("mode", "differential", ["bitmap"])],
    )
    params = qm.params
    if not params["disks"]:
        qm.fail("disks is empty: name at least one disk to back up")
    run = BackupRun(qm, params["mode"], params["disks"], bitmap=params["bitmap"], anchors=params["anchor_bitmaps"],
                    anchor_persistent=params["anchor_persistent"], anchor_granularity=params["anchor_granularity"],
                    speed=params["speed"], perf=params["perf"], compress=params["compress"], pull=params["pull"])
    result = {"anchor_bitmaps": run.anchors, "started": False, "finished": False}
    if params["pull"]:
        result["export_bitmap"] = run.export_bitmap
    with qm.connected():
        try:
            if params["pull"] and params["state"] == "completed":
                result["disks"] = run.finish_pull(params["pulled"])
                result["finished"] = True
                qm.exit(**result)
            if not run.started():
                run.check()
                run.start()
                result["started"] = True
            if qm.check_mode or params["pull"]:
                # Nothing to wait for: check mode started nothing, and a pull's jobs run until stopped.
                qm.exit(disks=run.report(run.jobs()), **result)
            if params["state"] == "started":
                before = run.jobs()
                begin = time.monotonic()
                jobs, ended = run.wait(params["poll"])
                result["finished"] = ended
                qm.exit(disks=run.report(jobs, time.monotonic() - begin, before), **result)
            jobs, ended = run.wait(qm.wait_timeout)
            if not ended:
                qm.fail("the backup did not end within wait_timeout=%gs; it goes on (run this again to wait "
                        "longer)" % qm.wait_timeout, disks=run.report(jobs), **result)
            result["disks"] = run.finish(jobs)
            result["finished"] = True
        except BackupError as exc:
            qm.fail(str(exc), disks=exc.disks, **result)
    qm.exit(**result)


if __name__ == "__main__":
    main()
