# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of qmp_schema: the on-disk cache, probes, features and validation."""

from __future__ import annotations

import json
import os
import sys

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils import qmp_schema
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_schema import (
    QMPSchema,
    SchemaValidationUnavailable,
    cache_path,
    default_cache_dir,
    load_schema,
)

# The version in a greeting, as QMPClient.version gives it: it names the cache file.
VERSION = {"major": 7, "minor": 2, "micro": 22, "package": "Debian 1:7.2"}


def _members(*names):
    return [{"name": name} for name in names]


SCHEMA = [
    {"name": "str", "meta-type": "builtin", "json-type": "string"},
    {"name": "int", "meta-type": "builtin", "json-type": "int"},
    {"name": "bool", "meta-type": "builtin", "json-type": "boolean"},
    {"name": "any", "meta-type": "builtin", "json-type": "value"},
    {"name": "null", "meta-type": "builtin", "json-type": "null"},
    {"name": "number", "meta-type": "builtin", "json-type": "number"},
    {"name": "0", "meta-type": "object", "members": []},
    # query-status
    {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
    {"name": "1", "meta-type": "object", "members": [{"name": "running", "type": "bool"}, {"name": "status", "type": "2"}]},
    {"name": "2", "meta-type": "enum", "values": ["running", "paused"], "members": _members("running", "paused")},
    # blockdev-backup
    {"name": "blockdev-backup", "meta-type": "command", "arg-type": "3", "ret-type": "0"},
    {"name": "3", "meta-type": "object", "members": [
        {"name": "job-id", "type": "str", "default": None},
        {"name": "device", "type": "str"},
        {"name": "target", "type": "str"},
        {"name": "sync", "type": "4"},
        {"name": "speed", "type": "int", "default": None},
        {"name": "x-ratio", "type": "number", "default": None},
    ]},
    {"name": "4", "meta-type": "enum", "values": ["top", "full", "none", "incremental", "bitmap"],
     "members": _members("top", "full", "none", "incremental", "bitmap")},
    # migrate-set-capabilities: an array of objects holding an enum
    {"name": "migrate-set-capabilities", "meta-type": "command", "arg-type": "5", "ret-type": "0"},
    {"name": "5", "meta-type": "object", "members": [{"name": "capabilities", "type": "[6]"}]},
    {"name": "[6]", "meta-type": "array", "element-type": "6"},
    {"name": "6", "meta-type": "object", "members": [{"name": "capability", "type": "7"}, {"name": "state", "type": "bool"}]},
    {"name": "7", "meta-type": "enum", "values": ["xbzrle", "dirty-bitmaps"], "members": _members("xbzrle", "dirty-bitmaps")},
    # migrate-set-parameters: an alternate with null
    {"name": "migrate-set-parameters", "meta-type": "command", "arg-type": "8", "ret-type": "0"},
    {"name": "8", "meta-type": "object", "members": [
        {"name": "tls-creds", "type": "9", "default": None},
        {"name": "max-bandwidth", "type": "int", "default": None},
    ]},
    {"name": "9", "meta-type": "alternate", "members": [{"type": "str"}, {"type": "null"}]},
    # blockdev-add: a flat union, and a reference that is a name or a nested definition
    {"name": "blockdev-add", "meta-type": "command", "arg-type": "10", "ret-type": "0"},
    {"name": "10", "meta-type": "object", "tag": "driver",
     "members": [{"name": "driver", "type": "11"}, {"name": "node-name", "type": "str", "default": None}],
     "variants": [{"case": "file", "type": "12"}, {"case": "qcow2", "type": "13"}, {"case": "null-co", "type": "0"}]},
    {"name": "11", "meta-type": "enum", "values": ["file", "null-co", "qcow2"], "members": _members("file", "null-co", "qcow2")},
    {"name": "12", "meta-type": "object", "members": [
        {"name": "filename", "type": "str"},
        {"name": "aio", "type": "14", "default": None},
    ]},
    {"name": "13", "meta-type": "object", "members": [{"name": "file", "type": "15"}]},
    {"name": "14", "meta-type": "enum", "values": ["threads", "native"], "members": _members("threads", "native")},
    {"name": "15", "meta-type": "alternate", "members": [{"type": "str"}, {"type": "10"}]},
    # query-named-block-nodes: an optional argument, nested return members
    {"name": "query-named-block-nodes", "meta-type": "command", "arg-type": "16", "ret-type": "[17]"},
    {"name": "16", "meta-type": "object", "members": [{"name": "flat", "type": "bool", "default": None}]},
    {"name": "[17]", "meta-type": "array", "element-type": "17"},
    {"name": "17", "meta-type": "object", "members": [
        {"name": "node-name", "type": "str"},
        {"name": "dirty-bitmaps", "type": "[18]", "default": None},
    ]},
    {"name": "[18]", "meta-type": "array", "element-type": "18"},
    {"name": "18", "meta-type": "object", "members": [{"name": "name", "type": "str"}, {"name": "recording", "type": "bool"}]},
    # device_add takes any further property
    {"name": "device_add", "meta-type": "command", "arg-type": "19", "ret-type": "0"},
    {"name": "19", "meta-type": "object", "members": [{"name": "driver", "type": "str"}, {"name": "id", "type": "str", "default": None}]},
    # qom-set: a value of any type
    {"name": "qom-set", "meta-type": "command", "arg-type": "20", "ret-type": "0"},
    {"name": "20", "meta-type": "object", "members": [
        {"name": "path", "type": "str"}, {"name": "property", "type": "str"}, {"name": "value", "type": "any"},
    ]},
    # events
    {"name": "STOP", "meta-type": "event", "arg-type": "0"},
    {"name": "BLOCK_JOB_COMPLETED", "meta-type": "event", "arg-type": "21"},
    {"name": "21", "meta-type": "object", "members": [
        {"name": "device", "type": "str"}, {"name": "len", "type": "int"}, {"name": "error", "type": "str", "default": None},
    ]},
]

MINIMAL_SCHEMA = [
    {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
    {"name": "0", "meta-type": "object", "members": []},
    {"name": "1", "meta-type": "object", "members": [{"name": "status", "type": "str"}]},
    {"name": "str", "meta-type": "builtin", "json-type": "string"},
]


class CountingExecute:
    """Stands in for QMPClient.execute; counts the commands it is asked for."""

    def __init__(self, entries):
        self.entries = entries
        self.calls = []

    def __call__(self, command):
        self.calls.append(command)
        return self.entries


# -- the on-disk cache ---------------------------------------------------------------

def test_load_schema_cache_hit(tmp_path):
    execute = CountingExecute(SCHEMA)
    schema, fetched = load_schema(execute, VERSION, cache_dir=str(tmp_path))
    assert fetched is True
    assert execute.calls == ["query-qmp-schema"]
    assert schema.has_command("query-status")
    path = cache_path(str(tmp_path), VERSION)
    assert os.path.basename(path).startswith("schema-7.2.22-")
    assert os.listdir(str(tmp_path)) == [os.path.basename(path)]
    schema, fetched = load_schema(execute, VERSION, cache_dir=str(tmp_path))
    assert fetched is False
    assert execute.calls == ["query-qmp-schema"]
    assert schema.has_command("query-status")
    assert schema.entries == QMPSchema(SCHEMA).entries


@pytest.mark.parametrize("content", [
    "{not json",
    "",
    '{"format": 1, "version": {"major": 7}, "schema": []}',
    '{"format": 99, "version": %s, "schema": []}' % json.dumps(VERSION),
    '{"format": 1, "version": %s, "schema": {}}' % json.dumps(VERSION),
    "[]",
    # Valid JSON of the wrong shape: entries without what the lookups read.
    '{"format": 1, "version": %s, "schema": [{"name": "query-status", "meta-type": "command"}]}'
    % json.dumps(VERSION),
    '{"format": 1, "version": %s, "schema": [{"name": "x", "meta-type": "object", "members": "y"}]}'
    % json.dumps(VERSION),
    '{"format": 1, "version": %s, "schema": [{"name": "x", "meta-type": "object", "members": [1]}]}'
    % json.dumps(VERSION),
    '{"format": 1, "version": %s, "schema": [{"name": "x", "meta-type": "surprise"}]}' % json.dumps(VERSION),
])
def test_load_schema_ignores_and_rewrites_a_bad_cache(tmp_path, content):
    path = cache_path(str(tmp_path), VERSION)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(content)
    execute = CountingExecute(MINIMAL_SCHEMA)
    schema, fetched = load_schema(execute, VERSION, cache_dir=str(tmp_path))
    assert fetched is True
    assert execute.calls == ["query-qmp-schema"]
    assert schema.has_command("query-status")
    with open(path, "r", encoding="utf-8") as handle:
        assert json.load(handle) == {"format": 1, "version": VERSION, "schema": MINIMAL_SCHEMA}
    assert load_schema(execute, VERSION, cache_dir=str(tmp_path))[1] is False


def test_load_schema_other_package_uses_another_file(tmp_path):
    other = dict(VERSION, package="v7.2.22-custom")
    assert cache_path(str(tmp_path), other) != cache_path(str(tmp_path), VERSION)
    execute = CountingExecute(MINIMAL_SCHEMA)
    load_schema(execute, VERSION, cache_dir=str(tmp_path))
    schema, fetched = load_schema(CountingExecute(SCHEMA), other, cache_dir=str(tmp_path))
    assert fetched is True
    assert schema.has_command("blockdev-backup")
    assert sorted(os.listdir(str(tmp_path))) == sorted(
        os.path.basename(cache_path(str(tmp_path), v)) for v in (VERSION, other))
    # Each binary keeps its own schema.
    assert not load_schema(execute, VERSION, cache_dir=str(tmp_path))[0].has_command("blockdev-backup")
    assert execute.calls == ["query-qmp-schema"]


def test_load_schema_without_cache(tmp_path):
    execute = CountingExecute(MINIMAL_SCHEMA)
    for dummy in range(2):
        assert load_schema(execute, VERSION, cache_dir=str(tmp_path), use_cache=False)[1] is True
    assert execute.calls == ["query-qmp-schema"] * 2
    assert os.listdir(str(tmp_path)) == []


def test_load_schema_unwritable_cache_is_not_an_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x", encoding="utf-8")
    execute = CountingExecute(MINIMAL_SCHEMA)
    for dummy in range(2):
        schema, fetched = load_schema(execute, VERSION, cache_dir=str(blocker / "cache"))
        assert fetched is True
        assert schema.has_command("query-status")
    assert execute.calls == ["query-qmp-schema"] * 2


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QMP_SCHEMA_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("QMP_SCHEMA_CACHE")
    assert default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "qemu.qmp")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "qemu.qmp")
    monkeypatch.setenv("QMP_SCHEMA_CACHE", str(tmp_path / "explicit"))
    load_schema(CountingExecute(MINIMAL_SCHEMA), VERSION)
    assert os.path.exists(cache_path(str(tmp_path / "explicit"), VERSION))


