# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of backup_manifest: the schema checker agrees with jsonschema, and manifest_errors' formats."""

from __future__ import annotations

import copy
import json
import os

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.backup_manifest import (
    MANIFEST_FORMAT,
    MANIFEST_SCHEMA,
    manifest_errors,
    schema_errors,
)

jsonschema = pytest.importorskip("jsonschema")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
CHAIN = "20261201T100000Z"
VALIDATOR = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)


def valid_manifest():
    """A format 2 manifest of an incremental backup that fits MANIFEST_SCHEMA."""
    return {
        "format": 2,
        "vm": "vm1",
        "host": "host1",
        "chain": CHAIN,
        "generation": 3,
        "sequence": 1,
        "level": "incremental",
        "mode": "push",
        "based_on": 0,
        "bitmap": "qemu-qmp-backup-%s-0001" % CHAIN,
        "full_bitmap": "qemu-qmp-backup-%s-full" % CHAIN,
        "started": "2026-12-01T10:00:00Z",
        "finished": "2026-12-01T10:01:00Z",
        "duration": 60.5,
        "qemu": {"major": 7, "minor": 2, "micro": 22, "package": "Debian 1:7.2"},
        "disks": [
            {
                "node": "disk0",
                "device": "virtio0",
                "image": "0001-incremental/disk0.qcow2",
                "backing": "0000-full/disk0.qcow2",
                "virtual_size": 1 << 30,
                "image_size": 196616,
                "bytes_copied": 65536,
                "bytes_written": 458752,
                "duration": 1.25,
                "checked": True,
                "digest": {"algorithm": "sha256", "chunk_size": 65536, "size": 196616,
                           "chunks": ["0123456789abcdef" * 4, "f" * 64, "0" * 64, "a" * 64]},
            },
            {
                "node": "disk1",
                "device": None,
                "image": "0001-incremental/disk1.qcow2",
                "backing": None,
                "virtual_size": 0,
                "image_size": 0,
                "bytes_copied": 0,
                "checked": False,
                "digest": {"algorithm": "sha256", "chunk_size": 1, "size": 0, "chunks": []},
            },
        ],
    }


_MISSING = object()


