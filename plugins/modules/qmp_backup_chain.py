#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_backup_chain
short_description: Back up a running VM into chains of full, incremental and differential backups; restore and verify them
version_added: 0.1.0
description:
  - The backup engine of the collection, which the C(qemu.qmp.backup) role calls. One run takes a whole
    backup on the host, on one QMP connection, from one instant across all disks, into a chain under
    O(dir). It keeps a catalog of the chains, plans the level, creates the images, runs QEMU's jobs,
    commits the backup (images synced, checked and summed, manifest written last), and cleans up after
    runs that were interrupted.
  - "Layout: O(dir)C(/CHAIN/NNNN-LEVEL/DISK.qcow2) with a manifest C(NNNN-LEVEL.json) beside each backup
    folder. Incremental images are backed by the backup before them, differential images by the full one,
    with relative backing file names, so a chain can be moved or copied whole."
  - B(Never loses a write.) Each backup adds its own dirty bitmap in the transaction that starts its jobs,
    and only reads the bitmap of the backup before. That bitmap is removed only once the new backup is
    committed, so a failure at any step, or a run killed at any instant, leaves the next backup copying
    every write since the last committed one.
  - B(One run per VM at a time.) A backup holds an exclusive lock on O(dir) (C(flock) on C(.lock)) for its
    whole run, restores and verifies a shared one. Another run waits up to O(lock_timeout), then fails
    naming the holder. The run holds the VM's QMP socket for its whole length; give tools a second C(-qmp)
    socket.
  - B(Recovery.) A run first removes what an interrupted one left (the collection's jobs, block nodes, NBD
    exports and server, C(qemu-nbd) processes, the unfinished backup's folder, and bitmaps of O(bitmap_prefix)
    that no chain needs).
  - B(A chain that cannot go on safely starts a new full chain, with a warning), never a wrong incremental.
    That is a bitmap missing, inconsistent, busy or not recording, a disk carrying another backup's bitmap
    (rolled back to an older copy, or replaced), an image missing or of the wrong size, a manifest lost or
    damaged, a chain a verify or a restore found damaged, other disks, or a disk of another size.
  - B(Long runs.) The run goes on in a process of its own on the host. This module's action plugin
    follows it, printing a progress line (percent, bytes, rate, time left) every O(poll_interval) seconds,
    for as long as it takes. When the controller stops following (killed, cancelled, its connection lost)
    for O(controller_timeout) seconds, the run stops and undoes what it did.
  - B(Integrity.) Each image's SHA-256 checksums (one per 64 MiB of the file) go into its manifest.
    O(operation=restore) and O(operation=verify) recompute them and refuse a mismatch, naming the image and
    where it differs; a damaged or missing manifest is never skipped silently.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