# -- schema probes ------------------------------------------------------------------

def test_schema_probes():
    schema = QMPSchema(SCHEMA)
    assert schema.has_command("query-status")
    assert not schema.has_command("query-jobs")
    assert not schema.has_command("STOP")
    assert not schema.has_command("str")
    assert schema.has_event("STOP") and not schema.has_event("query-status")

    assert schema.has_argument("blockdev-backup", "sync")
    assert not schema.has_argument("blockdev-backup", "bitmap-mode")
    assert not schema.has_argument("no-such-command", "sync")
    assert not schema.has_argument("STOP", "sync")
    assert schema.has_argument("blockdev-backup", None)  # the command itself
    assert schema.has_argument("migrate-set-capabilities", "capabilities.capability")
    assert not schema.has_argument("migrate-set-capabilities", "capabilities.bogus")
    assert not schema.has_argument("migrate-set-capabilities", "capability")
    # Union variants, and an alternate that recurses into the union.
    assert schema.has_argument("blockdev-add", "filename")
    assert schema.has_argument("blockdev-add", "file.filename")
    assert schema.has_argument("blockdev-add", "file.file.file.aio")
    assert not schema.has_argument("blockdev-add", "file.size")

    assert schema.returns_member("query-named-block-nodes", "dirty-bitmaps.recording")
    assert not schema.returns_member("query-named-block-nodes", "dirty-bitmaps.busy")
    assert not schema.returns_member("query-named-block-nodes", "flat")
    assert schema.event_member("BLOCK_JOB_COMPLETED", "error")
    assert not schema.event_member("BLOCK_JOB_COMPLETED", "speed")
    assert not schema.event_member("query-status", "status")

    assert schema.enum_values("blockdev-backup", "sync") == ["top", "full", "none", "incremental", "bitmap"]
    assert schema.enum_values("migrate-set-capabilities", "capabilities.capability") == ["xbzrle", "dirty-bitmaps"]
    assert schema.enum_values("blockdev-add", "file.driver") == ["file", "null-co", "qcow2"]
    assert schema.enum_values("query-status", "status", kind="returns") == ["running", "paused"]
    assert schema.enum_values("blockdev-backup", "device") is None
    assert schema.enum_values("blockdev-backup", "nope") is None
    assert schema.enum_values("no-such-command", "sync") is None


