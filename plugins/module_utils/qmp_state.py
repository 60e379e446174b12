# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Readers of QEMU's state, normalised the same way on every QEMU version.

Each reader takes `query(command, arguments=None)` and the QMPSchema, so it
works from a module (where queries are recorded) and from plain client code.
"""

from __future__ import annotations


def read_status(query, schema=None):
    """query-status: {status, running}."""
    info = query("query-status")
    return {"status": info.get("status"), "running": bool(info.get("running"))}


def read_block_nodes(query, schema):
    """query-named-block-nodes, flat where QEMU supports it (no nested backing images)."""
    if schema.feature("named_block_nodes_flat"):
        return query("query-named-block-nodes", {"flat": True})
    return query("query-named-block-nodes")


def normalise_bitmap(node, info):
    """A dirty bitmap as {name, node, count, granularity, recording, busy, persistent, inconsistent}.

    QEMU before 4.0 reports only `status` (active, disabled, frozen, locked);
    newer ones report `recording` and `busy`. `persistent` is None where QEMU
    does not say.
    """
    status = info.get("status")
    return {
        "name": info["name"],
        "node": node,
        "count": info.get("count", 0),
        "granularity": info.get("granularity"),
        "recording": info["recording"] if "recording" in info else status == "active",
        "busy": info["busy"] if "busy" in info else status in ("frozen", "locked"),
        "persistent": info.get("persistent"),
        "inconsistent": bool(info.get("inconsistent", False)),
    }


def read_bitmaps(query, schema, nodes=None):
    """Every named dirty bitmap of every named node, normalised (see normalise_bitmap).

    Jobs keep unnamed bitmaps of their own (a backup's copy-before-write
    filter, for one); those are QEMU's internals and are left out.
    """
    bitmaps = []
    if schema.returns_member("query-named-block-nodes", "dirty-bitmaps"):
        for node in nodes if nodes is not None else read_block_nodes(query, schema):
            for info in node.get("dirty-bitmaps", []):
                if info.get("name"):
                    bitmaps.append(normalise_bitmap(node.get("node-name"), info))
        return bitmaps
    # Older QEMUs list bitmaps per device in query-block.
    for device in query("query-block"):
        inserted = device.get("inserted") or {}
        node = inserted.get("node-name") or device.get("device")
        for info in inserted.get("dirty-bitmaps", device.get("dirty-bitmaps", [])):
            if info.get("name"):
                bitmaps.append(normalise_bitmap(node, info))
    return bitmaps


def normalise_job(job=None, block_job=None):
    """A job as {id, type, status, current, total, error, ...block job details}."""
    out = {}
    if job is not None:
        out.update({
            "id": job["id"],
            "type": job.get("type"),
            "status": job.get("status"),
            "current": job.get("current-progress"),
            "total": job.get("total-progress"),
            "error": job.get("error"),
        })
    if block_job is not None:
        if job is None:
            out.update({
                "id": block_job["device"],
                "type": block_job.get("type"),
                "status": block_job.get("status") or ("paused" if block_job.get("paused") else "running"),
                "current": block_job.get("offset"),
                "total": block_job.get("len"),
                "error": block_job.get("error"),
            })
        out.update({
            "block_job": True,
            "ready": block_job.get("ready"),
            "paused": block_job.get("paused"),
            "busy": block_job.get("busy"),
            "speed": block_job.get("speed"),
            "io_status": block_job.get("io-status"),
            "auto_finalize": block_job.get("auto-finalize"),
            "auto_dismiss": block_job.get("auto-dismiss"),
        })
    else:
        out["block_job"] = False
    return out


def read_jobs(query, schema):
    """Every job QEMU knows, normalised (see normalise_job), in QEMU's order."""
    block_jobs = dict((bj["device"], bj) for bj in query("query-block-jobs"))
    jobs = []
    if schema.feature("query_jobs"):
        for job in query("query-jobs"):
            jobs.append(normalise_job(job, block_jobs.pop(job["id"], None)))
    for block_job in block_jobs.values():
        jobs.append(normalise_job(None, block_job))
    return jobs


def read_migration(query, schema):
    """query-migrate plus the capabilities (as name: bool) and parameters."""
    info = query("query-migrate")
    migration = {"status": info.get("status", "none"), "info": info}
    migration["capabilities"] = dict(
        (cap["capability"], cap["state"]) for cap in query("query-migrate-capabilities"))
    if schema.has_command("query-migrate-parameters"):
        migration["parameters"] = query("query-migrate-parameters")
    return migration


def read_chardevs(query, schema=None):
    return query("query-chardev")


def read_machine(query, schema=None):
    """The machine type QEMU emulates, as -machine takes it: pc-q35-7.2, never the alias q35.

    QOM names the machine's class TYPE-machine (pc-q35-7.2-machine). A
    migration's destination must be started with this very type.
    """
    kind = query("qom-get", {"path": "/machine", "property": "type"})
    suffix = "-machine"
    return kind[:-len(suffix)] if kind.endswith(suffix) else kind


def read_name(query, schema=None):
    """The guest's name (-name), or None when QEMU runs without one."""
    return query("query-name").get("name")