options:
  operation:
    description:
      - V(backup) takes a backup of the VM whose QMP socket the connection options give.
      - V(restore) writes one disk at O(point), flattened with the backups it is based on, into O(output), after
        checking the checksums of every image it reads. It needs no QEMU. When O(output) already holds that disk
        at that point, it writes nothing and reports no change (see O(output)).
      - Without O(disk), V(restore) restores every disk of the point (a whole VM), into O(output_dir) or, with
        O(in_place), over the VM's own disks. The result's RV(definition) is the VM's definition the manifest
        carries, with its disks at the restored images, for the C(qemu.qmp.vm) role to start it.
      - V(verify) checks backups without restoring them (manifests, image sizes, checksums, and
        C(qemu-img check) with O(verify)), of every chain, one chain, or one point with what it is based on
        (O(point)). It needs no QEMU and changes nothing, except the record of what was verified (for
        V(catalog)) and the mark of a damaged chain.
      - V(prune) applies O(retention) to the VM's backups, holding the same lock as a backup. It needs no QEMU.
      - V(catalog) lists the chains and their points (level, time, disks, data, when last verified, and with
        O(retention), the rule that keeps each). It changes nothing.
      - V(live_restore) is the second half of a live restore (see O(live)). On the VM that the connection
        options give, it copies into each disk's image what it still reads from the backup (C(block-stream), at
        O(speed)), while the guest runs, until the VM depends on its own images alone. Then it checks the
        backup's checksums. Stopped or failed, the VM goes on running from the backup, and running it again
        resumes the copy.
    type: str
    choices: [backup, restore, verify, prune, catalog, live_restore]
    default: backup
  dir:
    description: The VM's backup folder, holding its chains.
    type: path
    required: true
  name:
    description: The VM's name, recorded in each manifest. Default the last component of O(dir).
    type: str
  disks:
    description: Node names of the disks to back up. Default every disk attached to the VM's devices.
    type: list
    elements: str
    default: []
  level:
    description:
      - V(auto) continues the newest chain with an incremental backup when it safely can, else starts a new
        full chain. V(full), V(incremental) and V(differential) ask for that level; a chain that cannot go on
        gives a full backup with a warning.
    type: str
    choices: [auto, full, incremental, differential]
    default: auto
  mode:
    description:
      - V(push) lets QEMU write the backup into target images (C(blockdev-backup)).
      - V(pull) serves each disk as it was at the backup's instant over QEMU's NBD server (on a unix socket in a
        private folder), with a frozen copy of the dirty bitmap, and reads what changed, as an outside backup
        application would.
    type: str
    choices: [push, pull]
    default: push
  keep_chains:
    description: After a committed backup, delete the oldest chains beyond this many (the chain just written counts).
    type: int
    default: 2
  retention:
    description:
      - Which backups to keep, with the semantics of Proxmox Backup Server's prune options. Each rule covers its
        own period, and they apply in this order, O(retention.keep_last), O(retention.keep_hourly),
        O(retention.keep_daily), O(retention.keep_weekly) (ISO weeks, from Monday), O(retention.keep_monthly),
        O(retention.keep_yearly). In each period only the newest backup counts; periods without a backup do not
        count; a rule does not count the periods an earlier rule already kept a backup in. Periods are in the
        host's local time. Empty, or every rule 0, keeps everything.
      - A backup the policy does not keep is removed. When a later backup is based on it (an incremental chain),
        it is folded into that backup (C(qemu-img commit) into it, then its image takes the later one's place,
        with new checksums), so the backups kept stay restorable and hold what they held, and a chain goes on
        for ever without a new full backup. A full backup with several differentials on it stays, as their base.
        The newest backup always stays, since the next one builds on it.
      - With O(operation=backup), the policy applies after each committed backup (a failure to prune is a
        warning); with O(operation=prune) on its own; with O(operation=catalog), it shows which rule keeps each
        point.
      - O(keep_chains) still deletes the oldest chains beyond its count.
    type: dict
    default: {}
    suboptions:
      keep_last:
        description: Keep the newest this many backups.
        type: int
      keep_hourly:
        description: Keep the newest backup of each of the newest this many hours that have one.
        type: int
      keep_daily:
        description: Keep the newest backup of each of the newest this many days that have one.
        type: int
      keep_weekly:
        description: Keep the newest backup of each of the newest this many ISO weeks that have one.
        type: int
      keep_monthly:
        description: Keep the newest backup of each of the newest this many months that have one.
        type: int
      keep_yearly:
        description: Keep the newest backup of each of the newest this many years that have one.
        type: int
  definition_file:
    description:
      - With O(operation=backup), the file where the C(qemu.qmp.vm) role saved the VM's definition when it started
        it (C(VM_RUN_DIR/NAME.json)). The manifest carries that definition, so a whole-VM restore can start the
        VM from the backup alone. Nothing is carried when the file does not exist.
    type: path
  max_age:
    description:
      - Seconds. When the newest backup finished less than this long ago, take none and report no change
        (RV(skipped)). 0 takes a backup on every run. A newest backup in the future (the host's clock was set
        back) does not count.
    type: float
    default: 0
  verify:
    description:
      - Run C(qemu-img check) on each new image before the manifest is written (and, with O(operation=verify),
        on each image checked). Checksums are computed and checked in any case.
    type: bool
    default: true
  guest_agent_socket:
    description:
      - The socket of the QEMU guest agent's channel. When set, the guest's file systems are frozen
        (C(guest-fsfreeze-freeze)) for the instant the backup starts, and thawed right after.
    type: path
  bitmap_prefix:
    description: Prefix of the dirty bitmaps the backups manage. Bitmaps of this prefix that no chain needs are removed.
    type: str
    default: qemu-qmp-backup
  cluster_size:
    description: Cluster size of the backup images, in bytes (best equal to the bitmaps' granularity).
    type: int
    default: 65536
  target_direct:
    description:
      - V(true) writes the images with O_DIRECT and native AIO, bypassing the page cache; V(false) writes through
        it; V(auto) uses O_DIRECT where the folder's file system takes it.
    type: str
    choices: [auto, "true", "false"]
    default: auto
  target_options:
    description: Further qcow2 creation options of the images, as C(blockdev-create) takes them.
    type: dict
    default: {}
  perf:
    description: The backup jobs' performance options (QEMU's C(x-perf)), used where QEMU has them.
    type: dict
    default: {}
  speed:
    description: Limit each disk's job to this many bytes per second; 0, no limit.
    type: int
    default: 0
  qemu_img:
    description:
      - The C(qemu-img) to check, create (pull mode) and restore images with. Pull mode runs the C(qemu-nbd)
        beside it (or from E(PATH)).
    type: str
    default: qemu-img
  point:
    description:
      - With O(operation=restore), the backup to restore. V(latest) (the newest backup of the newest chain),
        a chain id (its newest backup), or C(CHAIN/SEQUENCE). A damaged point is an error, never a reason to
        pick an older one. Default V(latest).
      - With O(operation=verify), what to check. V(all) (every chain), a chain id (the whole chain), or V(latest)
        or C(CHAIN/SEQUENCE) (that point and the backups it is based on). Default V(all).
    type: str
  disk:
    description:
      - With O(operation=restore), the node name of the disk to restore into O(output). Without it, every disk of
        the point is restored (see O(output_dir) and O(in_place)).
    type: str
  output_dir:
    description:
      - With O(operation=restore) and no O(disk), the folder to write each disk in, as C(NODE.qcow2) (created
        with mode C(0750) when missing). An image there that already holds the disk at the point is left as it
        is.
    type: path
  live:
    description:
      - With O(operation=restore) and no O(disk), the first half of a live restore (instant recovery), on stock
        QEMU. Instead of copying the data, each disk's image is created empty, backed by the backup's image (by
        its absolute path), in an instant whatever the disk's size. Start the VM on those images at once (the
        role starts it with the C(qemu.qmp.vm) role, from RV(definition)), then run O(operation=live_restore).
      - The backup is never written (QEMU opens backing files read-only). Its images' sizes are checked first; their
        checksums once the data is copied. No prune touches the chain while a VM reads from it.
    type: bool
    default: false
  in_place:
    description:
      - With O(operation=restore) and no O(disk), write each disk over the path the VM's definition (carried by
        the manifest) gives it. The VM must be stopped (an image a QEMU holds open is refused), and O(force) must
        be set, as the confirmation that the VM's current disks are replaced.
    type: bool
    default: false
  output:
    description:
      - With O(operation=restore), the image to write, with mode C(0640) (the mode of the manifests). It appears
        only once complete and checked (written beside it under a new temporary name, then renamed); a failed or
        stopped restore removes the temporary file and leaves O(output) as it was.
      - A symlink, a directory or any other file that is not a regular file at O(output) is refused, even with
        O(force). A restore never writes through a symlink nor replaces one.
      - "When O(output) is an existing regular file, the restore compares it with the point: when it is a
        standalone qcow2 image of the disk's virtual size, sound (C(qemu-img check)), with the same guest-visible
        data (C(qemu-img compare), which reads only what either image holds), the output already holds the
        point: nothing is written, and the result is unchanged, with or without O(force). Its mode, owner and
        times are left as they are. Otherwise the restore fails naming the output and how it differs, unless
        O(force) is set."
    type: path
  force:
    description:
      - With O(operation=restore), replace O(output) when it is an existing regular file that does not hold the
        point already.
    type: bool
    default: false
  lock_timeout:
    description: Seconds to wait for another run on O(dir) to end; 0 fails at once, naming it.
    type: float
    default: 0
  host_budget:
    description:
      - With O(operation=backup), how many backups may run on this host at once, counted on the host itself
        (one flock per slot in O(budget_dir)), whatever the controller does. A backup that finds every slot
        taken waits for one, up to O(wait_timeout), and says which backups hold them.
      - It is taken after the VM's own lock, and before anything is asked of QEMU.
      - V(0) sets no limit.
    type: int
    default: 0
  budget_dir:
    description: The folder of the host's budget slots, shared by every backup on the host that has a O(host_budget).
    type: path
    default: /run/qemu-qmp/budget
  poll_interval:
    description: Seconds between two progress reports.
    type: float
    default: 5
  controller_timeout:
    description:
      - Seconds the run goes on when nobody follows it any more (the controller was killed or cancelled, or its
        connection lost). Then it stops, and undoes what it did (an uncommitted backup is removed, its bitmaps
        given back).
      - At least three poll intervals and five seconds, whatever is set.
    type: float
    default: 60
