# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""QEMU's block layer: named nodes, who uses them, comparing what a user asked
for with what QEMU reports, and creating image files through QMP alone."""

from __future__ import annotations

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_jobs import JobWaiter, JobWaitTimeout, job_command
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_block_nodes

# Formats that can store persistent dirty bitmaps.
BITMAP_FORMATS = frozenset(["qcow2"])


class BlockError(Exception):
    """A block-layer problem worth a plain message (the module fails with it)."""


def nodes_by_name(qm):
    return dict((node["node-name"], node) for node in read_block_nodes(qm.query, qm.schema))


def backing_links(qm):
    """{node: its open backing node} from QEMU's block graph, or None where QEMU cannot tell.

    Only the graph says which node is open as another's backing: a node's
    reported backing file is what its image header names, open or not.
    """
    if not qm.schema.has_command("x-debug-query-block-graph"):
        return None
    graph = qm.query("x-debug-query-block-graph")
    names = dict((n["id"], n["name"]) for n in graph["nodes"] if n["type"] == "block-driver")
    return dict((names[e["parent"]], names[e["child"]]) for e in graph["edges"]
                if e["name"] == "backing" and e["parent"] in names and e["child"] in names)


def node_users(qm, node_name):
    """Who holds `node_name`: ["device /machine/peripheral/disk0/virtio-backend", "job backup0", ...].

    Reads x-debug-query-block-graph where QEMU has it, looking through
    implicit filter nodes (named "#block...") to what holds them. Returns
    None where QEMU cannot tell.
    """
    if not qm.schema.has_command("x-debug-query-block-graph"):
        return None
    graph = qm.query("x-debug-query-block-graph")
    by_id = dict((node["id"], node) for node in graph["nodes"])
    parents = {}
    for edge in graph["edges"]:
        parents.setdefault(edge["child"], []).append(edge)
    start = [n["id"] for n in graph["nodes"] if n["type"] == "block-driver" and n["name"] == node_name]
    users, seen = [], set(start)
    todo = list(start)
    while todo:
        for edge in parents.get(todo.pop(), []):
            parent = by_id[edge["parent"]]
            if parent["id"] in seen:
                continue
            seen.add(parent["id"])
            if parent["type"] == "block-driver" and parent["name"].startswith("#"):
                todo.append(parent["id"])  # an implicit filter: look at what holds it
                continue
            kind = {"block-backend": "device", "block-job": "job"}.get(parent["type"], "node")
            what = "%s %s" % (kind, parent["name"] or "(anonymous)")
            if kind == "node":
                what += " (as its %s)" % edge["name"]
            users.append(what)
    return users


# -- comparing a request with QEMU's report ----------------------------------

def compare_options(options, node, nodes, backing_of=None):
    """Compare the blockdev-add options a user gave with what QEMU reports.

    Returns (differences, not_compared): differences maps each option to
    {"wanted": ..., "qemu": ...}; not_compared lists the options QEMU does
    not report back, which cannot be checked on an existing node.
    """
    differences, not_compared = {}, []

    def differ(key, wanted, reported):
        if wanted != reported:
            differences[key] = {"wanted": wanted, "qemu": reported}

    for key, wanted in sorted(options.items()):
        if key in ("node-name",):
            continue
        if key == "driver":
            differ(key, wanted, node.get("drv"))
        elif key == "read-only":
            differ(key, wanted, node.get("ro"))
        elif key == "detect-zeroes":
            differ(key, wanted, node.get("detect_zeroes"))
        elif key == "filename":
            differ(key, wanted, node.get("file"))
        elif key == "file":
            differ(key, _filename_of(wanted, nodes), node.get("file"))
            if isinstance(wanted, dict):
                not_compared.extend("file." + sub for sub in sorted(wanted) if sub not in ("driver", "filename"))
        elif key == "backing":
            differ(key, wanted, backing_node_name(node, nodes, backing_of))
        elif key == "cache" and isinstance(wanted, dict):
            for sub, value in sorted(wanted.items()):
                if sub in ("direct", "no-flush"):
                    differ("cache." + sub, value, node.get("cache", {}).get(sub))
                else:
                    not_compared.append("cache." + sub)
        else:
            not_compared.append(key)
    return differences, not_compared


def _filename_of(ref, nodes):
    """The file name a BlockdevRef leads to: a nested definition or a node name."""
    if isinstance(ref, dict):
        if "filename" in ref:
            return ref["filename"]
        if "file" in ref:
            return _filename_of(ref["file"], nodes)
        return None
    if isinstance(ref, str) and ref in nodes:
        return nodes[ref].get("file")
    return ref


def backing_node_name(node, nodes, backing_of=None):
    """The node name of `node`'s open backing node, None when it has none.

    From the block graph (`backing_of`, see backing_links) where QEMU has it.
    Else QEMU reports the backing file's name, not its node: match it against
    the named nodes' files, and return the file name when no named node has it.
    """
    if backing_of is not None:
        return backing_of.get(node["node-name"])
    if not node.get("backing_file_depth"):
        return None
    backing_file = (node.get("image", {}).get("full-backing-filename")
                    or node.get("image", {}).get("backing-filename") or node.get("backing_file"))
    for name, other in nodes.items():
        if name != node["node-name"] and other.get("file") == backing_file and not name.startswith("#") \
                and other.get("drv") not in ("file", "host_device"):
            return name
    for name, other in nodes.items():
        if name != node["node-name"] and other.get("file") == backing_file and not name.startswith("#"):
            return name
    return backing_file


# -- image files created through QMP -----------------------------------------

class ImageCreator:
    """Creates an image file through QMP alone (blockdev-create jobs), for hosts
    where QMP is the only way in."""

    def __init__(self, qm, node_name):
        self.qm = qm
        self.node_name = node_name
        self.waiter = JobWaiter(qm)

    def file_exists(self, filename):
        """Whether QEMU can open `filename`: a read-only, unlocked probe node, removed at once."""
        probe = _scratch_name(self.node_name, "probe")
        try:
            self.qm.transient("blockdev-add", {"driver": "file", "node-name": probe, "filename": filename,
                                               "read-only": True, "locking": "off"})
        except QMPCommandError as exc:
            if "No such file or directory" in exc.desc:
                return False
            raise BlockError("cannot tell whether %s exists: %s" % (filename, exc.desc))
        self.qm.transient("blockdev-del", {"node-name": probe})
        return True

    def create(self, file_ref, fmt, create):
        """Create the file (and the format on it) that `file_ref` names."""
        if not self.qm.schema.has_command("blockdev-create"):
            raise BlockError("this QEMU has no blockdev-create: create the image file outside QEMU")
        filename = _filename_of(file_ref, {})
        size = create["size"]
        if isinstance(file_ref, dict) and file_ref.get("driver", "file") != "file":
            raise BlockError("create supports images on the file driver only, not %s" % file_ref.get("driver"))
        self._run_job("file", {"driver": "file", "filename": filename,
                               "size": 0 if fmt not in ("file", "raw") else size})
        if fmt in ("file", "raw"):
            return
        scratch = _scratch_name(self.node_name, "create")
        self.qm.change("blockdev-add", {"driver": "file", "node-name": scratch, "filename": filename})
        try:
            options = {"driver": fmt, "file": scratch, "size": size}
            if create.get("backing_file"):
                options["backing-file"] = create["backing_file"]
                options["backing-fmt"] = create.get("backing_fmt") or "qcow2"
            if create.get("cluster_size"):
                options["cluster-size"] = create["cluster_size"]
            options.update(create.get("options") or {})
            self._run_job("format", options)
        finally:
            self.qm.change("blockdev-del", {"node-name": scratch})

    def _run_job(self, step, options):
        job_id = _scratch_name(self.node_name, step)
        self.qm.change("blockdev-create", {"job-id": job_id, "options": options})
        dismiss = job_command(self.qm.schema, "dismiss", job_id)
        if self.qm.check_mode:
            self.qm.change(*dismiss)
            return
        try:
            jobs, dummy = self.waiter.wait_status(job_id, ("concluded",), self.qm.wait_timeout)
        except JobWaitTimeout:
            raise BlockError("creating %s (job %s) did not finish within wait_timeout=%gs"
                             % (options.get("filename", self.node_name), job_id, self.qm.wait_timeout))
        job = jobs[job_id]
        self.qm.change(*dismiss)
        if job and job.get("error"):
            raise BlockError("creating the %s of %s failed: %s" % (
                "file" if step == "file" else options["driver"] + " image", self.node_name, job["error"]))


def _scratch_name(node_name, what):
    """A node name or job id derived from node_name, within QEMU's 31-character limit."""
    return "%s-%s" % (node_name[:30 - len(what)], what)
