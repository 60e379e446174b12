# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of backup_catalog: a VM's backup folder as found on disk, points, lineages and the next plan.

Each test writes a fake backup folder (ROOT/CHAIN/NNNN-LEVEL/DISK.qcow2 with
any bytes, ROOT/CHAIN/NNNN-LEVEL.json valid format 2 manifests) with `Store`.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.backup_catalog import (
    DAMAGE_FILE,
    JOB_PREFIX,
    UNFINISHED,
    BackupChainError,
    Catalog,
    chain_problem,
    chains_to_delete,
    full_bitmap,
    keep_bitmaps,
    plan_backup,
    since_bitmap,
)
from ansible_collections.qemu.qmp.plugins.module_utils.backup_digest import file_digest
from ansible_collections.qemu.qmp.plugins.module_utils.backup_manifest import manifest_errors

PREFIX = "qemu-qmp-backup"
CHAIN = "20261201T100000Z"
OTHER = "20261215T100000Z"
NEW = "20261231T235959Z"  # the chain id plan_backup is given for a new full chain
GIB = 1 << 30
_AUTO = object()


def disk(node="disk0", size=GIB, device=None, drv="qcow2"):
    """A disk as plan_backup takes them: {node, device, size, drv}."""
    return {"node": node, "device": device or "virtio-" + node, "size": size, "drv": drv}


def bitmap(name, node="disk0", **changes):
    """A QEMU dirty bitmap, normalised."""
    found = {"node": node, "name": name, "count": 4096, "recording": True, "busy": False, "inconsistent": False,
             "persistent": True, "granularity": 65536}
    found.update(changes)
    return found


def bitmaps_of(manifest):
    """The bitmaps a healthy VM carries after the backup of `manifest`."""
    return [bitmap(name, d["node"]) for d in manifest["disks"]
            for name in (manifest["bitmap"], manifest["full_bitmap"])]


class Store:
    """Writes backups of one VM the way the engine does: images, then the manifest, the commit record."""

    def __init__(self, root):
        self.root = str(root)
        self.generation = 0
        self.names = {}  # (chain, sequence): folder name

    def chain_dir(self, chain):
        return os.path.join(self.root, chain)

    def path(self, chain, sequence, *parts):
        return os.path.join(self.root, chain, self.names[(chain, sequence)], *parts)

    def manifest_path(self, chain, sequence):
        return self.path(chain, sequence) + ".json"

    def add(self, chain, sequence, level=None, based_on=_AUTO, nodes=("disk0",), manifest=True, unfinished=False,
            generation=None, sizes=None, fmt=2, check=True):
        """Write backup `sequence` of `chain`; returns its manifest (written unless manifest=False)."""
        level = level or ("full" if sequence == 0 else "incremental")
        name = "%04d-%s" % (sequence, level)
        self.names[(chain, sequence)] = name
        folder = os.path.join(self.root, chain, name)
        os.makedirs(folder, exist_ok=True)
        if based_on is _AUTO:
            based_on = None if level == "full" else 0 if level == "differential" else sequence - 1
        if generation is None:
            generation = self.generation + 1
        self.generation = max(self.generation, generation)
        disks = []
        for node in nodes:
            image = "%s/%s.qcow2" % (name, node)
            path = os.path.join(self.root, chain, image)
            with open(path, "wb") as handle:
                handle.write(("%s %s\n" % (chain, image)).encode() * (sequence + 3))
            size = os.path.getsize(path)
            disks.append({
                "node": node, "device": "virtio-" + node, "image": image,
                "backing": None if based_on is None else "%s/%s.qcow2" % (self.names[(chain, based_on)], node),
                "virtual_size": (sizes or {}).get(node, GIB), "image_size": size, "bytes_copied": size,
                "duration": 0.5, "checked": True, "digest": file_digest(path, chunk_size=4096),
            })
        if unfinished:
            open(os.path.join(folder, UNFINISHED), "w").close()
        if fmt == 1:
            doc = {"format": 1, "chain": chain, "sequence": sequence, "level": level, "based_on": based_on,
                   "bitmap": since_bitmap(PREFIX, chain, sequence), "full_bitmap": full_bitmap(PREFIX, chain),
                   "finished": "2025-01-01T00:%02d:00Z" % (generation % 60),
                   "disks": [dict((k, d[k]) for k in ("node", "image", "backing", "virtual_size", "image_size"))
                             for d in disks]}
        else:
            doc = {
                "format": 2, "vm": "vm1", "host": "host1", "chain": chain, "generation": generation,
                "sequence": sequence, "level": level, "mode": "push", "based_on": based_on,
                "bitmap": since_bitmap(PREFIX, chain, sequence), "full_bitmap": full_bitmap(PREFIX, chain),
                "started": "2026-12-01T10:%02d:00Z" % (generation % 60),
                "finished": "2026-12-01T10:%02d:30Z" % (generation % 60), "duration": 30.0,
                "qemu": {"major": 8, "minor": 2, "micro": 0, "package": ""}, "disks": disks,
            }
        if check:
            assert manifest_errors(doc) == []
        if manifest:
            self.write_manifest(chain, sequence, doc)
        return doc

    def write_manifest(self, chain, sequence, doc):
        with open(self.manifest_path(chain, sequence), "w", encoding="utf-8") as handle:
            json.dump(doc, handle)

    def catalog(self):
        return Catalog(self.root)


@pytest.fixture(name="store")
def fixture_store(tmp_path):
    return Store(tmp_path / "vm1")


def labels(backups):
    return [b.label for b in backups]


def seqs(backups):
    return [b.sequence for b in backups]


# -- scanning ----------------------------------------------------------------