attributes:
  check_mode:
    description:
      - A backup is planned against the live VM and its chains, without changing either; the result shows the
        level, chain, disks, bytes to copy (from the bitmaps' counts), the bitmaps it would read, add and drop,
        and what it would clean up. A restore checks the point, compares an existing O(output) with it, and
        reports no change when the output already holds it. A verify runs as usual (it only reads). A prune
        shows what it would remove and fold (RV(actions)). A catalog only reads. A live restore's first half
        shows the images it would create; its copy, the disks that still read from the backup.
    support: full
  diff_mode:
    description: A prune (and its check mode) shows the points before and after. A backup or a restore has none.
    support: partial
notes:
  - O(wait_timeout) bounds how long the backup may take (default 86400 seconds); O(timeout) bounds the connection
    and each QMP answer.
  - The host needs Python's standard library, and C(qemu-img) (and C(qemu-nbd) for pull mode). The controller needs
    ansible-core alone.
  - Idempotence. Each backup run takes a backup, which is its point; with O(max_age) a run is unchanged until one is
    due. A restore into an output that already holds the point is unchanged. A verify never changes anything.
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Back up vm1, continuing its newest chain when it safely can
  qemu.qmp.qmp_backup_chain:
    socket: /run/qemu/vm1.qmp
    dir: /var/lib/backup/vm1
  register: backup

- name: Show what was taken
  ansible.builtin.debug:
    msg: "{{ backup.level }} backup {{ backup.sequence }} of chain {{ backup.chain }}: {{ backup.bytes_written }} bytes written"

- name: Check every chain of vm1 against its checksums
  qemu.qmp.qmp_backup_chain:
    dir: /var/lib/backup/vm1
    operation: verify

- name: Keep 7 daily, 4 weekly and 6 monthly backups of vm1, folding the others into the ones kept
  qemu.qmp.qmp_backup_chain:
    dir: /var/lib/backup/vm1
    operation: prune
    retention:
      keep_daily: 7
      keep_weekly: 4
      keep_monthly: 6

- name: List vm1's backups
  qemu.qmp.qmp_backup_chain:
    dir: /var/lib/backup/vm1
    operation: catalog
  register: catalog

- name: Show them
  ansible.builtin.debug:
    var: catalog.table

- name: Restore every disk of vm1 as of its newest backup into a folder
  qemu.qmp.qmp_backup_chain:
    dir: /var/lib/backup/vm1
    operation: restore
    output_dir: /var/lib/qemu/vm1-restored

- name: Run vm1 from its newest backup at once, its images in a folder (then start it, and copy)
  qemu.qmp.qmp_backup_chain:
    dir: /var/lib/backup/vm1
    operation: restore
    live: true
    output_dir: /var/lib/qemu/vm1
  register: live

- name: Restore disk0 as of the newest backup
  qemu.qmp.qmp_backup_chain:
    dir: /var/lib/backup/vm1
    operation: restore
    disk: disk0
    output: /var/lib/qemu/vm1-disk0.qcow2
"""

RETURN = r"""
skipped:
  description: With O(max_age), true when no backup was due.
  returned: operation is backup
  type: bool
reason:
  description: Why no backup was taken.
  returned: when RV(skipped)
  type: str
level:
  description: The level taken (or, in check mode, that would be taken); for a restore, the restored point's.
  returned: when a backup was taken or planned, and for a restore
  type: str
  sample: incremental
chain:
  description: The chain's id.
  returned: when a backup was taken or planned, and for a restore
  type: str
  sample: 20261201T153000Z
sequence:
  description: The backup's number in its chain (0 is the full backup).
  returned: when a backup was taken or planned, and for a restore
  type: int
based_on:
  description: The sequence of the backup its images are backed by, or null for a full backup.
  returned: when a backup was taken or planned
  type: int
dir:
  description: The backup's folder.
  returned: when a backup was taken or planned
  type: str
manifest:
  description: The path of its manifest.
  returned: when a backup was taken or planned
  type: str
disks:
  description:
    - The disks, as the manifest records them (without the checksums, which stay in the manifest). In check
      mode, the plan of each disk.
  returned: when a backup was taken or planned
  type: list
  elements: dict
  contains:
    node:
      description: The disk's block node.
      type: str
    device:
      description: The device it is attached to.
      type: str
    image:
      description: Its image, relative to the chain's folder.
      type: str
    backing:
      description: The image it is backed by, relative to the chain's folder (null for a full backup).
      type: str
    virtual_size:
      description: The disk's size in bytes.
      type: int
    image_size:
      description: The image file's size in bytes.
      type: int
    bytes_copied:
      description:
        - With O(mode=push), bytes QEMU's backup job went through (its progress count), zeros included. A full
          backup counts the whole virtual size, however little of the disk holds data.
        - With O(mode=pull), bytes read from QEMU's NBD export (for a full backup, what is not known to be zero).
        - See RV(disks[].bytes_written) for what the image takes.
      type: int
    bytes_written:
      description:
        - Bytes the new image takes on the backup's file system (its allocated size, C(st_blocks) times 512, what
          C(qemu-img info) calls its disk size), measured once it is synced. That is the data the job wrote, which
          skips zeros, plus the image's qcow2 metadata.
        - Also in the manifest. Manifests written before this field existed do not have it.
      type: int
      sample: 786432
    bytes_to_copy:
      description: In check mode, bytes the job would copy (the bitmap's count; a full backup's virtual size).
      type: int
    duration:
      description: Seconds from the start of the jobs until this disk's job ended.
      type: float
    checked:
      description: Whether C(qemu-img check) passed on the image.
      type: bool