def test_schema_enum_values_from_values_only():
    entries = [
        {"name": "c", "meta-type": "command", "arg-type": "o", "ret-type": "o"},
        {"name": "o", "meta-type": "object", "members": [{"name": "mode", "type": "e"}]},
        {"name": "e", "meta-type": "enum", "values": ["a", "b"]},  # QEMU before 6.0 has no members
    ]
    assert QMPSchema(entries).enum_values("c", "mode") == ["a", "b"]


def test_schema_features():
    features = QMPSchema(SCHEMA).features()
    assert sorted(features) == sorted(qmp_schema.FEATURE_PROBES)
    assert features["named_block_nodes_flat"] is True
    assert features["bitmap_recording_field"] is True
    assert features["backup_sync_modes"] == ["top", "full", "none", "incremental", "bitmap"]
    assert features["migration_capabilities"] == ["xbzrle", "dirty-bitmaps"]
    assert features["query_jobs"] is False
    assert features["backup_bitmap_mode"] is False
    assert features["migrate_max_bandwidth"] is True
    assert features["migrate_set_speed"] is False


@pytest.mark.parametrize("entries", [MINIMAL_SCHEMA, []])
def test_schema_features_on_a_minimal_schema(entries):
    features = QMPSchema(entries).features()
    assert sorted(features) == sorted(qmp_schema.FEATURE_PROBES)
    for name, (kind, dummy_target, dummy_path) in qmp_schema.FEATURE_PROBES.items():
        assert features[name] == ([] if kind == "enum" else False), name


