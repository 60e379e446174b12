#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_bitmap
short_description: Manage a dirty bitmap of a block node in a running QEMU
version_added: 0.1.0
description:
  - Makes a dirty bitmap present or absent on a named block node, with the wanted granularity,
    persistence and recording state; clears its bits or merges other bitmaps into it.
  - Dirty bitmaps record which parts of a disk the guest wrote. They are what incremental
    backups copy, so this module never loses their bits unless told to (O(clear), O(recreate)).
  - The bitmap is reported the same way on every QEMU version (older QEMUs report a C(status)
    where newer ones report C(recording) and C(busy)).
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  node:
    description:
      - Name of the block node the bitmap belongs to (its C(node-name)).
    type: str
    required: true
  name:
    description:
      - The bitmap's name.
    type: str
    required: true
  state:
    description:
      - V(present) adds the bitmap when the node has none of that name and brings an existing one
        to the options given.
      - V(absent) removes it (a persistent bitmap is removed from the image too). An inconsistent
        bitmap (left by a crash) can only be removed.
    type: str
    choices: [present, absent]
    default: present
  persistent:
    description:
      - Whether QEMU stores the bitmap in the image when it closes it, so it survives a restart.
        Only qcow2 (version 3) images can; any other node fails before QEMU is asked.
      - Unset, an existing bitmap's persistence is not compared; a new one is not persistent.
    type: bool
  granularity:
    description:
      - Bytes each bit covers, a power of two from 512 bytes to 2 GiB. Unset, QEMU picks it
        (usually the image's cluster size, 64 KiB for qcow2) and an existing bitmap's is not compared.
    type: int
  recording:
    description:
      - Whether the bitmap records new writes (C(block-dirty-bitmap-enable) / C(-disable)). Unset,
        it is not changed; a new bitmap records.
    type: bool
  clear:
    description:
      - Clear every bit. Reports a change only when the bitmap had dirty bits.
    type: bool
    default: false
  merge:
    description:
      - Bitmaps whose bits are merged into this one (after O(clear)). Each is a bitmap name on the same
        node, or a dictionary with the keys C(node) and C(name) for a bitmap on another node of the same size.
      - Reports a change only when the merge adds bits. To tell, the module merges this bitmap and
        the sources into a temporary disabled bitmap on the same node and compares the counts, then
        removes it (also in check mode).
    type: list
    elements: raw
  recreate:
    description:
      - When an existing bitmap has another O(granularity) or O(persistent), remove it and add it
        again. Its dirty bits are lost (the module warns), so the next incremental backup needs
        a new full one.
    type: bool
    default: false
notes:
  - A bitmap in use by a job or a migration is C(busy); QEMU refuses to change it, so the module fails
    naming the reason when a change is needed.
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: A persistent bitmap that survives QEMU restarts, for incremental backups of disk0
  qemu.qmp.qmp_bitmap:
    socket: /run/qemu/vm1.qmp
    node: disk0
    name: backup
    persistent: true

- name: Stop recording for a while
  qemu.qmp.qmp_bitmap:
    socket: /run/qemu/vm1.qmp
    node: disk0
    name: backup
    recording: false

- name: Merge it into a differential bitmap (added if missing)
  qemu.qmp.qmp_bitmap:
    socket: /run/qemu/vm1.qmp
    node: disk0
    name: since-full
    merge: [backup]
  register: since_full

- name: Show how much changed
  ansible.builtin.debug:
    msg: "{{ since_full.bitmap.count }} dirty bytes"

- name: Remove both
  qemu.qmp.qmp_bitmap:
    socket: /run/qemu/vm1.qmp
    node: disk0
    name: "{{ item }}"
    state: absent
  loop: [since-full, backup]
"""

RETURN = r"""
bitmap:
  description:
    - The bitmap afterwards (in check mode, as it would be); null when absent.
  returned: always
  type: dict
  contains:
    name:
      description: Bitmap name.
      type: str
    node:
      description: Node name.
      type: str
    count:
      description: Dirty bytes.
      type: int
    granularity:
      description: Bytes per bit.
      type: int
    recording:
      description: Whether it records new writes.
      type: bool
    busy:
      description: Whether a job or migration uses it.
      type: bool
    persistent:
      description: Whether it is stored in the image; null where QEMU does not say.
      type: bool
    inconsistent:
      description: Left by a crash; it can only be removed.
      type: bool
  sample: {"name": "backup", "node": "disk0", "count": 1048576, "granularity": 65536, "recording": true,
           "busy": false, "persistent": true, "inconsistent": false}
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent. A query sent
      several times in a row while waiting is listed once, with C(repeated) giving the count.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk0", "name": "backup", "persistent": true}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "Bitmap 'backup' is currently in use by another operation and cannot be used"}
"""

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_block import BITMAP_FORMATS
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_bitmaps, read_block_nodes

SCRATCH_BITMAP = "qemu.qmp-merge-check"


class BitmapPlan:
    def __init__(self, qm):
        self.qm = qm
        self.node = qm.params["node"]
        self.name = qm.params["name"]
        self.nodes = dict((n["node-name"], n) for n in read_block_nodes(qm.query, qm.schema))
        self.target = {"node": self.node, "name": self.name}

    def read(self, node=None, name=None):
        node, name = node or self.node, name or self.name
        for bitmap in read_bitmaps(self.qm.query, self.qm.schema):
            if bitmap["node"] == node and bitmap["name"] == name:
                return bitmap
        return None

    def fail(self, msg, bitmap):
        self.qm.fail("bitmap %s on node %s: %s" % (self.name, self.node, msg), bitmap=bitmap)

    def check_node(self):
        if self.node not in self.nodes:
            self.qm.fail("QEMU has no block node %s (named nodes: %s)"
                         % (self.node, ", ".join(sorted(n for n in self.nodes if not n.startswith("#")))))

    def check_persistent_possible(self):
        node = self.nodes[self.node]
        if node.get("drv") not in BITMAP_FORMATS:
            self.qm.fail("node %s is %s: only qcow2 images can store persistent bitmaps"
                         % (self.node, node.get("drv")))
        compat = node.get("image", {}).get("format-specific", {}).get("data", {}).get("compat")
        if compat == "0.10":
            self.qm.fail("node %s is a qcow2 version 2 image (compat=0.10), which cannot store persistent "
                         "bitmaps; convert it with qemu-img amend -o compat=1.1" % self.node)
        if node.get("ro"):
            self.qm.fail("node %s is read-only: QEMU cannot store a persistent bitmap in it" % self.node)

    def fail_if_unusable(self, bitmap, doing):
        if bitmap["inconsistent"]:
            self.fail("it is inconsistent (left by a crash or an unclean shutdown), so it cannot be %s; "
                      "it can only be removed (state=absent)" % doing, bitmap)
        if bitmap["busy"]:
            self.fail("it is busy (in use by a job or a migration), so it cannot be %s now" % doing, bitmap)

    def add(self, persistent, granularity, recording):
        arguments = dict(self.target)
        if persistent:
            arguments["persistent"] = True
        if granularity:
            arguments["granularity"] = granularity
        if recording is False:
            arguments["disabled"] = True
        self.qm.change("block-dirty-bitmap-add", arguments)
        return {"name": self.name, "node": self.node, "count": 0,
                "granularity": granularity or self.nodes[self.node].get("image", {}).get("cluster-size", 65536),
                "recording": recording is not False, "busy": False, "persistent": bool(persistent),
                "inconsistent": False}

    def merge_adds_bits(self, bitmap, sources):
        """Whether merging `sources` into the bitmap sets any bit it does not have.

        The merge is a union, so the result holds exactly the bitmap's bits
        when, and only when, its dirty count stays the same.
        """
        if bitmap is None:  # only in check mode: it would be added empty
            return any(self.read(**s)["count"] for s in sources)
        arguments = dict(node=self.node, name=SCRATCH_BITMAP, granularity=bitmap["granularity"], disabled=True)
        if self.read(name=SCRATCH_BITMAP) is not None:  # left behind by an interrupted run
            self.qm.transient("block-dirty-bitmap-remove", {"node": self.node, "name": SCRATCH_BITMAP})
        self.qm.transient("block-dirty-bitmap-add", arguments)
        try:
            self.qm.transient("block-dirty-bitmap-merge", {
                "node": self.node, "target": SCRATCH_BITMAP,
                "bitmaps": [self.name] + [merge_source(s, self.node) for s in sources]})
            merged = self.read(name=SCRATCH_BITMAP)
        finally:
            self.qm.transient("block-dirty-bitmap-remove", {"node": self.node, "name": SCRATCH_BITMAP})
        return merged["count"] != bitmap["count"]


def merge_source(source, node):
    """A merge source as QEMU takes it: a name on the same node, or {node, name}."""
    return source["name"] if source["node"] == node else source


def parse_sources(qm, node):
    sources = []
    for item in qm.params["merge"] or []:
        if isinstance(item, str):
            sources.append({"node": node, "name": item})
        elif isinstance(item, dict) and set(item) == {"node", "name"}:
            sources.append({"node": item["node"], "name": item["name"]})
        else:
            qm.fail("merge: each source is a bitmap name or {node: NODE, name: NAME}, not %r" % (item,))
    return sources


def ensure_present(qm, plan, bitmap):
    params = qm.params
    sources = parse_sources(qm, plan.node)
    for source in sources:
        if plan.read(**source) is None:
            qm.fail("merge: node %s has no bitmap %s" % (source["node"], source["name"]))
    if params["persistent"]:
        plan.check_persistent_possible()

    if bitmap is not None:
        mismatched = [key for key in ("granularity", "persistent")
                      if params[key] is not None and bitmap[key] is not None and params[key] != bitmap[key]]
        if mismatched:
            if not params["recreate"]:
                plan.fail("it exists with %s; wanted %s. Set recreate=true to remove and add it again "
                          "(its dirty bits are lost)" % (
                              ", ".join("%s %s" % (k, bitmap[k]) for k in mismatched),
                              ", ".join("%s %s" % (k, params[k]) for k in mismatched)), bitmap)
            if bitmap["busy"]:
                plan.fail_if_unusable(bitmap, "recreated")
            qm.module.warn("recreating bitmap %s on node %s: its %d dirty bytes are lost, so the next "
                           "incremental backup must be a full one" % (plan.name, plan.node, bitmap["count"]))
            qm.change("block-dirty-bitmap-remove", plan.target)
            bitmap = None
    if bitmap is None:
        bitmap = plan.add(params["persistent"], params["granularity"], params["recording"])
    elif bitmap["inconsistent"]:
        plan.fail_if_unusable(bitmap, "used")

    if params["recording"] is not None and bitmap["recording"] != params["recording"]:
        plan.fail_if_unusable(bitmap, "enabled" if params["recording"] else "disabled")
        qm.change("block-dirty-bitmap-enable" if params["recording"] else "block-dirty-bitmap-disable",
                  plan.target)
        bitmap["recording"] = params["recording"]

    if params["clear"] and bitmap["count"]:
        plan.fail_if_unusable(bitmap, "cleared")
        qm.change("block-dirty-bitmap-clear", plan.target)
        bitmap["count"] = 0

    if sources:
        exists = plan.read() is not None
        if plan.merge_adds_bits(bitmap if exists else None, sources):
            plan.fail_if_unusable(bitmap, "merged into")
            qm.change("block-dirty-bitmap-merge", {
                "node": plan.node, "target": plan.name,
                "bitmaps": [merge_source(s, plan.node) for s in sources]})
    return bitmap


def main():
    qm = QMPModule(
        argument_spec=dict(
            node=dict(type="str", required=True),
            name=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            persistent=dict(type="bool"),
            granularity=dict(type="int"),
            recording=dict(type="bool"),
            clear=dict(type="bool", default=False),
            merge=dict(type="list", elements="raw"),
            recreate=dict(type="bool", default=False),
        ),
    )
    with qm.connected():
        plan = BitmapPlan(qm)
        plan.check_node()
        before = plan.read()
        if qm.params["state"] == "absent":
            after = None
            if before is not None:
                if before["busy"]:
                    plan.fail("it is busy (in use by a job or a migration), so it cannot be removed now", before)
                qm.change("block-dirty-bitmap-remove", plan.target)
        else:
            predicted = ensure_present(qm, plan, dict(before) if before else None)
            after = predicted if qm.check_mode else plan.read()
    qm.exit(bitmap=after, before={"bitmap": before}, after={"bitmap": after})


if __name__ == "__main__":
    main()