bitmaps:
  description: In check mode, the bitmaps the backup would read, add, and drop once committed.
  returned: in check mode
  type: dict
  sample: {"read": "qemu-qmp-backup-20261201T153000Z-0003", "add": ["qemu-qmp-backup-20261201T153000Z-0004"],
           "drop_after_commit": ["qemu-qmp-backup-20261201T153000Z-0003"]}
would_clean:
  description: In check mode, what the backup would first remove that an interrupted run left.
  returned: in check mode
  type: list
  elements: str
would_remove_chains:
  description: In check mode, the chains the backup would delete once committed.
  returned: in check mode
  type: list
  elements: str
last_finished:
  description: With RV(skipped), when the newest backup finished.
  returned: when RV(skipped)
  type: str
bytes_copied:
  description:
    - Bytes QEMU's jobs went through (zeros included) or read over NBD, all disks together (see RV(disks[].bytes_copied)).
    - For a live restore's copy, bytes the copy jobs went through; RV(disks) then lists each disk with its own.
  returned: when a backup was taken, and for a live restore's copy
  type: int
  sample: 268435456
bytes_written:
  description: Bytes the new images take on disk, all disks together (see RV(disks[].bytes_written)).
  returned: when a backup was taken
  type: int
  sample: 786432
msg:
  description:
    - What the run did (or, in check mode, would do), for people; sizes in binary units (KiB, MiB, GiB), each named.
    - For a backup, the bytes written and the bytes the job copied, per disk; for a restore, whether the output
      was written or already held the point.
  returned: when a backup was taken, skipped or planned, and for a restore
  type: str
  sample: "full backup 0 of chain 20261201T153000Z in 2.1s: disk0 768.0 KiB written (256.0 MiB copied by the job,
    zeros included)"