# -- schema validation -------------------------------------------------------------

BACKUP = {"job-id": "job0", "device": "drive0", "target": "tgt0", "sync": "full"}


@pytest.mark.parametrize("command, arguments", [
    ("blockdev-backup", BACKUP),
    ("blockdev-backup", dict(BACKUP, speed=0, **{"x-ratio": 0.5})),
    ("query-status", None),
    ("query-status", {}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]}),
    ("migrate-set-parameters", {"tls-creds": None}),
    ("migrate-set-parameters", {"tls-creds": "tls0", "max-bandwidth": 1}),
    ("blockdev-add", {"driver": "file", "filename": "/tmp/a.img", "aio": "native", "node-name": "n0"}),
    ("blockdev-add", {"driver": "null-co"}),
    ("blockdev-add", {"driver": "qcow2", "file": "n0"}),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file", "filename": "/tmp/a.img"}}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "drive0", "bootindex": 1}),
    ("qom-set", {"path": "/machine", "property": "x", "value": {"any": ["thing"]}}),
])
def test_validate_accepts_valid_arguments(command, arguments):
    assert QMPSchema(SCHEMA).validate(command, arguments) == []


@pytest.mark.parametrize("command, arguments, errors", [
    ("blockdev-backup", dict(BACKUP, sync="sideways"),
     ["blockdev-backup: sync: 'sideways' is not one of ['top', 'full', 'none', 'incremental', 'bitmap']"]),
    ("blockdev-backup", dict(BACKUP, speeed=1),
     ["blockdev-backup: arguments: unknown argument speeed"]),
    ("blockdev-backup", dict(BACKUP, speeed=1, bitmap="b0"),
     ["blockdev-backup: arguments: unknown arguments bitmap, speeed"]),
    ("blockdev-backup", {"device": "drive0", "sync": "full"},
     ["blockdev-backup: arguments: 'target' is a required property"]),
    ("blockdev-backup", dict(BACKUP, speed="fast"),
     ["blockdev-backup: speed: 'fast' is not of type 'integer'"]),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True},
                                                   {"capability": "bogus", "state": True}]},
     ["migrate-set-capabilities: capabilities.1.capability: 'bogus' is not one of ['xbzrle', 'dirty-bitmaps']"]),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True, "extra": 1}]},
     ["migrate-set-capabilities: capabilities.0: unknown argument extra"]),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle"}]},
     ["migrate-set-capabilities: capabilities.0: 'state' is a required property"]),
    ("migrate-set-parameters", {"tls-creds": 5},
     ["migrate-set-parameters: tls-creds: 5 is not of type 'string'"]),
    ("blockdev-add", {"driver": "nfs"},
     ["blockdev-add: driver: 'nfs' is not one of ['file', 'null-co', 'qcow2']"]),
    ("blockdev-add", {"driver": "null-co", "filename": "/tmp/a.img"},
     ["blockdev-add: arguments: unknown argument filename"]),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "file", "filename": "/a", "aio": "fast"}},
     ["blockdev-add: file.aio: 'fast' is not one of ['threads', 'native']"]),
    ("device_add", {"id": "d0"},
     ["device_add: arguments: 'driver' is a required property"]),
    ("no-such-command", {},
     ["QEMU has no command 'no-such-command'"]),
])
def test_validate_reports_errors_with_their_path(command, arguments, errors):
    schema = QMPSchema(SCHEMA)
    assert schema.validate(command, arguments) == errors
    assert schema.validate(command, arguments) == errors  # the cached validator gives the same


