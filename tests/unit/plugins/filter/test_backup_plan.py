# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of the backup role's filters: backup_plan, backup_disks, backup_point, backup_manifest.

The inputs are built the way the role builds them: manifests found under ROOT/CHAIN/NNNN-LEVEL.json
(as {path, content} or as ansible.builtin.slurp results), image paths found under ROOT, and QEMU's
bitmaps as qemu.qmp.qmp_info reports them.
"""

from __future__ import annotations

import base64
import copy
import json
import os

import jsonschema
import pytest

from ansible.errors import AnsibleFilterError

from ansible_collections.qemu.qmp.plugins.filter.backup_plan import (
    FilterModule,
    backup_disks,
    backup_manifest,
    backup_plan,
    backup_point,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
SCHEMA_PATH = os.path.join(REPO, "roles", "backup", "files", "manifest.schema.json")

ROOT = "/var/lib/qemu-qmp/backups/vm1"
PREFIX = "qemu-qmp-backup"
CHAIN = "20261122T013000Z"
OLD_CHAIN = "20261120T013000Z"
NEW_ID = "20261123T020000Z"
GIB = 1024 ** 3
DISKS = [
    {"node": "drive0", "device": "/machine/peripheral/disk0/virtio-backend", "size": 10 * GIB},
    {"node": "drive1", "device": "disk1", "size": GIB},
]
QEMU = {"major": 9, "minor": 2, "micro": 0, "package": "Debian 1:9.2+ds-1"}


# -- building inputs ----------------------------------------------------------------

def bitmap_name(chain=CHAIN, suffix=None):
    return "%s-%s" % (PREFIX, chain) + ("-%s" % suffix if suffix else "")


def make_manifest(sequence, level, chain=CHAIN, based_on=None, disks=None):
    """A manifest as the role writes it (valid against manifest.schema.json)."""
    name = "%04d-%s" % (sequence, level)
    base = None if based_on is None else "%04d-%s" % based_on
    return {
        "format": 1,
        "vm": "vm1",
        "chain": chain,
        "sequence": sequence,
        "level": level,
        "mode": "push",
        "based_on": None if based_on is None else based_on[0],
        "bitmap": bitmap_name(chain),
        "full_bitmap": bitmap_name(chain, "full"),
        "started": "2026-11-22T01:30:00Z",
        "finished": "2026-11-22T01:31:00Z",
        "duration": 60.0,
        "qemu": dict(QEMU),
        "disks": [{
            "node": disk["node"],
            "device": disk.get("device"),
            "image": "%s/%s.qcow2" % (name, disk["node"]),
            "backing": "%s/%s.qcow2" % (base, disk["node"]) if base else None,
            "virtual_size": disk["size"],
            "image_size": 1024 * 1024,
            "bytes_copied": 1024 * 1024,
            "duration": 12.5,
            "checked": True,
        } for disk in (DISKS if disks is None else disks)],
    }


def make_chain(levels=("full", "incremental"), chain=CHAIN, disks=None, mode="push"):
    """(manifest entries, image paths) of a chain: an incremental is based on the backup before it,
    a differential on the full."""
    entries, images = [], []
    for sequence, level in enumerate(levels):
        based_on = None
        if level == "incremental":
            based_on = (sequence - 1, levels[sequence - 1])
        elif level == "differential":
            based_on = (0, levels[0])
        content = make_manifest(sequence, level, chain, based_on, disks=disks)
        content["mode"] = mode
        entries.append({"path": manifest_path(chain, sequence, level), "content": content})
        images.extend(os.path.join(ROOT, chain, d["image"]) for d in content["disks"])
    return entries, images


def manifest_path(chain, sequence, level):
    return os.path.join(ROOT, chain, "%04d-%s.json" % (sequence, level))


def make_bitmap(node, name, **overrides):
    """A bitmap as qemu.qmp.qmp_info reports it."""
    bitmap = {"name": name, "node": node, "count": 0, "granularity": 65536, "recording": True, "busy": False,
              "persistent": True, "inconsistent": False}
    bitmap.update(overrides)
    return bitmap


def chain_bitmaps(chain=CHAIN, nodes=("drive0", "drive1"), names=None):
    names = names or (bitmap_name(chain), bitmap_name(chain, "full"))
    return [make_bitmap(node, name) for node in nodes for name in names]


def slurped(entry):
    """An ansible.builtin.slurp result (in a loop) for a {path, content} entry."""
    data = entry["content"] if isinstance(entry["content"], bytes) else json.dumps(entry["content"]).encode("utf-8")
    return {"changed": False, "failed": False, "source": entry["path"], "encoding": "base64",
            "content": base64.b64encode(data).decode("ascii"), "item": entry["path"], "ansible_loop_var": "item"}


def plan(entries, images, bitmaps, level="auto", disks=None, **kwargs):
    kwargs.setdefault("root", ROOT)
    kwargs.setdefault("chain_id", NEW_ID)
    kwargs.setdefault("prefix", PREFIX)
    return backup_plan(entries, images, copy.deepcopy(DISKS if disks is None else disks), bitmaps, level, **kwargs)


def load_schema():
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return json.load(handle)


def schema_errors(instance):
    validator = jsonschema.Draft202012Validator(load_schema(), format_checker=jsonschema.FormatChecker())
    return sorted(error.message for error in validator.iter_errors(instance))


def assert_new_full(result, chain=NEW_ID):
    assert result["level"] == "full"
    assert result["new_chain"] is True
    assert result["chain"] == chain
    assert result["sequence"] == 0
    assert result["based_on"] is None
    assert result["bitmap"] is None
    assert result["anchors"] == [bitmap_name(chain), bitmap_name(chain, "full")]
    assert all(d["backing"] is None and d["backing_path"] is None and d["backing_header"] is None for d in result["disks"])


def test_filters_are_registered():
    assert FilterModule().filters() == {"backup_plan": backup_plan, "backup_disks": backup_disks,
                                        "backup_point": backup_point, "backup_manifest": backup_manifest}


def test_handmade_manifests_match_the_schema():
    entries, dummy = make_chain(("full", "incremental", "differential", "incremental"))
    for entry in entries:
        assert schema_errors(entry["content"]) == []


# -- no chain yet ------------------------------------------------------------------------

def test_no_chain_auto_takes_a_full():
    result = plan([], [], [])
    chain_dir = os.path.join(ROOT, NEW_ID)
    expected = {
        "level": "full",
        "new_chain": True,
        "chain": NEW_ID,
        "sequence": 0,
        "name": "0000-full",
        "chain_dir": chain_dir,
        "dir": os.path.join(chain_dir, "0000-full"),
        "manifest_path": os.path.join(chain_dir, "0000-full.json"),
        "based_on": None,
        "bitmap": None,
        "anchors": [PREFIX + "-" + NEW_ID, PREFIX + "-" + NEW_ID + "-full"],
        "next_bitmap": PREFIX + "-" + NEW_ID,
        "full_bitmap": PREFIX + "-" + NEW_ID + "-full",
        "disks": [
            {"node": "drive0", "device": DISKS[0]["device"], "size": 10 * GIB, "target_node": "qmpbk0",
             "job_id": "qemu-qmp-backup-drive0", "image": "0000-full/drive0.qcow2",
             "image_path": chain_dir + "/0000-full/drive0.qcow2", "backing": None, "backing_path": None,
             "backing_header": None},
            {"node": "drive1", "device": "disk1", "size": GIB, "target_node": "qmpbk1",
             "job_id": "qemu-qmp-backup-drive1", "image": "0000-full/drive1.qcow2",
             "image_path": chain_dir + "/0000-full/drive1.qcow2", "backing": None, "backing_path": None,
             "backing_header": None},
        ],
        "job_disks": [{"node": "drive0", "target": "qmpbk0", "job_id": "qemu-qmp-backup-drive0"},
                      {"node": "drive1", "target": "qmpbk1", "job_id": "qemu-qmp-backup-drive1"}],
        "warnings": [],
        "partial_dirs": [],
        "stale_bitmaps": [],
        "old_chains": [],
    }
    assert dict((key, result.get(key)) for key in expected) == expected


def test_no_chain_explicit_full_has_no_warning():
    result = plan(None, None, [], level="full")
    assert_new_full(result)
    assert result["warnings"] == []


@pytest.mark.parametrize("level", ["incremental", "differential"])
def test_no_chain_requested_level_falls_back_to_full_with_a_warning(level):
    result = plan([], [], [], level=level)
    assert_new_full(result)
    assert len(result["warnings"]) == 1
    assert "no backup chain exists yet" in result["warnings"][0]
    assert "taking a full backup instead of" in result["warnings"][0]
    assert level in result["warnings"][0]


def test_bad_level_and_no_disks_are_refused():
    with pytest.raises(AnsibleFilterError, match="level must be auto, full, incremental or differential"):
        plan([], [], [], level="weekly")
    with pytest.raises(AnsibleFilterError, match="there are no disks to back up"):
        plan([], [], [], disks=[])


def test_last_finished_is_the_newest_finish_of_counted_manifests():
    assert plan([], [], [])["last_finished"] is None
    entries, images = make_chain(("full", "incremental"), chain=OLD_CHAIN)
    more, more_images = make_chain(("full", "incremental"))
    more[1]["content"]["finished"] = "2026-11-22T09:15:00Z"
    ignored = {"path": os.path.join(ROOT, "elsewhere", "0000-full.json"),
               "content": dict(more[0]["content"], finished="2027-01-01T00:00:00Z")}
    result = plan(entries + more + [ignored], images + more_images, chain_bitmaps())
    assert result["last_finished"] == "2026-11-22T09:15:00Z"


# -- a valid chain -----------------------------------------------------------------------

@pytest.mark.parametrize("level", ["auto", "incremental"])
def test_valid_chain_takes_an_incremental_on_the_last_backup(level):
    entries, images = make_chain(("full", "incremental"))
    result = plan(entries, images, chain_bitmaps(), level=level)
    chain_dir = os.path.join(ROOT, CHAIN)
    assert result["level"] == "incremental"
    assert result["new_chain"] is False
    assert result["chain"] == CHAIN
    assert result["sequence"] == 2
    assert result["name"] == "0002-incremental"
    assert result["chain_dir"] == chain_dir
    assert result["dir"] == chain_dir + "/0002-incremental"
    assert result["manifest_path"] == chain_dir + "/0002-incremental.json"
    assert result["based_on"] == 1
    assert result["bitmap"] == entries[-1]["content"]["bitmap"] == bitmap_name()
    assert result["next_bitmap"] == bitmap_name()
    assert result["full_bitmap"] == bitmap_name(suffix="full")
    assert result["anchors"] == []
    assert result["warnings"] == []
    assert result["partial_dirs"] == []
    assert result["stale_bitmaps"] == []
    assert result["old_chains"] == []
    for disk, wanted in zip(result["disks"], DISKS):
        node = wanted["node"]
        assert disk["node"] == node
        assert disk["device"] == wanted["device"]
        assert disk["size"] == wanted["size"]
        assert disk["image"] == "0002-incremental/%s.qcow2" % node
        assert disk["image_path"] == "%s/0002-incremental/%s.qcow2" % (chain_dir, node)
        assert disk["backing"] == "0001-incremental/%s.qcow2" % node
        assert disk["backing_path"] == "%s/0001-incremental/%s.qcow2" % (chain_dir, node)
        assert disk["backing_path"] in images
        assert disk["backing_header"] == "../0001-incremental/%s.qcow2" % node
    assert [d["target"] for d in result["job_disks"]] == ["qmpbk0", "qmpbk1"]


def test_incremental_right_after_the_full_is_based_on_the_full():
    entries, images = make_chain(("full",))
    result = plan(entries, images, chain_bitmaps())
    assert (result["level"], result["sequence"], result["based_on"]) == ("incremental", 1, 0)
    assert [d["backing_header"] for d in result["disks"]] == ["../0000-full/drive0.qcow2", "../0000-full/drive1.qcow2"]


def test_differential_is_based_on_the_full_with_the_full_bitmap():
    entries, images = make_chain(("full", "incremental", "incremental"))
    result = plan(entries, images, chain_bitmaps(), level="differential")
    chain_dir = os.path.join(ROOT, CHAIN)
    assert result["level"] == "differential"
    assert result["new_chain"] is False
    assert result["sequence"] == 3
    assert result["name"] == "0003-differential"
    assert result["based_on"] == 0
    assert result["bitmap"] == entries[-1]["content"]["full_bitmap"] == bitmap_name(suffix="full")
    # The chain's incremental bitmap goes on: the next incremental still uses it.
    assert result["next_bitmap"] == bitmap_name()
    assert result["anchors"] == []
    assert result["warnings"] == []
    for disk in result["disks"]:
        assert disk["backing"] == "0000-full/%s.qcow2" % disk["node"]
        assert disk["backing_path"] == "%s/0000-full/%s.qcow2" % (chain_dir, disk["node"])
        assert disk["backing_header"] == "../0000-full/%s.qcow2" % disk["node"]
        assert disk["image_path"] == "%s/0003-differential/%s.qcow2" % (chain_dir, disk["node"])


def test_incremental_after_a_differential_is_based_on_the_differential():
    entries, images = make_chain(("full", "differential"))
    result = plan(entries, images, chain_bitmaps())
    assert (result["level"], result["sequence"], result["based_on"]) == ("incremental", 2, 1)
    assert result["disks"][0]["backing_header"] == "../0001-differential/drive0.qcow2"


def test_explicit_full_starts_a_new_chain_beside_a_valid_one():
    entries, images = make_chain()
    result = plan(entries, images, chain_bitmaps(), level="full")
    assert_new_full(result)
    assert result["warnings"] == []
    # The old chain's bitmaps only cost writes once the new full succeeded.
    assert result["stale_bitmaps"] == [{"node": b["node"], "name": b["name"]} for b in chain_bitmaps()]
    assert result["old_chains"] == []


def test_the_newest_chain_is_continued():
    old_entries, old_images = make_chain(("full", "incremental", "incremental"), chain=OLD_CHAIN)
    entries, images = make_chain(("full",))
    result = plan(old_entries + entries, old_images + images, chain_bitmaps())
    assert (result["level"], result["chain"], result["sequence"]) == ("incremental", CHAIN, 1)


def test_manifest_order_does_not_matter():
    entries, images = make_chain(("full", "incremental", "incremental"))
    result = plan(list(reversed(entries)), list(reversed(images)), chain_bitmaps())
    assert (result["level"], result["sequence"], result["based_on"]) == ("incremental", 3, 2)


def test_only_the_bitmap_the_level_needs_is_checked():
    entries, images = make_chain()
    incremental_only = chain_bitmaps(names=(bitmap_name(),))
    assert plan(entries, images, incremental_only)["level"] == "incremental"
    result = plan(entries, images, incremental_only, level="differential")
    assert result["level"] == "full"
    assert "bitmap %s is missing on node drive0" % bitmap_name(suffix="full") in result["warnings"][0]


def test_disk_order_does_not_matter():
    entries, images = make_chain()
    result = plan(entries, images, chain_bitmaps(), disks=list(reversed(DISKS)))
    assert result["level"] == "incremental"
    assert [d["node"] for d in result["disks"]] == ["drive1", "drive0"]
    assert [d["backing"] for d in result["disks"]] == ["0001-incremental/drive1.qcow2", "0001-incremental/drive0.qcow2"]


# -- chains that cannot continue -------------------------------------------------------------

def _without_bitmap(bitmaps):
    return [b for b in bitmaps if (b["node"], b["name"]) != ("drive1", bitmap_name())]


def _changed_bitmap(**change):
    def edit(bitmaps):
        return [dict(b, **change) if (b["node"], b["name"]) == ("drive1", bitmap_name()) else b for b in bitmaps]
    return edit


def _bitmap_case(edit, reason):
    return {"bitmaps": edit, "reason": reason % {"bitmap": bitmap_name()}}


REFUSALS = {
    "bitmap missing": _bitmap_case(
        _without_bitmap, "bitmap %(bitmap)s is missing on node drive1 (QEMU was restarted without it, or it was removed)"),
    "bitmap inconsistent": _bitmap_case(
        _changed_bitmap(inconsistent=True), "bitmap %(bitmap)s on node drive1 is inconsistent (QEMU did not stop cleanly)"),
    "bitmap busy": _bitmap_case(
        _changed_bitmap(busy=True), "bitmap %(bitmap)s on node drive1 is busy (another job or a migration uses it)"),
    "bitmap not recording": _bitmap_case(
        _changed_bitmap(recording=False), "bitmap %(bitmap)s on node drive1 does not record writes"),
    "bitmap on another node only": {
        "bitmaps": lambda bitmaps: [dict(b, node="drive1-file") if b["node"] == "drive1" else b for b in bitmaps],
        "reason": "bitmap %s is missing on node drive1 (QEMU was restarted without it, or it was removed)" % bitmap_name()},
    "image of the full missing": {
        "images": lambda images: [i for i in images if not i.endswith("/0000-full/drive1.qcow2")],
        "reason": "its image %s/%s/0000-full/drive1.qcow2 is missing" % (ROOT, CHAIN)},
    "image of the last backup missing": {
        "images": lambda images: [i for i in images if not i.endswith("/0002-incremental/drive0.qcow2")],
        "reason": "its image %s/%s/0002-incremental/drive0.qcow2 is missing" % (ROOT, CHAIN)},
    "a disk less": {
        "disks": DISKS[:1],
        "reason": "it holds other disks (drive0, drive1) than this backup (drive0)"},
    "a disk more": {
        "disks": DISKS + [{"node": "drive2", "device": "disk2", "size": GIB}],
        "reason": "it holds other disks (drive0, drive1) than this backup (drive0, drive1, drive2)"},
    "a disk replaced": {
        "disks": [DISKS[0], dict(DISKS[1], node="drive9")],
        "reason": "it holds other disks (drive0, drive1) than this backup (drive0, drive9)"},
    "a disk grew": {
        "disks": [DISKS[0], dict(DISKS[1], size=2 * GIB)],
        "reason": "disk drive1 changed size"},
    "a manifest missing in the middle": {
        "entries": lambda entries: [e for e in entries if e["content"]["sequence"] != 1],
        "reason": "its manifests are not numbered 0 to 1"},
    "a sequence twice": {
        "entries": lambda entries: entries + [dict(entries[2], path=manifest_path(CHAIN, 2, "differential"))],
        "reason": "its manifests are not numbered 0 to 3"},
    "the full's manifest missing": {
        "entries": lambda entries: entries[1:],
        "reason": "its full backup's manifest is missing"},
    "the first manifest is not a full": {
        "entries": lambda entries: [dict(entries[0], content=dict(entries[0]["content"], level="incremental"))]
        + entries[1:],
        "reason": "its full backup's manifest is missing"},
    "the manifest names no bitmap": {
        "entries": lambda entries: entries[:2] + [dict(entries[2], content=dict(entries[2]["content"], bitmap=""))],
        "reason": "its manifest names no bitmap"},
}


@pytest.mark.parametrize("case", sorted(REFUSALS), ids=sorted(REFUSALS))
@pytest.mark.parametrize("level", ["auto", "incremental"])
def test_a_chain_that_cannot_continue_gives_a_full_with_the_reason(case, level):
    spec = REFUSALS[case]
    entries, images = make_chain(("full", "incremental", "incremental"))
    entries = spec.get("entries", list)(entries)
    images = spec.get("images", list)(images)
    bitmaps = spec.get("bitmaps", list)(chain_bitmaps())
    result = plan(entries, images, bitmaps, level=level, disks=spec.get("disks"))
    assert_new_full(result)
    assert result["warnings"] == [
        "starting a new full chain instead of taking the incremental backup: chain %s cannot continue: %s"
        % (CHAIN, spec["reason"])]
    # The refused chain is kept (keep_chains=2 counts the new one).
    assert result["old_chains"] == []


@pytest.mark.parametrize("case", ["bitmap missing", "bitmap inconsistent", "bitmap busy", "bitmap not recording"])
def test_a_differential_checks_the_full_bitmap(case):
    entries, images = make_chain()
    full = bitmap_name(suffix="full")
    bitmaps = [b for b in chain_bitmaps() if case != "bitmap missing" or (b["node"], b["name"]) != ("drive0", full)]
    change = {"bitmap inconsistent": {"inconsistent": True}, "bitmap busy": {"busy": True},
              "bitmap not recording": {"recording": False}}.get(case, {})
    bitmaps = [dict(b, **change) if (b["node"], b["name"]) == ("drive0", full) else b for b in bitmaps]
    result = plan(entries, images, bitmaps, level="differential")
    assert_new_full(result)
    assert len(result["warnings"]) == 1
    warning = result["warnings"][0]
    assert "instead of taking the differential backup" in warning
    assert "chain %s cannot continue: bitmap %s" % (CHAIN, full) in warning
    assert "node drive0" in warning


def test_a_refused_chain_within_the_same_second_gets_a_new_chain_id():
    entries, images = make_chain()
    result = plan(entries, images, [], chain_id=CHAIN)
    assert_new_full(result, chain=CHAIN + "x")
    assert result["dir"] == os.path.join(ROOT, CHAIN + "x", "0000-full")


# -- manifests as ansible.builtin.slurp results ----------------------------------------------

def test_slurp_results_plan_like_manifests():
    entries, images = make_chain(("full", "incremental", "differential"))
    bitmaps = chain_bitmaps()
    as_slurp = [slurped(e) for e in entries]
    for level in ("auto", "incremental", "differential", "full"):
        assert plan(as_slurp, images, bitmaps, level=level) == plan(entries, images, bitmaps, level=level)
    assert plan(as_slurp, images, bitmaps)["sequence"] == 3


def test_unreadable_manifests_are_ignored():
    entries, images = make_chain(("full", "incremental"))
    expected = plan(entries, images, chain_bitmaps())
    broken = [
        # Truncated JSON (a disk ran full while it was written).
        slurped({"path": manifest_path(CHAIN, 2, "incremental"), "content": b'{"format": 1, "chain": "' + CHAIN.encode()}),
        # Not UTF-8.
        slurped({"path": manifest_path(CHAIN, 3, "incremental"), "content": b"\xff\xfe{}"}),
        # Not base64 at all.
        {"source": manifest_path(CHAIN, 4, "incremental"), "content": "{not base64!", "encoding": "base64"},
        # A JSON value that is not an object.
        slurped({"path": manifest_path(CHAIN, 5, "incremental"), "content": b"[1, 2]"}),
        # Results of a slurp that failed or was skipped.
        {"failed": True, "msg": "file not found", "item": manifest_path(CHAIN, 6, "incremental")},
        {"skipped": True, "item": manifest_path(CHAIN, 7, "incremental")},
        # Something without content (a find result, say).
        {"path": manifest_path(CHAIN, 8, "incremental")},
    ]
    result = plan([slurped(e) for e in entries] + broken, images, chain_bitmaps())
    assert result == expected
    assert (result["level"], result["sequence"], result["warnings"]) == ("incremental", 2, [])


def test_an_unreadable_manifest_does_not_count_for_its_chain():
    entries, images = make_chain(("full", "incremental"))
    entries[1] = slurped({"path": entries[1]["path"], "content": b"{}garbage"})
    result = plan(entries, images, chain_bitmaps())
    # Only the full counts, so the next backup is based on it.
    assert (result["level"], result["sequence"], result["based_on"]) == ("incremental", 1, 0)


def test_images_of_a_backup_with_an_unreadable_manifest_are_not_partial():
    entries, images = make_chain(("full", "incremental", "incremental"))
    entries[1] = slurped({"path": entries[1]["path"], "content": b'{"format": 1, "chain"'})
    result = plan(entries, images, chain_bitmaps())
    # The folder has a manifest file: it is not an unfinished backup, and the images of
    # backup 2 are backed by its images.
    assert os.path.join(ROOT, CHAIN, "0001-incremental") not in result["partial_dirs"]


# -- manifests that do not belong ---------------------------------------------------------

def test_a_manifest_in_a_folder_named_after_another_chain_is_ignored():
    entries, images = make_chain(("full",))
    moved = [{"path": os.path.join(ROOT, "20261201T000000Z", "0000-full.json"), "content": entries[0]["content"]}]
    result = plan(moved, images, chain_bitmaps())
    assert_new_full(result)
    assert result["warnings"] == []


def test_a_misplaced_manifest_does_not_hijack_the_chain():
    entries, images = make_chain(("full", "incremental"))
    newer = "20261201T000000Z"
    # A copy of chain CHAIN's manifest under a newer folder name: max() would pick it if it counted.
    misplaced = {"path": os.path.join(ROOT, newer, "0002-incremental.json"),
                 "content": make_manifest(2, "incremental", based_on=(1, "incremental"))}
    result = plan(entries + [misplaced], images, chain_bitmaps())
    assert (result["level"], result["chain"], result["sequence"]) == ("incremental", CHAIN, 2)
    assert result["warnings"] == []


def test_a_manifest_of_another_format_is_ignored():
    entries, images = make_chain(("full", "incremental"))
    entries[1]["content"]["format"] = 2
    result = plan(entries, images, chain_bitmaps())
    assert (result["level"], result["sequence"], result["based_on"]) == ("incremental", 1, 0)


# -- pull mode -------------------------------------------------------------------------------

def test_pull_incremental_anchors_a_new_bitmap():
    entries, images = make_chain(("full", "incremental"))
    result = plan(entries, images, chain_bitmaps(), mode="pull")
    new = "%s-%s-0002" % (PREFIX, CHAIN)
    assert result["level"] == "incremental"
    assert result["bitmap"] == bitmap_name()  # the one it reads (and freezes)
    assert result["next_bitmap"] == new
    assert result["anchors"] == [new]
    assert result["full_bitmap"] == bitmap_name(suffix="full")
    assert result["stale_bitmaps"] == []


def test_push_incremental_keeps_the_chains_bitmap():
    entries, images = make_chain(("full", "incremental"))
    result = plan(entries, images, chain_bitmaps(), mode="push")
    assert result["bitmap"] == result["next_bitmap"] == bitmap_name()
    assert result["anchors"] == []
    assert plan(entries, images, chain_bitmaps()) == result  # push is the default


def test_pull_chain_continues_with_the_bitmap_its_last_backup_anchored():
    entries, images = make_chain(("full", "incremental"), mode="pull")
    entries[1]["content"]["bitmap"] = "%s-%s-0001" % (PREFIX, CHAIN)
    pulled = chain_bitmaps(names=("%s-%s-0001" % (PREFIX, CHAIN), bitmap_name(suffix="full")))
    result = plan(entries, images, pulled, mode="pull")
    assert result["level"] == "incremental"
    assert result["bitmap"] == "%s-%s-0001" % (PREFIX, CHAIN)
    assert result["anchors"] == ["%s-%s-0002" % (PREFIX, CHAIN)]
    # The chain's first bitmap was dropped by the first pull: without the newer one the chain stops.
    result = plan(entries, images, chain_bitmaps(), mode="pull")
    assert result["level"] == "full"
    assert "bitmap %s-%s-0001 is missing on node drive0" % (PREFIX, CHAIN) in result["warnings"][0]


def test_pull_differential_and_full_anchor_like_push():
    entries, images = make_chain(("full", "incremental"))
    pull = plan(entries, images, chain_bitmaps(), level="differential", mode="pull")
    push = plan(entries, images, chain_bitmaps(), level="differential", mode="push")
    assert pull == push
    assert pull["anchors"] == []
    pull = plan(entries, images, chain_bitmaps(), level="full", mode="pull")
    assert pull == plan(entries, images, chain_bitmaps(), level="full", mode="push")
    assert pull["anchors"] == [bitmap_name(NEW_ID), bitmap_name(NEW_ID, "full")]


# -- partial folders, stale bitmaps, old chains ----------------------------------------------

def test_partial_dirs_are_image_folders_without_a_manifest():
    entries, images = make_chain(("full", "incremental"))
    chain_dir = os.path.join(ROOT, CHAIN)
    unfinished = [chain_dir + "/0002-incremental/drive0.qcow2", chain_dir + "/0002-incremental/drive1.qcow2",
                  chain_dir + "/0002-incremental/drive0.fleece.qcow2",
                  ROOT + "/20261121T000000Z/0000-full/drive0.qcow2"]
    result = plan(entries, images + unfinished, chain_bitmaps())
    assert result["partial_dirs"] == [ROOT + "/20261121T000000Z/0000-full", chain_dir + "/0002-incremental"]
    # The unfinished backup takes the same place again (the role cleans it up first).
    assert result["dir"] == chain_dir + "/0002-incremental"
    assert result["level"] == "incremental"


def test_partial_dirs_with_slurped_manifests():
    entries, images = make_chain(("full", "incremental"))
    extra = os.path.join(ROOT, CHAIN, "0002-incremental", "drive0.qcow2")
    result = plan([slurped(e) for e in entries], images + [extra], chain_bitmaps())
    assert result["partial_dirs"] == [os.path.dirname(extra)]


@pytest.mark.parametrize("stray", [ROOT + "/restored-drive0.qcow2", ROOT + "/" + CHAIN + "/drive0-copy.qcow2"])
def test_a_stray_image_never_makes_a_chain_or_the_vm_folder_partial(stray):
    entries, images = make_chain(("full", "incremental"))
    result = plan(entries, images + [stray], chain_bitmaps())
    assert ROOT not in result["partial_dirs"]
    assert os.path.join(ROOT, CHAIN) not in result["partial_dirs"]


def test_stale_bitmaps_of_a_new_chain():
    entries, images = make_chain()
    bitmaps = chain_bitmaps() + chain_bitmaps(OLD_CHAIN) + [
        make_bitmap("drive0", "%s-%s-0003" % (PREFIX, CHAIN)),  # left by a pull-mode backup
        make_bitmap("drive0", "libvirt-tmp-1"),
        make_bitmap("drive1", PREFIX),
        make_bitmap("drive1", PREFIX + "x-" + CHAIN),
        make_bitmap("drive1", "other-" + bitmap_name()),
    ]
    result = plan(entries, images, bitmaps, level="full")
    names = [(b["node"], b["name"]) for b in result["stale_bitmaps"]]
    expected = [(b["node"], b["name"]) for b in chain_bitmaps() + chain_bitmaps(OLD_CHAIN)]
    expected.append(("drive0", "%s-%s-0003" % (PREFIX, CHAIN)))
    assert names == expected
    assert all(set(b) == {"node", "name"} for b in result["stale_bitmaps"])
    # Never a bitmap without the prefix, nor the new chain's own ones.
    for dummy, name in names:
        assert name.startswith(PREFIX + "-")
        assert name not in result["anchors"]


def test_stale_bitmaps_of_an_incremental_keep_the_chains_own():
    entries, images = make_chain()
    bitmaps = chain_bitmaps() + chain_bitmaps(OLD_CHAIN, nodes=("drive1",)) + [make_bitmap("drive0", "backup-other")]
    result = plan(entries, images, bitmaps)
    assert result["level"] == "incremental"
    assert result["stale_bitmaps"] == [{"node": "drive1", "name": bitmap_name(OLD_CHAIN)},
                                       {"node": "drive1", "name": bitmap_name(OLD_CHAIN, "full")}]


def test_stale_bitmaps_of_a_pull_incremental_keep_the_frozen_one():
    entries, images = make_chain()
    bitmaps = chain_bitmaps() + [make_bitmap("drive0", "%s-%s-0001" % (PREFIX, CHAIN))]
    result = plan(entries, images, bitmaps, mode="pull")
    assert result["bitmap"] == bitmap_name()
    assert result["stale_bitmaps"] == [{"node": "drive0", "name": "%s-%s-0001" % (PREFIX, CHAIN)}]


def test_stale_bitmaps_with_another_prefix():
    entries, images = make_chain()
    result = plan(entries, images, chain_bitmaps(), level="full", prefix="nightly")
    assert result["stale_bitmaps"] == []
    assert result["anchors"] == ["nightly-" + NEW_ID, "nightly-%s-full" % NEW_ID]


def _three_chains():
    entries, images = [], []
    for chain in ("20261101T000000Z", "20261108T000000Z", CHAIN):
        chain_entries, chain_images = make_chain(("full", "incremental"), chain=chain)
        entries += chain_entries
        images += chain_images
    return entries, images


@pytest.mark.parametrize("keep, deleted", [
    (1, ["20261101T000000Z", "20261108T000000Z", CHAIN]),
    (2, ["20261101T000000Z", "20261108T000000Z"]),
    (3, ["20261101T000000Z"]),
    (4, []),
    (10, []),
])
def test_old_chains_of_a_new_full_count_the_new_chain(keep, deleted):
    entries, images = _three_chains()
    result = plan(entries, images, chain_bitmaps(), level="full", keep_chains=keep)
    assert result["chain"] == NEW_ID
    assert result["old_chains"] == [os.path.join(ROOT, c) for c in deleted]
    assert result["chain_dir"] not in result["old_chains"]


@pytest.mark.parametrize("keep, deleted", [
    (1, ["20261101T000000Z", "20261108T000000Z"]),
    (2, ["20261101T000000Z"]),
    (3, []),
])
def test_old_chains_of_an_incremental(keep, deleted):
    entries, images = _three_chains()
    result = plan(entries, images, chain_bitmaps(), keep_chains=keep)
    assert (result["level"], result["chain"]) == ("incremental", CHAIN)
    assert result["old_chains"] == [os.path.join(ROOT, c) for c in deleted]


def test_old_chains_default_keeps_two():
    entries, images = _three_chains()
    result = plan(entries, images, chain_bitmaps(), level="full")
    assert result["old_chains"] == [os.path.join(ROOT, "20261101T000000Z"), os.path.join(ROOT, "20261108T000000Z")]


def test_old_chains_after_a_refused_chain():
    entries, images = make_chain(chain=OLD_CHAIN)
    result = plan(entries, images, [], keep_chains=1)
    assert result["level"] == "full"
    assert result["old_chains"] == [os.path.join(ROOT, OLD_CHAIN)]


# -- two fulls within one second ------------------------------------------------------------------

def test_two_fulls_within_the_same_second_get_distinct_chain_ids():
    first = plan([], [], [], level="full")
    entries, images = make_chain(("full",), chain=first["chain"])
    second = plan(entries, images, [], level="full")
    assert first["chain"] == NEW_ID
    assert second["chain"] == NEW_ID + "x"
    assert second["chain_dir"] == os.path.join(ROOT, NEW_ID + "x")
    assert second["anchors"] == [bitmap_name(NEW_ID + "x"), bitmap_name(NEW_ID + "x", "full")]
    assert second["warnings"] == []
    more, more_images = make_chain(("full",), chain=second["chain"])
    third = plan(entries + more, images + more_images, [], level="full")
    assert third["chain"] == NEW_ID + "xx"
    assert len({first["chain"], second["chain"], third["chain"]}) == 3


def test_the_chain_of_the_second_full_within_a_second_is_the_newest():
    entries, images = make_chain(("full",), chain=NEW_ID)
    more, more_images = make_chain(("full",), chain=NEW_ID + "x")
    result = plan(more + entries, more_images + images, chain_bitmaps(NEW_ID + "x"), chain_id="20261124T000000Z")
    assert (result["level"], result["chain"], result["sequence"]) == ("incremental", NEW_ID + "x", 1)
    assert result["old_chains"] == []


# -- backup_disks -------------------------------------------------------------------------------

QUERY_BLOCK = [
    {"device": "", "qdev": "/machine/peripheral/disk0/virtio-backend", "locked": False, "removable": False,
     "type": "unknown", "io-status": "ok",
     "inserted": {"node-name": "drive0", "drv": "qcow2", "file": "/vm/vm1-disk0.qcow2", "ro": False,
                  "encrypted": False, "detect_zeroes": "off", "bps": 0, "iops": 0, "write_threshold": 0,
                  "cache": {"writeback": True, "direct": False, "no-flush": False}}},
    {"device": "", "qdev": "disk1", "locked": False, "removable": False, "type": "unknown",
     "inserted": {"node-name": "drive1", "drv": "raw", "file": "/vm/vm1-disk1.raw", "ro": False}},
    {"device": "ide2-cd0", "qdev": "/machine/unattached/device[23]", "locked": False, "removable": True,
     "tray_open": False, "type": "unknown",
     "inserted": {"node-name": "cdrom0", "drv": "raw", "file": "/iso/install.iso", "ro": True}},
    {"device": "floppy0", "qdev": "fd0", "locked": False, "removable": True, "tray_open": False, "type": "unknown"},
    {"device": "spare-drive", "locked": False, "removable": False, "type": "unknown",
     "inserted": {"node-name": "spare", "drv": "qcow2", "file": "/vm/spare.qcow2", "ro": False}},
]

QUERY_NAMED_BLOCK_NODES = [
    {"node-name": "drive0", "drv": "qcow2", "file": "/vm/vm1-disk0.qcow2",
     "image": {"filename": "/vm/vm1-disk0.qcow2", "format": "qcow2", "virtual-size": 10 * GIB, "actual-size": 2 * GIB,
               "cluster-size": 65536, "dirty-flag": False}},
    {"node-name": "drive0-file", "drv": "file", "file": "/vm/vm1-disk0.qcow2",
     "image": {"filename": "/vm/vm1-disk0.qcow2", "format": "file", "virtual-size": 2 * GIB + 327680}},
    {"node-name": "drive1", "drv": "raw", "file": "/vm/vm1-disk1.raw",
     "image": {"filename": "/vm/vm1-disk1.raw", "format": "raw", "virtual-size": GIB}},
    {"node-name": "cdrom0", "drv": "raw", "file": "/iso/install.iso",
     "image": {"filename": "/iso/install.iso", "format": "raw", "virtual-size": 700 * 1024 * 1024}},
    {"node-name": "spare", "drv": "qcow2", "file": "/vm/spare.qcow2",
     "image": {"filename": "/vm/spare.qcow2", "format": "qcow2", "virtual-size": 4 * GIB}},
]

ATTACHED = [
    {"node": "drive0", "device": "/machine/peripheral/disk0/virtio-backend", "size": 10 * GIB},
    {"node": "drive1", "device": "disk1", "size": GIB},
]


@pytest.mark.parametrize("wanted", [None, []])
def test_backup_disks_are_the_nodes_of_fixed_devices(wanted):
    assert backup_disks(QUERY_BLOCK, QUERY_NAMED_BLOCK_NODES, wanted) == ATTACHED


def test_backup_disks_named():
    assert backup_disks(QUERY_BLOCK, QUERY_NAMED_BLOCK_NODES, ["drive1"]) == ATTACHED[1:]
    assert backup_disks(QUERY_BLOCK, QUERY_NAMED_BLOCK_NODES, ["drive1", "drive0"]) == [ATTACHED[1], ATTACHED[0]]
    # A node no device shows (or a removable one's) can be named: it has no device.
    assert backup_disks(QUERY_BLOCK, QUERY_NAMED_BLOCK_NODES, ["drive0", "spare"]) == [
        ATTACHED[0], {"node": "spare", "device": None, "size": 4 * GIB}]
    assert backup_disks(QUERY_BLOCK, QUERY_NAMED_BLOCK_NODES, ["cdrom0"]) == [
        {"node": "cdrom0", "device": None, "size": 700 * 1024 * 1024}]


def test_backup_disks_unknown_node_names_the_disks():
    with pytest.raises(AnsibleFilterError) as info:
        backup_disks(QUERY_BLOCK, QUERY_NAMED_BLOCK_NODES, ["drive0", "drive7"])
    assert str(info.value) == "QEMU has no block node drive7 (its disks: drive0, drive1)"
    with pytest.raises(AnsibleFilterError) as info:
        backup_disks([], [], ["drive0"])
    assert str(info.value) == "QEMU has no block node drive0 (its disks: none)"


def test_backup_disks_without_devices():
    assert backup_disks(None, None) == []
    assert backup_disks(QUERY_BLOCK[2:4], QUERY_NAMED_BLOCK_NODES) == []


def test_backup_disks_feed_the_plan():
    disks = backup_disks(QUERY_BLOCK, QUERY_NAMED_BLOCK_NODES)
    entries, images = make_chain()
    result = backup_plan(entries, images, disks, chain_bitmaps(), "auto", ROOT, NEW_ID, PREFIX)
    assert (result["level"], result["sequence"]) == ("incremental", 2)
    assert [d["device"] for d in result["disks"]] == [d["device"] for d in ATTACHED]


# -- backup_point ---------------------------------------------------------------------------------

def _two_chains():
    entries, images = make_chain(("full", "incremental"), chain=OLD_CHAIN)
    more, more_images = make_chain(("full", "incremental", "differential"))
    return entries + more, images + more_images


@pytest.mark.parametrize("point", ["latest", None, ""])
def test_backup_point_latest(point):
    entries, dummy = _two_chains()
    assert backup_point(entries, ROOT, point) == entries[-1]["content"]
    assert backup_point(entries, ROOT) == entries[-1]["content"]


def test_backup_point_chain_and_sequence():
    entries, dummy = _two_chains()
    assert backup_point(entries, ROOT, OLD_CHAIN) == entries[1]["content"]
    assert backup_point(entries, ROOT, CHAIN) == entries[4]["content"]
    assert backup_point(entries, ROOT, OLD_CHAIN + "/0") == entries[0]["content"]
    assert backup_point(entries, ROOT, CHAIN + "/1") == entries[3]["content"]
    assert backup_point(entries, ROOT, CHAIN + "/0002") == entries[4]["content"]


def test_backup_point_reads_slurp_results():
    entries, dummy = _two_chains()
    assert backup_point([slurped(e) for e in entries], ROOT, OLD_CHAIN + "/1") == entries[1]["content"]


def test_backup_point_errors():
    entries, dummy = _two_chains()
    with pytest.raises(AnsibleFilterError) as info:
        backup_point(entries, ROOT, "20200101T000000Z")
    assert str(info.value) == "there is no chain 20200101T000000Z under %s (chains: %s, %s)" % (ROOT, OLD_CHAIN, CHAIN)
    with pytest.raises(AnsibleFilterError) as info:
        backup_point(entries, ROOT, CHAIN + "/7")
    assert str(info.value) == "chain %s has no backup 7 (it has 0, 1, 2)" % CHAIN
    with pytest.raises(AnsibleFilterError) as info:
        backup_point(entries, ROOT, CHAIN + "/last")
    assert "restore point %s/last" % CHAIN in str(info.value)
    assert "sequence number" in str(info.value)
    with pytest.raises(AnsibleFilterError) as info:
        backup_point(entries, ROOT, "nochain/1")
    assert "there is no chain nochain under %s" % ROOT in str(info.value)


@pytest.mark.parametrize("manifests", [[], None, [{"path": ROOT + "/x/0000-full.json", "content": {"chain": "y"}}]])
def test_backup_point_without_backups(manifests):
    with pytest.raises(AnsibleFilterError) as info:
        backup_point(manifests, ROOT, "latest")
    assert str(info.value) == "there are no backups under %s" % ROOT


# -- backup_manifest ----------------------------------------------------------------------------

def _finish(result, mode="push"):
    copied = [{"node": d["node"], "bytes": d["size"] // 4, "duration": 3.25, "status": "concluded"} for d in result["disks"]]
    stats = [{"item": d, "stat": {"exists": True, "size": 123456}} for d in result["disks"]]
    return backup_manifest(result, "vm1", mode, "2026-11-23T02:00:00Z", "2026-11-23T02:00:09Z", 9.123456,
                           dict(QEMU), copied, stats, True)


def test_manifest_of_a_full_matches_the_schema():
    result = plan([], [], [])
    manifest = _finish(result)
    assert schema_errors(manifest) == []
    assert manifest["chain"] == NEW_ID
    assert (manifest["sequence"], manifest["level"], manifest["based_on"]) == (0, "full", None)
    assert manifest["bitmap"] == bitmap_name(NEW_ID)
    assert manifest["full_bitmap"] == bitmap_name(NEW_ID, "full")
    assert manifest["duration"] == 9.123
    assert manifest["disks"][0] == {"node": "drive0", "device": DISKS[0]["device"], "image": "0000-full/drive0.qcow2",
                                    "backing": None, "virtual_size": 10 * GIB, "image_size": 123456,
                                    "bytes_copied": 10 * GIB // 4, "duration": 3.25, "checked": True}


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_manifest_of_an_incremental_matches_the_schema(mode):
    entries, images = make_chain(("full", "incremental"))
    result = plan(entries, images, chain_bitmaps(), mode=mode)
    manifest = _finish(result, mode)
    assert schema_errors(manifest) == []
    assert (manifest["sequence"], manifest["level"], manifest["based_on"], manifest["mode"]) == (2, "incremental", 1, mode)
    assert manifest["bitmap"] == result["next_bitmap"]
    assert [d["backing"] for d in manifest["disks"]] == ["0001-incremental/drive0.qcow2", "0001-incremental/drive1.qcow2"]


def test_manifest_of_a_differential_and_of_a_second_full_match_the_schema():
    entries, images = make_chain(("full", "incremental"))
    assert schema_errors(_finish(plan(entries, images, chain_bitmaps(), level="differential"))) == []
    entries, images = make_chain(("full",), chain=NEW_ID)
    second = _finish(plan(entries, images, [], level="full"))
    assert second["chain"] == NEW_ID + "x"
    assert schema_errors(second) == []


def test_manifest_with_nothing_measured_still_matches_the_schema():
    result = plan([], [], [])
    manifest = backup_manifest(result, "vm1", "pull", "2026-11-23T02:00:00Z", "2026-11-23T02:00:00Z", 0,
                               {"major": 7, "minor": 2, "micro": 22}, None, None, False)
    assert schema_errors(manifest) == []
    assert manifest["qemu"]["package"] == ""
    assert [(d["image_size"], d["bytes_copied"], d["duration"], d["checked"]) for d in manifest["disks"]] == [
        (0, 0, None, False), (0, 0, None, False)]


def test_schema_catches_a_broken_manifest():
    manifest = _finish(plan([], [], []))
    manifest["disks"][0]["image"] = "../escape.qcow2"
    manifest["chain"] = "yesterday"
    assert len(schema_errors(manifest)) == 2


def test_written_manifests_continue_the_chain():
    """full, then incremental, then differential: each plan reads the manifests the earlier ones wrote."""
    entries, images = [], []
    bitmaps = chain_bitmaps(NEW_ID)
    expected = [("full", 0, None), ("incremental", 1, 0), ("incremental", 2, 1), ("differential", 3, 0),
                ("incremental", 4, 3)]
    for level, sequence, based_on in expected:
        result = plan(entries, images, bitmaps, level="auto" if level == "incremental" else level)
        assert (result["level"], result["sequence"], result["based_on"]) == (level, sequence, based_on)
        assert result["warnings"] == []
        manifest = _finish(result)
        assert schema_errors(manifest) == []
        entries.append(slurped({"path": result["manifest_path"], "content": manifest}))
        images.extend(d["image_path"] for d in result["disks"])
        for disk in result["disks"]:
            if disk["backing_path"]:
                assert disk["backing_path"] in images
                assert os.path.normpath(os.path.join(os.path.dirname(disk["image_path"]), disk["backing_header"])) \
                    == disk["backing_path"]