bytes_to_copy:
  description: In check mode, bytes the backup would copy (the bitmaps' counts; a full backup's virtual size).
  returned: in check mode
  type: int
budget_wait:
  description: Seconds the backup waited for a slot of the host's budget (see O(host_budget)).
  returned: when a backup was taken
  type: float
duration:
  description: Seconds the backup took on the host, until its manifest was written (or the restore, or the verify).
  returned: when a backup was taken, and for a restore and a verify
  type: float
cleaned:
  description: What this run removed that an interrupted run had left (in check mode, see RV(would_clean)).
  returned: when a backup was taken
  type: list
  elements: str
removed_chains:
  description: Chains deleted after the backup, beyond O(keep_chains).
  returned: when a backup was taken
  type: list
  elements: str
messages:
  description: The warnings of the run (also shown as Ansible warnings), such as why a new chain was started.
  returned: always
  type: list
  elements: str
output:
  description:
    - The restored image. With C(changed=false), it already held the point and nothing was written.
  returned: for a restore
  type: str
disk:
  description: The disk restored.
  returned: for a restore
  type: str
image:
  description: The backup image restored (with the images it is based on).
  returned: for a restore
  type: str
backup_finished:
  description:
    - When the restored backup finished (ISO 8601, UTC). Not named C(finished), which Ansible reserves for
      asynchronous tasks.
  returned: for a restore
  type: str