@pytest.mark.parametrize("arguments, errors", [
    ({"driver": "file", "filename": 123, "aio": "threads"},
     ["blockdev-add: filename: 123 is not of type 'string'"]),
    ({"driver": "file", "aio": "threads"},
     ["blockdev-add: arguments: 'filename' is a required property"]),
    ({"driver": "file", "filename": "/tmp/a.img", "aio": "io_uring"},
     ["blockdev-add: aio: 'io_uring' is not one of ['threads', 'native']"]),
])
def test_validate_union_variant_error_does_not_flag_valid_members(arguments, errors):
    assert QMPSchema(SCHEMA).validate("blockdev-add", arguments) == errors


def test_json_schema_shape():
    schema = QMPSchema(SCHEMA)
    assert schema.json_schema("no-such-command") is None
    assert schema.json_schema("STOP") is None
    backup = schema.json_schema("blockdev-backup")
    assert backup["additionalProperties"] is False
    assert backup["required"] == ["device", "target", "sync"]
    assert "additionalProperties" not in schema.json_schema("device_add")
    assert "additionalProperties" in schema.json_schema("blockdev-backup")  # not changed by device_add


def test_validate_without_jsonschema(monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    schema = QMPSchema(SCHEMA)
    with pytest.raises(SchemaValidationUnavailable):
        schema.validate("blockdev-backup", BACKUP)
    assert schema.validate("no-such-command", {}) == ["QEMU has no command 'no-such-command'"]