def test_missing_root_is_an_empty_catalog(tmp_path):
    catalog = Catalog(str(tmp_path / "none"))
    assert catalog.chains == {}
    assert catalog.committed() == [] and catalog.ordered() == [] and catalog.unfinished() == []
    assert catalog.lost() == [] and catalog.damaged() == []
    assert catalog.newest_chain() is None and catalog.newest_committed() is None
    assert catalog.next_generation() == 1
    assert keep_bitmaps(catalog) == set()
    with pytest.raises(BackupChainError, match="there are no backups under"):
        catalog.point("latest")


def test_root_that_is_a_file_raises(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(BackupChainError, match="cannot read the backup folder"):
        Catalog(str(path))


def test_chains_and_committed_backups(store):
    docs = [store.add(CHAIN, 0), store.add(CHAIN, 1), store.add(CHAIN, 2)]
    store.add(OTHER, 0, nodes=("disk0", "disk1"))
    store.add(OTHER, 1, "differential")
    catalog = store.catalog()
    assert sorted(catalog.chains) == [CHAIN, OTHER]
    assert labels(catalog.chains[CHAIN].backups) == [
        CHAIN + "/0000-full", CHAIN + "/0001-incremental", CHAIN + "/0002-incremental"]
    assert sorted(labels(catalog.committed())) == sorted([
        CHAIN + "/0000-full", CHAIN + "/0001-incremental", CHAIN + "/0002-incremental",
        OTHER + "/0000-full", OTHER + "/0001-differential"])
    assert catalog.damaged() == [] and catalog.lost() == [] and catalog.unfinished() == []
    assert catalog.problems == [] and catalog.temp_files == []
    second = catalog.chains[CHAIN].backup(1)
    assert second.committed and second.has_dir and second.has_manifest_file and not second.unfinished
    assert second.manifest == docs[1]
    assert second.problem is None
    assert second.dir == store.path(CHAIN, 1)
    assert second.manifest_path == store.manifest_path(CHAIN, 1)
    assert second.images() == {"disk0": store.path(CHAIN, 1, "disk0.qcow2")}
    assert second.disk("disk0")["image"] == "0001-incremental/disk0.qcow2"
    assert second.disk("disk1") is None
    assert catalog.chains[OTHER].backup(0).images() == {
        "disk0": store.path(OTHER, 0, "disk0.qcow2"), "disk1": store.path(OTHER, 0, "disk1.qcow2")}
    assert catalog.chains[CHAIN].backup(7) is None


def test_other_names_are_ignored(store):
    store.add(CHAIN, 0)
    root = store.root
    os.makedirs(os.path.join(root, "lost+found"))
    os.makedirs(os.path.join(root, "20261201T100000"))  # no Z
    os.makedirs(os.path.join(root, "20261201T100000Zy"))
    with open(os.path.join(root, "20261202T100000Z"), "w") as handle:  # a file, not a folder
        handle.write("x")
    with open(os.path.join(root, ".journal.json"), "w") as handle:
        handle.write("{}")
    chain_dir = store.chain_dir(CHAIN)
    for name in ("001-full", "0001-partial", "0001-incremental.json.bak", "README"):
        os.makedirs(os.path.join(chain_dir, name))
    catalog = store.catalog()
    assert list(catalog.chains) == [CHAIN]
    assert seqs(catalog.chains[CHAIN].backups) == [0]
    assert catalog.lost() == [] and catalog.damaged() == []


def test_temporary_manifests_are_listed(store):
    store.add(CHAIN, 0)
    temp = os.path.join(store.chain_dir(CHAIN), ".0001-incremental.json.k2j3h4.tmp")
    with open(temp, "w") as handle:
        handle.write("{")
    catalog = store.catalog()
    assert catalog.temp_files == [temp]
    assert seqs(catalog.chains[CHAIN].backups) == [0]
    assert catalog.damaged() == []


def test_a_format_1_manifest_is_committed(store):
    store.add(CHAIN, 0, fmt=1)
    catalog = store.catalog()
    (backup,) = catalog.committed()
    assert backup.manifest["format"] == 1
    assert catalog.chains[CHAIN].generation == 0
    assert catalog.next_generation() == 1


def _truncate(text):
    return text[:len(text) // 2]


# (what is wrong, how the manifest text of backup 1 is changed, what the problem says)
DAMAGED = [
    ("truncated JSON", _truncate, "is not valid JSON"),
    ("empty file", lambda text: "", "is not valid JSON"),
    ("JSON list", lambda text: "[%s]" % text, "$: is not a JSON object"),
    ("JSON string", json.dumps, "$: is not a JSON object"),
    ("unknown format", lambda text: text.replace('"format": 2', '"format": 3'), "$.format: 3 is not a format"),
    ("no disks", lambda text: json.dumps(dict(json.loads(text), disks=[])), "$.disks"),
    ("no generation", lambda text: json.dumps(dict((k, v) for k, v in json.loads(text).items() if k != "generation")),
     "$: generation is missing"),
    ("other chain", lambda text: json.dumps(dict(json.loads(text), chain=OTHER)),
     "its chain is %r, its file name says %r" % (OTHER, CHAIN)),
    ("other sequence", lambda text: json.dumps(dict(json.loads(text), sequence=2)),
     "its sequence is 2, its file name says 1"),
    ("other level", lambda text: json.dumps(dict(json.loads(text), level="differential")),
     "its level is 'differential', its file name says 'incremental'"),
]


def _with_disk(**changes):
    def change(text):
        doc = json.loads(text)
        doc["disks"][0].update(changes)
        return json.dumps(doc)
    return change


DAMAGED += [
    ("image of another backup", _with_disk(image="0000-full/disk0.qcow2"), "is not in the backup's own folder"),
    ("image of a later backup", _with_disk(image="0002-incremental/disk0.qcow2"), "is not in the backup's own folder"),
    ("image with ..", _with_disk(image="0001-incremental/..qcow2"), "is not in the backup's own folder"),
    ("image outside the chain", _with_disk(image="../x/disk0.qcow2"), "$.disks[0].image"),
    ("absolute backing", _with_disk(backing="/etc/0000-full/disk0.qcow2"), "is not an image of the chain"),
    ("backing with ..", _with_disk(backing="../%s/0000-full/disk0.qcow2" % OTHER), "is not an image of the chain"),
    ("backing without folder", _with_disk(backing="disk0.qcow2"), "is not an image of the chain"),
]


@pytest.mark.parametrize("change, says", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_damaged_manifest_is_not_committed_and_named(store, change, says):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1)
    path = store.manifest_path(CHAIN, 1)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(change(text))
    catalog = store.catalog()
    backup = catalog.chains[CHAIN].backup(1)
    assert not backup.committed
    assert backup.manifest is None
    assert backup.problem.startswith("manifest %s " % path)
    assert says in backup.problem
    assert catalog.damaged() == [backup]
    assert labels(catalog.committed()) == [CHAIN + "/0000-full"]
    assert catalog.lost() == [] and catalog.unfinished() == []


def test_manifest_that_is_not_utf8_is_damaged(store):
    store.add(CHAIN, 0)
    path = store.manifest_path(CHAIN, 0)
    with open(path, "wb") as handle:
        handle.write(b"\xff\xfe\x00{")
    backup = store.catalog().chains[CHAIN].backup(0)
    assert not backup.committed
    assert backup.problem.startswith("manifest %s is not valid JSON" % path)


def test_manifest_that_cannot_be_read(store):
    store.add(CHAIN, 0)
    os.makedirs(os.path.join(store.chain_dir(CHAIN), "0001-incremental.json"))
    backup = store.catalog().chains[CHAIN].backup(1)
    assert backup.has_manifest_file and not backup.has_dir
    assert not backup.committed
    assert backup.problem.startswith("manifest %s cannot be read" % os.path.join(store.chain_dir(CHAIN),
                                                                                 "0001-incremental.json"))


@pytest.mark.parametrize("disks", [5, ["x"], [None]], ids=["int", "list of str", "list of null"])
def test_format_1_manifest_of_the_wrong_shape_is_damaged_not_a_crash(store, disks):
    doc = store.add(CHAIN, 0, fmt=1)
    store.write_manifest(CHAIN, 0, dict(doc, disks=disks))
    catalog = store.catalog()
    backup = catalog.chains[CHAIN].backup(0)
    assert not backup.committed
    assert store.manifest_path(CHAIN, 0) in backup.problem


# -- unfinished and lost backups ------------------------------------------------

def test_unfinished_last_backup(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1)
    store.add(CHAIN, 2, manifest=False, unfinished=True)
    catalog = store.catalog()
    chain = catalog.chains[CHAIN]
    assert labels(catalog.unfinished()) == [CHAIN + "/0002-incremental"]
    assert catalog.lost() == []
    assert catalog.damaged() == []
    assert chain.newest().sequence == 1
    assert catalog.point("latest").sequence == 1
    assert catalog.point(CHAIN).sequence == 1


def test_marked_backup_with_a_later_backup_is_lost_not_unfinished(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1, manifest=False, unfinished=True)
    store.add(CHAIN, 2)
    catalog = store.catalog()
    assert catalog.unfinished() == []
    assert labels(catalog.lost()) == [CHAIN + "/0001-incremental"]


def test_only_the_last_of_several_marked_backups_is_unfinished(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1, manifest=False, unfinished=True)
    store.add(CHAIN, 2, manifest=False, unfinished=True)
    catalog = store.catalog()
    assert labels(catalog.unfinished()) == [CHAIN + "/0002-incremental"]
    assert labels(catalog.lost()) == [CHAIN + "/0001-incremental"]


def test_unmarked_backup_without_manifest_is_lost(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1, manifest=False)
    catalog = store.catalog()
    assert catalog.unfinished() == []
    assert labels(catalog.lost()) == [CHAIN + "/0001-incremental"]
    assert catalog.damaged() == []
    lost = catalog.lost()[0]
    assert lost.has_dir and not lost.has_manifest_file and not lost.unfinished and not lost.committed
    # it is the newest backup of its chain: points do not skip it
    with pytest.raises(BackupChainError, match=re.escape(store.manifest_path(CHAIN, 1)) + ".*missing"):
        catalog.point("latest")


def test_marked_backup_with_a_manifest_is_committed(store):
    # killed between writing the manifest and removing the marker
    store.add(CHAIN, 0)
    store.add(CHAIN, 1, unfinished=True)
    catalog = store.catalog()
    backup = catalog.chains[CHAIN].backup(1)
    assert backup.unfinished and backup.committed
    assert catalog.unfinished() == [] and catalog.lost() == []
    assert catalog.point("latest") is backup


def test_a_chain_with_only_an_unfinished_backup(store):
    store.add(CHAIN, 0)
    store.add(OTHER, 0, manifest=False, unfinished=True)
    catalog = store.catalog()
    assert sorted(catalog.chains) == [CHAIN, OTHER]
    assert [c.id for c in catalog.ordered()] == [CHAIN]
    assert labels(catalog.unfinished()) == [OTHER + "/0000-full"]
    assert catalog.newest_chain().id == CHAIN
    with pytest.raises(BackupChainError, match="there is no chain %s" % OTHER):
        catalog.point(OTHER)
    # forgetting its only backup forgets the chain
    catalog.forget(catalog.unfinished()[0])
    assert list(catalog.chains) == [CHAIN]


def test_forget(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1, manifest=False, unfinished=True)
    catalog = store.catalog()
    catalog.forget(catalog.unfinished()[0])
    assert seqs(catalog.chains[CHAIN].backups) == [0]
    assert catalog.unfinished() == []


# -- order of chains -------------------------------------------------------------

def test_chains_are_ordered_by_generation_not_by_name(store):
    late_name = "20300101T000000Z"  # its clock was ahead
    store.add(late_name, 0, generation=1)
    store.add(late_name, 1, generation=2)
    store.add(CHAIN, 0, generation=3)
    catalog = store.catalog()
    assert catalog.chains[late_name].generation == 1
    assert catalog.chains[CHAIN].generation == 3
    assert [c.id for c in catalog.ordered()] == [late_name, CHAIN]
    assert catalog.newest_chain().id == CHAIN
    assert catalog.point("latest").label == CHAIN + "/0000-full"
    assert catalog.newest_committed().label == CHAIN + "/0000-full"
    assert catalog.next_generation() == 4


def test_next_generation_and_newest_committed(store):
    store.add(CHAIN, 0, generation=5)
    store.add(CHAIN, 1, generation=9)
    store.add(OTHER, 0, generation=7)
    catalog = store.catalog()
    assert catalog.next_generation() == 10
    assert catalog.newest_committed().label == CHAIN + "/0001-incremental"
    assert [c.id for c in catalog.ordered()] == [CHAIN, OTHER]  # CHAIN began first (5 < 7)


def test_damage_file_is_read(store):
    store.add(CHAIN, 0)
    damage = {"found": "2026-12-02T00:00:00Z", "problems": ["image x differs at 0-4096"]}
    with open(os.path.join(store.chain_dir(CHAIN), DAMAGE_FILE), "w") as handle:
        json.dump(damage, handle)
    assert store.catalog().chains[CHAIN].damage == damage


@pytest.mark.parametrize("text, says", [("{oops", "cannot be read"), ("[1, 2]", "is not a JSON object")])
def test_unreadable_damage_file_still_marks_the_chain(store, text, says):
    store.add(CHAIN, 0)
    path = os.path.join(store.chain_dir(CHAIN), DAMAGE_FILE)
    with open(path, "w") as handle:
        handle.write(text)
    damage = store.catalog().chains[CHAIN].damage
    (problem,) = damage["problems"]
    assert problem.startswith(path) and says in problem


# -- points ----------------------------------------------------------------------

@pytest.fixture(name="two_chains")
def fixture_two_chains(store):
    """CHAIN: 0 full, 1 and 2 incremental; OTHER (newer): 0 full, 1 incremental."""
    for sequence in range(3):
        store.add(CHAIN, sequence)
    store.add(OTHER, 0)
    store.add(OTHER, 1)
    return store


@pytest.mark.parametrize("spec, label", [
    ("latest", OTHER + "/0001-incremental"),
    (None, OTHER + "/0001-incremental"),
    ("", OTHER + "/0001-incremental"),
    (" latest ", OTHER + "/0001-incremental"),
    (CHAIN, CHAIN + "/0002-incremental"),
    (CHAIN + "/", CHAIN + "/0002-incremental"),
    (CHAIN + "/1", CHAIN + "/0001-incremental"),
    (CHAIN + "/0001", CHAIN + "/0001-incremental"),
    (CHAIN + "/0", CHAIN + "/0000-full"),
    (OTHER + "/0", OTHER + "/0000-full"),
])
def test_point(two_chains, spec, label):
    backup = two_chains.catalog().point(spec)
    assert backup.label == label
    assert backup.committed


def test_point_of_an_unknown_chain(two_chains):
    with pytest.raises(BackupChainError) as info:
        two_chains.catalog().point("20250101T000000Z/1")
    assert "there is no chain 20250101T000000Z under %s (chains: %s, %s)" % (two_chains.root, CHAIN, OTHER) \
        == str(info.value)


@pytest.mark.parametrize("sequence", ["one", "1.5", "0x1"])
def test_point_with_a_bad_sequence(two_chains, sequence):
    with pytest.raises(BackupChainError, match="the part after / is a backup's sequence number"):
        two_chains.catalog().point("%s/%s" % (CHAIN, sequence))


def test_point_with_a_sequence_the_chain_does_not_have(two_chains):
    with pytest.raises(BackupChainError, match=r"chain %s has no backup 9 \(it has 0, 1, 2\)" % CHAIN):
        two_chains.catalog().point(CHAIN + "/9")


@pytest.mark.parametrize("spec", ["latest", OTHER, OTHER + "/1"])
def test_point_at_a_damaged_newest_manifest_raises_naming_it(two_chains, spec):
    path = two_chains.manifest_path(OTHER, 1)
    with open(path, "r+") as handle:
        handle.truncate(20)
    with pytest.raises(BackupChainError) as info:
        two_chains.catalog().point(spec)
    assert path in str(info.value)
    assert "not valid JSON" in str(info.value)
    assert info.value.details == {"damaged": path}


def test_point_at_the_backup_before_a_damaged_one_still_works(two_chains):
    with open(two_chains.manifest_path(OTHER, 1), "w") as handle:
        handle.write("{}")
    assert two_chains.catalog().point(OTHER + "/0").label == OTHER + "/0000-full"


def test_latest_never_falls_back_when_the_newest_chain_has_no_readable_manifest(two_chains):
    newest = "20270101T000000Z"
    two_chains.add(newest, 0)  # generation 6, the newest backup taken
    path = two_chains.manifest_path(newest, 0)
    with open(path, "r+") as handle:
        handle.truncate(20)
    with pytest.raises(BackupChainError, match=re.escape(path)):
        two_chains.catalog().point("latest")


# -- lineages --------------------------------------------------------------------

def test_lineage_of_incrementals(store):
    for sequence in range(4):
        store.add(CHAIN, sequence)
    catalog = store.catalog()
    assert seqs(catalog.lineage(catalog.point("latest"))) == [3, 2, 1, 0]
    assert seqs(catalog.lineage(catalog.point(CHAIN + "/1"))) == [1, 0]
    assert seqs(catalog.lineage(catalog.point(CHAIN + "/0"))) == [0]


def test_lineage_through_a_differential(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1)
    store.add(CHAIN, 2, "differential")
    store.add(CHAIN, 3)
    catalog = store.catalog()
    assert labels(catalog.lineage(catalog.point("latest"))) == [
        CHAIN + "/0003-incremental", CHAIN + "/0002-differential", CHAIN + "/0000-full"]


def test_lineage_with_a_lost_base(store):
    for sequence in range(3):
        store.add(CHAIN, sequence)
    os.unlink(store.manifest_path(CHAIN, 1))
    catalog = store.catalog()
    point = catalog.point(CHAIN + "/2")
    with pytest.raises(BackupChainError) as info:
        catalog.lineage(point)
    assert "is based on %s/0001-incremental" % CHAIN in str(info.value)
    assert "its manifest %s is missing" % store.manifest_path(CHAIN, 1) in str(info.value)
    assert info.value.details == {"damaged": store.manifest_path(CHAIN, 1)}


def test_lineage_with_a_damaged_base(store):
    for sequence in range(3):
        store.add(CHAIN, sequence)
    with open(store.manifest_path(CHAIN, 0), "w") as handle:
        handle.write('{"format": 2')
    catalog = store.catalog()
    with pytest.raises(BackupChainError) as info:
        catalog.lineage(catalog.point("latest"))
    assert "is based on %s/0000-full, which cannot be used: manifest %s is not valid JSON" % (
        CHAIN, store.manifest_path(CHAIN, 0)) in str(info.value)
    assert info.value.details == {"damaged": store.manifest_path(CHAIN, 0)}


def test_lineage_with_a_base_that_is_gone(store):
    for sequence in range(3):
        store.add(CHAIN, sequence)
    shutil.rmtree(store.path(CHAIN, 1))
    os.unlink(store.manifest_path(CHAIN, 1))
    catalog = store.catalog()
    with pytest.raises(BackupChainError, match="is based on backup 1 of its chain, which is gone"):
        catalog.lineage(catalog.point("latest"))


def test_lineage_based_on_itself(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1, based_on=1)
    catalog = store.catalog()
    with pytest.raises(BackupChainError, match="based on each other in a loop"):
        catalog.lineage(catalog.point("latest"))


def test_lineage_in_a_loop(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1)
    store.add(CHAIN, 2)
    doc = json.load(open(store.manifest_path(CHAIN, 1)))
    doc["based_on"] = 2
    doc["disks"][0]["backing"] = "0002-incremental/disk0.qcow2"
    store.write_manifest(CHAIN, 1, doc)
    catalog = store.catalog()
    with pytest.raises(BackupChainError):
        catalog.lineage(catalog.point("latest"))


def test_lineage_that_does_not_reach_a_full(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1, based_on=None)
    catalog = store.catalog()
    with pytest.raises(BackupChainError, match="does not lead to a full backup"):
        catalog.lineage(catalog.point("latest"))


# -- the next backup -----------------------------------------------------------------

def plan(catalog, disks, bitmaps, level="auto", mode="push", chain_id=NEW):
    return plan_backup(catalog, disks, bitmaps, level, mode, PREFIX, chain_id)


@pytest.mark.parametrize("level, warned", [("auto", False), ("full", False), ("incremental", True),
                                           ("differential", True)])
def test_plan_without_a_chain_is_a_full_backup(store, level, warned):
    result = plan(store.catalog(), [disk("disk0"), disk("disk1", size=2 * GIB)], [], level=level, mode="pull")
    chain_dir = os.path.join(store.root, NEW)
    assert result == {
        "level": "full", "new_chain": True, "chain": NEW, "sequence": 0, "name": "0000-full", "mode": "pull",
        "chain_dir": chain_dir, "dir": os.path.join(chain_dir, "0000-full"),
        "manifest_path": os.path.join(chain_dir, "0000-full.json"),
        "based_on": None, "read_bitmap": None, "since_bitmap": "%s-%s-0000" % (PREFIX, NEW),
        "full_bitmap": "%s-%s-full" % (PREFIX, NEW),
        "add_bitmaps": ["%s-%s-0000" % (PREFIX, NEW), "%s-%s-full" % (PREFIX, NEW)], "drop_bitmaps": [],
        "disks": [
            {"node": "disk0", "device": "virtio-disk0", "size": GIB, "drv": "qcow2", "target": "qmpbk0",
             "job_id": JOB_PREFIX + "disk0", "image": "0000-full/disk0.qcow2",
             "image_path": os.path.join(chain_dir, "0000-full", "disk0.qcow2"), "backing": None,
             "backing_header": None},
            {"node": "disk1", "device": "virtio-disk1", "size": 2 * GIB, "drv": "qcow2", "target": "qmpbk1",
             "job_id": JOB_PREFIX + "disk1", "image": "0000-full/disk1.qcow2",
             "image_path": os.path.join(chain_dir, "0000-full", "disk1.qcow2"), "backing": None,
             "backing_header": None},
        ],
        "warnings": ["no backup chain exists yet: taking a full backup instead of the %s one asked for" % level]
        if warned else [],
    }


@pytest.fixture(name="healthy")
def fixture_healthy(store):
    """CHAIN: 0 full, 1 and 2 incremental of disk0; returns (store, disks, bitmaps) QEMU has now."""
    for sequence in range(3):
        last = store.add(CHAIN, sequence)
    return store, [disk("disk0")], bitmaps_of(last)


def test_healthy_chain_has_no_problem(healthy):
    store, disks, bitmaps = healthy
    catalog = store.catalog()
    assert chain_problem(catalog.chains[CHAIN], disks, bitmaps, PREFIX) is None


def test_plan_of_an_incremental(healthy):
    store, disks, bitmaps = healthy
    result = plan(store.catalog(), disks, bitmaps)
    chain_dir = store.chain_dir(CHAIN)
    assert result["warnings"] == []
    assert (result["level"], result["new_chain"], result["chain"], result["sequence"], result["name"]) == (
        "incremental", False, CHAIN, 3, "0003-incremental")
    assert result["based_on"] == 2
    assert result["read_bitmap"] == "%s-%s-0002" % (PREFIX, CHAIN)
    assert result["add_bitmaps"] == ["%s-%s-0003" % (PREFIX, CHAIN)] == [result["since_bitmap"]]
    assert result["drop_bitmaps"] == ["%s-%s-0002" % (PREFIX, CHAIN)]
    assert result["full_bitmap"] == "%s-%s-full" % (PREFIX, CHAIN)
    assert result["dir"] == os.path.join(chain_dir, "0003-incremental")
    assert result["manifest_path"] == os.path.join(chain_dir, "0003-incremental.json")
    (planned,) = result["disks"]
    assert planned["image"] == "0003-incremental/disk0.qcow2"
    assert planned["image_path"] == os.path.join(chain_dir, "0003-incremental", "disk0.qcow2")
    assert planned["backing"] == "0002-incremental/disk0.qcow2"
    assert planned["backing_header"] == "../0002-incremental/disk0.qcow2"


@pytest.mark.parametrize("level", ["auto", "incremental"])
def test_plan_reads_the_bitmap_of_the_last_manifest(store, level):
    # The bitmap names come from the manifest, not from the naming scheme.
    store.add(CHAIN, 0)
    last = store.add(CHAIN, 1, check=False, manifest=False)
    last["bitmap"] = "custom-since"
    store.write_manifest(CHAIN, 1, last)
    result = plan(store.catalog(), [disk()], bitmaps_of(last), level=level)
    assert result["level"] == "incremental"
    assert result["read_bitmap"] == "custom-since"
    assert result["drop_bitmaps"] == ["custom-since"]
    assert result["add_bitmaps"] == ["%s-%s-0002" % (PREFIX, CHAIN)]


def test_plan_of_a_differential(healthy):
    store, disks, bitmaps = healthy
    result = plan(store.catalog(), disks, bitmaps, level="differential")
    assert result["warnings"] == []
    assert (result["level"], result["chain"], result["sequence"], result["name"]) == (
        "differential", CHAIN, 3, "0003-differential")
    assert result["based_on"] == 0
    assert result["read_bitmap"] == "%s-%s-full" % (PREFIX, CHAIN) == result["full_bitmap"]
    assert result["add_bitmaps"] == ["%s-%s-0003" % (PREFIX, CHAIN)]
    assert result["drop_bitmaps"] == ["%s-%s-0002" % (PREFIX, CHAIN)]
    assert result["disks"][0]["backing"] == "0000-full/disk0.qcow2"
    assert result["disks"][0]["backing_header"] == "../0000-full/disk0.qcow2"


def test_plan_after_a_differential(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1)
    last = store.add(CHAIN, 2, "differential")
    result = plan(store.catalog(), [disk()], bitmaps_of(last))
    assert (result["level"], result["based_on"], result["read_bitmap"]) == (
        "incremental", 2, "%s-%s-0002" % (PREFIX, CHAIN))
    assert result["disks"][0]["backing_header"] == "../0002-differential/disk0.qcow2"


def test_plan_full_on_a_healthy_chain_starts_a_new_chain(healthy):
    store, disks, bitmaps = healthy
    result = plan(store.catalog(), disks, bitmaps, level="full")
    assert result["warnings"] == []
    assert (result["level"], result["new_chain"], result["chain"], result["sequence"]) == ("full", True, NEW, 0)
    assert result["read_bitmap"] is None and result["based_on"] is None and result["drop_bitmaps"] == []


def test_plan_of_several_disks(store):
    last = store.add(CHAIN, 0, nodes=("disk0", "disk1"), sizes={"disk1": 2 * GIB})
    disks = [disk("disk1", size=2 * GIB), disk("disk0")]
    result = plan(store.catalog(), disks, bitmaps_of(last))
    assert result["level"] == "incremental" and result["warnings"] == []
    assert [(d["node"], d["target"], d["job_id"], d["backing_header"]) for d in result["disks"]] == [
        ("disk1", "qmpbk0", JOB_PREFIX + "disk1", "../0000-full/disk1.qcow2"),
        ("disk0", "qmpbk1", JOB_PREFIX + "disk0", "../0000-full/disk0.qcow2")]


def test_plan_continues_the_newest_chain_by_generation(store):
    late_name = "20300101T000000Z"
    store.add(late_name, 0, generation=1)
    last = store.add(CHAIN, 0, generation=2)
    result = plan(store.catalog(), [disk()], bitmaps_of(last))
    assert (result["level"], result["chain"], result["sequence"]) == ("incremental", CHAIN, 1)


@pytest.mark.parametrize("level", ["Full", "auto ", "", None, "incr", 1])
def test_plan_with_an_invalid_level_raises(healthy, level):
    store, disks, bitmaps = healthy
    with pytest.raises(BackupChainError, match="level must be auto, full, incremental or differential"):
        plan(store.catalog(), disks, bitmaps, level=level)


def test_plan_without_disks_raises(healthy):
    store, dummy, bitmaps = healthy
    with pytest.raises(BackupChainError, match="there are no disks to back up"):
        plan(store.catalog(), [], bitmaps)


def test_new_chain_id_that_exists_gets_an_x(store):
    store.add(CHAIN, 0)
    store.add(CHAIN + "x", 0)
    store.add(OTHER, 0, manifest=False, unfinished=True)  # a chain of an unfinished backup only
    catalog = store.catalog()
    assert plan(catalog, [disk()], [], level="full", chain_id=CHAIN)["chain"] == CHAIN + "xx"
    assert plan(catalog, [disk()], [], level="full", chain_id=OTHER)["chain"] == OTHER + "x"
    result = plan(catalog, [disk()], [], level="full", chain_id=NEW)
    assert result["chain"] == NEW
    assert result["add_bitmaps"] == ["%s-%s-0000" % (PREFIX, NEW), "%s-%s-full" % (PREFIX, NEW)]


# -- chains that cannot go on ------------------------------------------------------

SINCE = "%s-%s-0002" % (PREFIX, CHAIN)
FULL = "%s-%s-full" % (PREFIX, CHAIN)


def _bitmap_change(name, **changes):
    def change(store, disks, bitmaps):
        return disks, [dict(b, **changes) if b["name"] == name else b for b in bitmaps]
    return change


def _without_bitmap(name, *extra):
    def change(store, disks, bitmaps):
        return disks, [b for b in bitmaps if b["name"] != name] + list(extra)
    return change


def _disks(*disks):
    def change(store, dummy, bitmaps):
        return list(disks), bitmaps
    return change


def _remove_image(store, disks, bitmaps):
    os.unlink(store.path(CHAIN, 0, "disk0.qcow2"))
    return disks, bitmaps


def _grow_image(store, disks, bitmaps):
    with open(store.path(CHAIN, 1, "disk0.qcow2"), "ab") as handle:
        handle.write(b"x")
    return disks, bitmaps


def _folder_is_a_file(store, disks, bitmaps):
    shutil.rmtree(store.path(CHAIN, 1))
    with open(store.path(CHAIN, 1), "w") as handle:
        handle.write("x")
    return disks, bitmaps


def _lose_manifest(store, disks, bitmaps):
    os.unlink(store.manifest_path(CHAIN, 1))
    return disks, bitmaps


def _damage_manifest(store, disks, bitmaps):
    with open(store.manifest_path(CHAIN, 1), "r+") as handle:
        handle.truncate(30)
    return disks, bitmaps


def _remove_backup(store, disks, bitmaps):
    shutil.rmtree(store.path(CHAIN, 1))
    os.unlink(store.manifest_path(CHAIN, 1))
    return disks, bitmaps


def _mark_damaged(content):
    def change(store, disks, bitmaps):
        with open(os.path.join(store.chain_dir(CHAIN), DAMAGE_FILE), "w") as handle:
            handle.write(content)
        return disks, bitmaps
    return change


# (why, how the VM or the folder changes, what the warning must say)
BROKEN = [
    ("since bitmap missing", _without_bitmap(SINCE),
     ["bitmap %s (what changed since backup 2) is missing on disk disk0" % SINCE]),
    ("since bitmap only on another disk", _without_bitmap(SINCE, bitmap(SINCE, "disk9")),
     ["bitmap %s" % SINCE, "is missing on disk disk0"]),
    ("rolled back", _without_bitmap(SINCE, bitmap("%s-%s-0001" % (PREFIX, CHAIN))),
     ["disk disk0 carries bitmap %s-%s-0001 of an older backup of this chain, not %s" % (PREFIX, CHAIN, SINCE),
      "rolled back"]),
    ("since bitmap inconsistent", _bitmap_change(SINCE, inconsistent=True),
     ["bitmap %s on disk disk0 is inconsistent" % SINCE]),
    ("since bitmap busy", _bitmap_change(SINCE, busy=True), ["bitmap %s on disk disk0 is busy" % SINCE]),
    ("since bitmap not recording", _bitmap_change(SINCE, recording=False),
     ["bitmap %s on disk disk0 does not record writes" % SINCE]),
    ("full bitmap missing", _without_bitmap(FULL),
     ["bitmap %s (what changed since the full backup) is missing on disk disk0" % FULL]),
    ("full bitmap inconsistent", _bitmap_change(FULL, inconsistent=True), ["bitmap %s" % FULL, "inconsistent"]),
    ("full bitmap not recording", _bitmap_change(FULL, recording=False), ["bitmap %s" % FULL, "does not record"]),
    ("a disk added", _disks(disk("disk0"), disk("disk1")),
     ["it holds other disks (disk0) than this backup (disk0, disk1)"]),
    ("a disk replaced", _disks(disk("disk1")), ["it holds other disks (disk0) than this backup (disk1)"]),
    ("disk size changed", _disks(disk("disk0", size=2 * GIB)),
     ["disk disk0 changed size (%d bytes, the chain has %d)" % (2 * GIB, GIB)]),
    ("image missing", _remove_image, ["its image ", "/%s/0000-full/disk0.qcow2 is missing" % CHAIN]),
    ("image size differs", _grow_image, ["its image ", "/%s/0001-incremental/disk0.qcow2 is " % CHAIN,
                                         "its manifest says", "(damaged or truncated)"]),
    ("image cannot be read", _folder_is_a_file, ["0001-incremental/disk0.qcow2 cannot be read"]),
    ("lost manifest in the middle", _lose_manifest,
     ["backup %s/0001-incremental has no manifest (lost or deleted)" % CHAIN]),
    ("damaged manifest", _damage_manifest, ["manifest ", "/%s/0001-incremental.json is not valid JSON" % CHAIN]),
    ("a backup missing in the middle", _remove_backup, ["is based on backup 1, which is gone"]),
    ("marked damaged", _mark_damaged(json.dumps({"found": "2026-12-02T03:04:05Z",
                                                 "problems": ["image 0001 differs", "image 0002 differs"]})),
     ["a verify or a restore found it damaged at 2026-12-02T03:04:05Z: image 0001 differs (",
      "/%s/%s)" % (CHAIN, DAMAGE_FILE)]),
    ("marked damaged, unreadable", _mark_damaged("{"), ["found it damaged at ?", "cannot be read"]),
    ("marked damaged, no problems", _mark_damaged("{}"), ["found it damaged at ?: ? ("]),
]


@pytest.mark.parametrize("level", ["auto", "incremental", "differential"])
@pytest.mark.parametrize("change, says", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_a_chain_that_cannot_go_on_gives_a_full_backup(healthy, change, says, level):
    store, disks, bitmaps = healthy
    disks, bitmaps = change(store, disks, bitmaps)
    catalog = store.catalog()
    problem = chain_problem(catalog.chains[CHAIN], disks, bitmaps, PREFIX)
    assert problem is not None
    for text in says:
        assert text in problem, problem
    result = plan(catalog, disks, bitmaps, level=level)
    wanted = "incremental" if level == "auto" else level
    assert result["warnings"] == ["starting a new full chain instead of the %s backup: chain %s cannot go on: %s"
                                  % (wanted, CHAIN, problem)]
    assert (result["level"], result["new_chain"], result["chain"], result["sequence"]) == ("full", True, NEW, 0)
    assert result["read_bitmap"] is None and result["based_on"] is None


def test_problem_names_the_image_path(healthy):
    store, disks, bitmaps = healthy
    _remove_image(store, disks, bitmaps)
    problem = chain_problem(store.catalog().chains[CHAIN], disks, bitmaps, PREFIX)
    assert problem == "its image %s is missing" % store.path(CHAIN, 0, "disk0.qcow2")


def test_a_format_1_newest_manifest_cannot_go_on(store):
    store.add(CHAIN, 0, fmt=1)
    last = store.add(CHAIN, 1, fmt=1)
    catalog = store.catalog()
    problem = chain_problem(catalog.chains[CHAIN], [disk()], bitmaps_of(last), PREFIX)
    assert problem == "it was written by an older version of the collection, without checksums"
    result = plan(catalog, [disk()], bitmaps_of(last))
    assert result["level"] == "full"
    assert problem in result["warnings"][0]


def test_a_chain_whose_first_backup_is_not_a_full(store):
    store.add(CHAIN, 0, "incremental", based_on=None)
    last = store.add(CHAIN, 1)
    catalog = store.catalog()
    assert chain_problem(catalog.chains[CHAIN], [disk()], bitmaps_of(last), PREFIX) == \
        "its first backup is not a full one"


def test_an_unfinished_last_backup_is_forgotten_before_planning(store):
    # The engine removes it and forgets it first; the chain then goes on from its last committed backup.
    store.add(CHAIN, 0)
    last = store.add(CHAIN, 1)
    store.add(CHAIN, 2, manifest=False, unfinished=True)
    catalog = store.catalog()
    assert "has no manifest" in chain_problem(catalog.chains[CHAIN], [disk()], bitmaps_of(last), PREFIX)
    for backup in catalog.unfinished():
        catalog.forget(backup)
    result = plan(catalog, [disk()], bitmaps_of(last))
    assert (result["level"], result["sequence"], result["based_on"]) == ("incremental", 2, 1)
    assert result["warnings"] == []


# -- bitmaps to keep, chains to delete -------------------------------------------------

def test_keep_bitmaps_of_the_newest_chain(healthy):
    store, dummy, dummy = healthy
    assert keep_bitmaps(store.catalog()) == {SINCE, FULL}
    store.add(OTHER, 0)
    assert keep_bitmaps(store.catalog()) == {"%s-%s-0000" % (PREFIX, OTHER), "%s-%s-full" % (PREFIX, OTHER)}


def test_keep_bitmaps_follows_generation_not_name(store):
    late_name = "20300101T000000Z"
    store.add(late_name, 0, generation=1)
    store.add(CHAIN, 0, generation=2)
    assert keep_bitmaps(store.catalog()) == {"%s-%s-0000" % (PREFIX, CHAIN), "%s-%s-full" % (PREFIX, CHAIN)}


def test_keep_bitmaps_when_the_last_backup_lost_its_manifest(store):
    store.add(CHAIN, 0)
    store.add(CHAIN, 1, manifest=False)
    assert keep_bitmaps(store.catalog()) == set()


@pytest.fixture(name="three_chains")
def fixture_three_chains(store):
    """Chains oldest first by generation: A (named last), B, C."""
    chains = ["20300101T000000Z", "20261201T100000Z", "20261215T100000Z"]
    store.add(chains[0], 0)
    store.add(chains[0], 1)
    store.add(chains[1], 0)
    store.add(chains[2], 0)
    store.add(chains[2], 1, "differential")
    return store, chains


@pytest.mark.parametrize("keep, current, deleted", [
    (1, 2, [0, 1]),
    (2, 2, [0]),
    (3, 2, []),
    (10, 2, []),
    (0, 2, [0, 1]),    # the current chain is always kept
    (-5, 2, [0, 1]),
    ("2", 2, [0]),
    (1, 0, [1, 2]),    # the current chain is kept even when it is not the newest
    (2, 0, [1]),
    (2, 1, [0]),
    (3, 0, []),
    (1, None, [0, 1, 2]),  # a new chain, not yet written: it counts
    (2, None, [0, 1]),
])
def test_chains_to_delete(three_chains, keep, current, deleted):
    store, chains = three_chains
    catalog = store.catalog()
    current_id = NEW if current is None else chains[current]
    assert [c.id for c in chains_to_delete(catalog, keep, current_id)] == [chains[i] for i in deleted]


def test_chains_to_delete_skips_a_chain_of_unfinished_backups(three_chains):
    store, chains = three_chains
    store.add(NEW, 0, manifest=False, unfinished=True)
    catalog = store.catalog()
    assert NEW in catalog.chains
    assert [c.id for c in chains_to_delete(catalog, 1, chains[2])] == chains[:2]