would_verify:
  description: In check mode, the backups whose checksums a restore would check.
  returned: for a restore in check mode
  type: list
  elements: str
images:
  description: For a verify, how many images were checked.
  returned: for a verify
  type: int
verified:
  description: The backups (C(CHAIN/NNNN-LEVEL)) whose images were checked.
  returned: for a restore and a verify
  type: list
  elements: str
problems:
  description: For a verify, what is wrong, each naming the file and where.
  returned: for a verify
  type: list
  elements: str
pruned:
  description: After a backup with O(retention), what the prune did (as RV(actions), RV(kept), ...); null without a policy.
  returned: when a backup was taken
  type: dict
policy:
  description: The retention policy applied, for people.
  returned: for a prune
  type: str
  sample: keep_last=2 keep_daily=7
actions:
  description:
    - What the prune did, in order (in check mode, what it would do), each for people, such as
      C(fold 20261201T000000Z/0003-incremental into 0004-incremental) or C(remove ...) or C(delete chain ...).
    - A prune that finds an interrupted one first finishes it, and says so here.
  returned: for a prune
  type: list
  elements: str
kept:
  description: The points the policy keeps, each with the rule that keeps it (C(keep_daily) ..., C(newest) for the newest).
  returned: for a prune
  type: dict
  sample: {"20261201T000000Z/0012-incremental": "newest", "20261201T000000Z/0011-incremental": "keep_last"}
skipped_chains:
  description: Chains the prune left alone, and why (damaged, a backup without a readable manifest, a VM running from it).
  returned: for a prune
  type: dict
points:
  description: The points there are after the prune (in check mode, would be).
  returned: for a prune
  type: list
  elements: str