def _parent(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


def mutated(path, value=_MISSING):
    """A valid manifest with the item at `path` replaced by `value`, or removed."""
    doc = valid_manifest()
    parent = _parent(doc, path)
    if value is _MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def json_path(path):
    text = "$"
    for key in path:
        text += "[%d]" % key if isinstance(key, int) else ".%s" % key
    return text


def ours(doc):
    """The paths schema_errors names (each message is 'PATH: what')."""
    return sorted(set(e.split(": ", 1)[0] for e in schema_errors(doc, MANIFEST_SCHEMA)))


def theirs(doc):
    """The paths jsonschema names, in the same notation."""
    return sorted(set(e.json_path for e in VALIDATOR.iter_errors(doc)))


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(MANIFEST_SCHEMA)
    assert MANIFEST_SCHEMA["properties"]["format"] == {"const": MANIFEST_FORMAT}


def test_valid_manifest_has_no_errors_in_both():
    doc = valid_manifest()
    assert schema_errors(doc, MANIFEST_SCHEMA) == []
    assert list(VALIDATOR.iter_errors(doc)) == []
    assert manifest_errors(doc) == []


@pytest.mark.parametrize("path, value", [
    (("based_on",), None),
    (("host",), ""),
    (("duration",), 0),
    (("duration",), 7),
    (("generation",), 1),
    (("sequence",), 0),
    (("disks", 0, "device"), None),
    (("disks", 0, "backing"), None),
    (("disks", 0, "duration"), None),
    (("disks", 0, "duration"), 0),
    (("disks", 0, "image"), "12345-differential/d.qcow2"),
    (("chain",), CHAIN + "xx"),
    (("level",), "full"),
    (("mode",), "pull"),
    (("disks", 0, "digest", "chunks"), []),
    (("qemu", "major"), -1),
], ids=lambda v: json.dumps(v) if not isinstance(v, tuple) else json_path(v))
def test_valid_variants_have_no_errors_in_both(path, value):
    doc = mutated(path, value)
    assert schema_errors(doc, MANIFEST_SCHEMA) == []
    assert VALIDATOR.is_valid(doc)


@pytest.mark.parametrize("path", [("host",), ("disks", 0, "device"), ("disks", 0, "duration"),
                                  ("disks", 0, "bytes_written")],
                         ids=json_path)
def test_optional_keys_may_be_left_out(path):
    doc = mutated(path)
    assert schema_errors(doc, MANIFEST_SCHEMA) == []
    assert VALIDATOR.is_valid(doc)


# (path, value, the path the error must name); value _MISSING removes the key.
MUTATIONS = [
    # a required key is missing: the error names the object that lacks it
    (("generation",), _MISSING, "$"),
    (("format",), _MISSING, "$"),
    (("disks",), _MISSING, "$"),
    (("qemu", "package"), _MISSING, "$.qemu"),
    (("disks", 0, "digest"), _MISSING, "$.disks[0]"),
    (("disks", 1, "image_size"), _MISSING, "$.disks[1]"),
    (("disks", 0, "digest", "chunks"), _MISSING, "$.disks[0].digest"),
    # an extra key
    (("extra",), 1, "$"),
    (("qemu", "build"), "x", "$.qemu"),
    (("disks", 0, "format"), "qcow2", "$.disks[0]"),
    (("disks", 0, "digest", "md5"), "x", "$.disks[0].digest"),
    # a wrong type
    (("vm",), 5, "$.vm"),
    (("host",), None, "$.host"),
    (("bitmap",), None, "$.bitmap"),
    (("started",), 1700000000, "$.started"),
    (("duration",), "60", "$.duration"),
    (("qemu",), [], "$.qemu"),
    (("disks",), {}, "$.disks"),
    (("disks", 0), "0001-incremental/disk0.qcow2", "$.disks[0]"),
    (("disks", 0, "checked"), "yes", "$.disks[0].checked"),
    (("disks", 0, "checked"), 1, "$.disks[0].checked"),
    (("disks", 0, "backing"), 0, "$.disks[0].backing"),
    (("disks", 0, "digest", "chunks"), "0" * 64, "$.disks[0].digest.chunks"),
    (("disks", 0, "digest", "chunks", 1), 7, "$.disks[0].digest.chunks[1]"),
    (("sequence",), 1.5, "$.sequence"),
    (("sequence",), "1", "$.sequence"),
    # a boolean where an integer (or a number) is expected
    (("generation",), True, "$.generation"),
    (("sequence",), False, "$.sequence"),
    (("based_on",), True, "$.based_on"),
    (("duration",), True, "$.duration"),
    (("qemu", "major"), True, "$.qemu.major"),
    (("disks", 0, "image_size"), True, "$.disks[0].image_size"),
    (("disks", 0, "duration"), False, "$.disks[0].duration"),
    (("disks", 0, "digest", "size"), True, "$.disks[0].digest.size"),
    # below the minimum
    (("generation",), 0, "$.generation"),
    (("sequence",), -1, "$.sequence"),
    (("based_on",), -1, "$.based_on"),
    (("duration",), -0.5, "$.duration"),
    (("disks", 0, "virtual_size"), -1, "$.disks[0].virtual_size"),
    (("disks", 0, "image_size"), -1, "$.disks[0].image_size"),
    (("disks", 0, "bytes_copied"), -1, "$.disks[0].bytes_copied"),
    (("disks", 0, "bytes_written"), -1, "$.disks[0].bytes_written"),
    (("disks", 0, "bytes_written"), 1.5, "$.disks[0].bytes_written"),
    (("disks", 0, "duration"), -1, "$.disks[0].duration"),
    (("disks", 0, "digest", "chunk_size"), 0, "$.disks[0].digest.chunk_size"),
    (("disks", 0, "digest", "size"), -1, "$.disks[0].digest.size"),
    # too short
    (("vm",), "", "$.vm"),
    (("bitmap",), "", "$.bitmap"),
    (("full_bitmap",), "", "$.full_bitmap"),
    (("disks", 0, "node"), "", "$.disks[0].node"),
    # a pattern that does not match
    (("chain",), "2026-12-01T10:00:00Z", "$.chain"),
    (("chain",), CHAIN + "y", "$.chain"),
    (("chain",), "x" + CHAIN, "$.chain"),
    (("chain",), "20261201T1000Z", "$.chain"),
    (("disks", 0, "image"), "0001-incremental/disk0.raw", "$.disks[0].image"),
    (("disks", 0, "image"), "../0000-full/disk0.qcow2", "$.disks[0].image"),
    (("disks", 0, "image"), "0001-incremental/sub/disk0.qcow2", "$.disks[0].image"),
    (("disks", 0, "image"), "001-incremental/disk0.qcow2", "$.disks[0].image"),
    (("disks", 0, "image"), "0001-partial/disk0.qcow2", "$.disks[0].image"),
    (("disks", 0, "image"), "/abs/0001-full/disk0.qcow2", "$.disks[0].image"),
    (("disks", 0, "digest", "chunks", 0), "A" * 64, "$.disks[0].digest.chunks[0]"),
    (("disks", 0, "digest", "chunks", 2), "0" * 63, "$.disks[0].digest.chunks[2]"),
    (("disks", 0, "digest", "chunks", 3), "0" * 65, "$.disks[0].digest.chunks[3]"),
    (("disks", 0, "digest", "chunks", 3), "g" * 64, "$.disks[0].digest.chunks[3]"),
    # an empty disks list
    (("disks",), [], "$.disks"),
    # const
    (("format",), 1, "$.format"),
    (("format",), 3, "$.format"),
    (("format",), "2", "$.format"),
    (("format",), True, "$.format"),
    (("disks", 0, "digest", "algorithm"), "sha512", "$.disks[0].digest.algorithm"),
    # enum
    (("level",), "partial", "$.level"),
    (("level",), "Full", "$.level"),
    (("level",), None, "$.level"),
    (("mode",), "both", "$.mode"),
]


@pytest.mark.parametrize("path, value, where", MUTATIONS,
                         ids=["%s=%s" % (json_path(p), "DELETED" if v is _MISSING else json.dumps(v))
                              for p, v, w in MUTATIONS])
def test_mutation_gives_errors_in_both_naming_the_path(path, value, where):
    doc = mutated(path, value)
    errors = schema_errors(doc, MANIFEST_SCHEMA)
    assert errors, "schema_errors accepted %s" % json.dumps(doc)
    assert not VALIDATOR.is_valid(doc)
    assert [e for e in errors if e.startswith(where + ": ")], errors
    # Both name the same places.
    assert ours(doc) == theirs(doc) == [where]
    if value is _MISSING:
        assert "%s: %s is missing" % (where, path[-1]) in errors
    elif where == "$" or (len(path) > 1 and where == json_path(path[:-1]) and path[-1] not in
                          _parent(valid_manifest(), path)):
        assert "%s: %s is not expected" % (where, path[-1]) in errors


def test_several_problems_are_all_reported():
    doc = valid_manifest()
    del doc["vm"]
    doc["sequence"] = -3
    doc["disks"][1]["digest"]["chunks"] = ["nope"]
    doc["disks"][0]["checked"] = None
    errors = schema_errors(doc, MANIFEST_SCHEMA)
    assert len(errors) == 4, errors
    assert ours(doc) == theirs(doc) == sorted(["$", "$.sequence", "$.disks[1].digest.chunks[0]",
                                               "$.disks[0].checked"])


# Values put in every place of a valid manifest, one at a time: both checkers must agree on each.
JUNK = [None, True, False, 0, -1, 7, 1.5, -0.5, "", "x", "full", "0" * 64, [], ["x"], {}, {"a": 1}]


def _places(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _places(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _places(item, path + (index,))


def test_both_checkers_agree_on_every_place_and_junk_value():
    places = [p for p in _places(valid_manifest()) if p]
    assert len(places) > 40
    checked = 0
    for path in places:
        for value in JUNK:
            doc = mutated(path, copy.deepcopy(value))
            assert ours(doc) == theirs(doc), (json_path(path), value, schema_errors(doc, MANIFEST_SCHEMA))
            checked += 1
    assert checked == len(places) * len(JUNK)


def test_integer_valued_float_is_refused_although_json_schema_accepts_it():
    # A documented divergence: JSON Schema 2020-12 (and jsonschema) count 1.0 as an integer; the checker is
    # stricter, like its refusal of booleans. Harmless for manifests json.dump writes (ints stay ints).
    doc = mutated(("sequence",), 1.0)
    assert VALIDATOR.is_valid(doc)
    assert schema_errors(doc, MANIFEST_SCHEMA) == ["$.sequence: 1.0 is not of type integer"]


def test_long_values_are_shortened_in_messages():
    doc = mutated(("vm",), ["x" * 500])
    (error,) = schema_errors(doc, MANIFEST_SCHEMA)
    assert error.startswith("$.vm: ")
    assert error.endswith("... is not of type string")
    assert len(error) < 120


# -- manifest_errors ---------------------------------------------------------

def legacy_manifest():
    """A format 1 manifest: no generation, no checksums."""
    return {"format": 1, "chain": CHAIN, "sequence": 0, "level": "full",
            "bitmap": "qemu-qmp-backup-%s-0000" % CHAIN, "full_bitmap": "qemu-qmp-backup-%s-full" % CHAIN,
            "finished": "2025-01-01T00:00:00Z",
            "disks": [{"node": "disk0", "image": "0000-full/disk0.qcow2", "backing": None, "virtual_size": 1 << 30,
                       "image_size": 1 << 20}]}


def test_format_2_is_checked_against_the_schema():
    doc = valid_manifest()
    del doc["generation"]
    doc["extra"] = True
    assert manifest_errors(doc) == ["$: generation is missing", "$: extra is not expected"]


def test_format_1_is_checked_for_what_is_read_of_it():
    doc = legacy_manifest()
    assert manifest_errors(doc) == []
    assert schema_errors(doc, MANIFEST_SCHEMA) != []  # it would not pass as format 2
    # keys format 2 refuses, or does not know, are fine in format 1
    doc.update(extra=1, vm="", mode="anything")
    assert manifest_errors(doc) == []
    # what the catalog reads must have its type
    doc.update(sequence="0", disks=[{"node": "disk0"}])
    assert manifest_errors(doc) == [
        "$.sequence: '0' is not of type integer", "$.disks[0]: image is missing", "$.disks[0]: backing is missing",
        "$.disks[0]: virtual_size is missing", "$.disks[0]: image_size is missing"]


@pytest.mark.parametrize("key", ["chain", "sequence", "level", "bitmap", "full_bitmap", "finished", "disks"])
def test_format_1_needs_the_legacy_keys(key):
    doc = legacy_manifest()
    del doc[key]
    assert manifest_errors(doc) == ["$: %s is missing" % key]


def test_format_1_names_every_missing_key_in_order():
    assert manifest_errors({"format": 1, "level": "full", "disks": []}) == [
        "$: chain is missing", "$: sequence is missing", "$: bitmap is missing", "$: full_bitmap is missing",
        "$: finished is missing", "$.disks: has 0 items, at least 1 expected"]


@pytest.mark.parametrize("fmt", [0, 3, 99, -1, "1", "2", None, [2], 2.5])
def test_unknown_formats_are_refused(fmt):
    doc = valid_manifest()
    doc["format"] = fmt
    errors = manifest_errors(doc)
    assert len(errors) == 1
    assert errors[0].startswith("$.format: %r is not a format this collection reads" % (fmt,))
    assert errors[0].endswith("(1, 2)")


def test_missing_format_is_refused():
    doc = valid_manifest()
    del doc["format"]
    assert manifest_errors(doc) == ["$.format: None is not a format this collection reads (1, 2)"]


@pytest.mark.parametrize("value", [None, [], [valid_manifest()], "manifest", 2, 1.5, True])
def test_non_object_is_refused(value):
    assert manifest_errors(value) == ["$: is not a JSON object"]


def test_format_true_is_not_format_1():
    doc = legacy_manifest()
    doc["format"] = True
    assert manifest_errors(doc) != []


def test_role_ships_the_same_schema():
    with open(os.path.join(ROOT, "roles", "backup", "files", "manifest.schema.json"), encoding="utf-8") as handle:
        shipped = json.load(handle)
    assert shipped == MANIFEST_SCHEMA