chains:
  description: For a catalog, every chain with its points.
  returned: for a catalog
  type: list
  elements: dict
  contains:
    chain:
      description: The chain's id.
      type: str
    damaged:
      description: Whether a verify or a restore found damage in it.
      type: bool
    points:
      description:
        - Each point, C(point) (C(CHAIN/NNNN-LEVEL)), C(sequence), C(level), C(state) (C(committed), C(damaged),
          C(unfinished) or why its manifest cannot be read), C(based_on), C(finished), C(disks) (node names),
          C(data_bytes) (what its images take on disk), C(image_bytes), C(verified) (when a verify last found it
          sound, or null), C(kept_by) (with O(retention), the rule that keeps it; null when the next prune removes
          it), C(folded) (sequences folded into it) and C(definition) (whether it carries the VM's definition).
      type: list
      elements: dict
table:
  description: For a catalog, the same as lines of a table, for people.
  returned: for a catalog
  type: list
  elements: str
live:
  description: For the first half of a live restore (O(live)), true.
  returned: for a restore with O(live)
  type: bool
restored:
  description: For a restore of every disk, each disk, its output, and whether it was written (C(changed)).
  returned: for a restore without O(disk)
  type: list
  elements: dict
definition:
  description:
    - For a restore of every disk, the VM's definition the manifest carries (the C(qemu.qmp.vm) role's variables
      without the C(vm_) prefix), with each disk's path at its restored image; null when the backup has none.
  returned: for a restore without O(disk)
  type: dict
qmp_commands:
  description: The QMP commands the run sent (a long run lists the first ones, then how many were left out).
  returned: for a backup
  type: list
  elements: dict
"""

import os

from ansible_collections.qemu.qmp.plugins.module_utils import detached_run
from ansible_collections.qemu.qmp.plugins.module_utils.backup_engine import Engine, Settings
from ansible_collections.qemu.qmp.plugins.module_utils.host_budget import DEFAULT_DIR as DEFAULT_BUDGET_DIR
from ansible_collections.qemu.qmp.plugins.module_utils.backup_retention import RULES, RetentionError, normalize_policy
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPError
from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import failure, finish
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule

# A backup's jobs may run for a day; waits of QEMU's own (a job cancelled, an image created) do not.
DEFAULT_WAIT = 86400.0


def main():
    qm = QMPModule(
        argument_spec=dict(
            operation=dict(type="str", default="backup",
                           choices=["backup", "restore", "verify", "prune", "catalog", "live_restore"]),
            dir=dict(type="path", required=True),
            name=dict(type="str"),
            disks=dict(type="list", elements="str", default=[]),
            level=dict(type="str", default="auto", choices=["auto", "full", "incremental", "differential"]),
            mode=dict(type="str", default="push", choices=["push", "pull"]),
            keep_chains=dict(type="int", default=2),
            max_age=dict(type="float", default=0),
            verify=dict(type="bool", default=True),
            guest_agent_socket=dict(type="path"),
            bitmap_prefix=dict(type="str", default="qemu-qmp-backup"),
            cluster_size=dict(type="int", default=65536),
            target_direct=dict(type="str", default="auto", choices=["auto", "true", "false"]),
            target_options=dict(type="dict", default={}),
            perf=dict(type="dict", default={}),
            speed=dict(type="int", default=0),
            qemu_img=dict(type="str", default="qemu-img"),
            point=dict(type="str"),
            disk=dict(type="str"),
            output=dict(type="path"),
            force=dict(type="bool", default=False),
            output_dir=dict(type="path"),
            in_place=dict(type="bool", default=False),
            live=dict(type="bool", default=False),
            retention=dict(type="dict", default={}, options=dict(
                (rule, dict(type="int")) for rule in RULES)),
            definition_file=dict(type="path"),
            lock_timeout=dict(type="float", default=0),
            host_budget=dict(type="int", default=0),
            budget_dir=dict(type="path", default=DEFAULT_BUDGET_DIR),
            poll_interval=dict(type="float", default=5),
            controller_timeout=dict(type="float", default=60),
        ),
        required_by={"disk": ["output"]},
        mutually_exclusive=[("disk", "output_dir")],
    )
    params = qm.params
    operation = params["operation"]
    for option, low in (("poll_interval", 0.01), ("controller_timeout", 1), ("lock_timeout", 0), ("max_age", 0)):
        if not low <= params[option] <= 1e9:
            qm.fail("%s must be a number of seconds from %g to 1000000000, not %r" % (option, low, params[option]))
    if params["host_budget"] < 0:
        qm.fail("host_budget must be 0 (no limit) or more, not %d" % params["host_budget"])
    try:
        params["retention"] = normalize_policy(params["retention"] or {})
    except RetentionError as exc:
        qm.fail("retention: %s" % exc)
    if params["in_place"] and (params["disk"] or params["output_dir"]):
        qm.fail("in_place restores every disk over the VM's own: it goes without disk and output_dir")
    if operation == "restore" and not (params["disk"] or params["output_dir"] or params["in_place"]):
        qm.fail("restore needs disk and output (one disk), or output_dir or in_place (every disk of the point)")
    if params["keep_chains"] < 1:
        qm.fail("keep_chains must be 1 or more (the chain just written is always kept), not %d" % params["keep_chains"])
    settings = Settings(dict(
        params, dir=os.path.abspath(params["dir"]),
        name=params["name"] or os.path.basename(os.path.normpath(params["dir"])),
        point=params["point"] or ("latest" if operation == "restore" else "all"),
        wait_timeout=params["wait_timeout"] or DEFAULT_WAIT))
    engine = Engine(qm, settings, detached_run.Reporter())

    if params["live"] and (operation != "restore" or params["disk"]):
        qm.fail("live goes with operation=restore and no disk: a live restore starts the whole VM")
    if operation in ("backup", "live_restore"):
        if not (params["socket"] or params["host"] or os.environ.get("QMP_SOCKET")):
            qm.fail("no QMP connection given: set socket (or the QMP_SOCKET environment variable), or host and port")
    if operation == "live_restore" and qm.check_mode:
        try:
            result = engine.live_restore_plan()
        except QMPError as exc:
            result = failure(exc, {"qmp_commands": qm.commands})
        finish(qm, result)
    elif operation == "restore" and params["live"]:
        try:
            result = engine.live_prepare(check=qm.check_mode)
        except QMPError as exc:
            result = failure(exc)
        finish(qm, result)
    elif operation == "backup":
        last_finished, reason = engine.skip_reason()
        if reason:
            finish(qm, dict(changed=False, skipped=True, last_finished=last_finished, reason=reason,
                            msg="no backup taken: %s" % reason, warnings=engine.warnings, qmp_commands=[]))
        if qm.check_mode:
            try:
                engine.refuse_while_running()
            except QMPError as exc:
                finish(qm, failure(exc))
            with qm.connected():
                try:
                    result = engine.plan_only()
                except QMPError as exc:
                    result = failure(exc, {"qmp_commands": qm.commands, "warnings": engine.warnings})
            finish(qm, result)
    elif operation == "catalog" or (qm.check_mode and operation in ("restore", "prune")):
        plan = {"catalog": engine.catalog, "restore": engine.restore_plan, "prune": engine.prune_plan}[operation]
        try:
            result = plan()
        except QMPError as exc:
            result = failure(exc)
        if not qm.module._diff:
            result.pop("diff", None)
        finish(qm, result)

    work = {"backup": engine.backup, "restore": engine.restore, "verify": engine.verify,
            "prune": engine.prune, "live_restore": engine.live_restore}[operation]

    diff_wanted = qm.module._diff

    def run(reporter):
        engine.reporter = engine.tool.reporter = reporter
        try:
            result = work()
        except QMPError as exc:
            result = failure(exc, {"warnings": engine.warnings})
        result["messages"] = list(result.get("warnings", []))
        if not diff_wanted:
            result.pop("diff", None)
        return result

    detached_run.run_or_follow(qm, run, params["poll_interval"], params["controller_timeout"])


if __name__ == "__main__":
    main()
