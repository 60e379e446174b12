# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The manifest of a backup: its JSON Schema and a checker that needs no library.

A manifest is written last, when a backup is durably on disk: it is the
backup's commit record. The schema here is the one the role ships as
`files/manifest.schema.json` (a unit test keeps the two equal). The checker
covers the part of JSON Schema this schema uses, so manifests are checked on
the host with the standard library alone.
"""

from __future__ import annotations

import re

MANIFEST_FORMAT = 2
# Manifests of format 1 carry no checksums; they are read, and said to be unverifiable.
READABLE_FORMATS = (1, 2)

CHAIN_PATTERN = "^[0-9]{8}T[0-9]{6}Zx*$"
IMAGE_PATTERN = "^[0-9]{4,}-(full|incremental|differential)/[^/]+\\.qcow2$"

_DIGEST = {
    "type": "object",
    "description": "Checksums of the image file: one SHA-256 per chunk_size bytes, so a mismatch names where it is.",
    "required": ["algorithm", "chunk_size", "size", "chunks"],
    "additionalProperties": False,
    "properties": {
        "algorithm": {"const": "sha256"},
        "chunk_size": {"type": "integer", "minimum": 1},
        "size": {"type": "integer", "minimum": 0},
        "chunks": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
    },
}

MANIFEST_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://qemu-qmp.invalid/backup-manifest-2.json",
    "title": "qemu.qmp backup manifest",
    "description": "One backup of a VM's disks, written last, once its images are on disk, checked and summed.",
    "type": "object",
    "required": ["format", "vm", "chain", "generation", "sequence", "level", "mode", "based_on", "bitmap",
                 "full_bitmap", "started", "finished", "duration", "qemu", "disks"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": MANIFEST_FORMAT},
        "vm": {"type": "string", "minLength": 1},
        "host": {"type": "string"},
        "chain": {"type": "string", "pattern": CHAIN_PATTERN},
        "generation": {"type": "integer", "minimum": 1,
                       "description": "Counts the backups of the VM in the order they were taken, whatever the clock said."},
        "sequence": {"type": "integer", "minimum": 0},
        "level": {"enum": ["full", "incremental", "differential"]},
        "mode": {"enum": ["push", "pull"]},
        "based_on": {"type": ["integer", "null"], "minimum": 0},
        "bitmap": {"type": "string", "minLength": 1,
                   "description": "The bitmap that tracks what changes after this backup: the next incremental copies it."},
        "full_bitmap": {"type": "string", "minLength": 1,
                        "description": "The bitmap that tracks what changed since the chain's full backup: differentials copy it."},
        "started": {"type": "string", "format": "date-time"},
        "finished": {"type": "string", "format": "date-time"},
        "duration": {"type": "number", "minimum": 0},
        "qemu": {
            "type": "object",
            "required": ["major", "minor", "micro", "package"],
            "additionalProperties": False,
            "properties": {
                "major": {"type": "integer"},
                "minor": {"type": "integer"},
                "micro": {"type": "integer"},
                "package": {"type": "string"},
            },
        },
        "folded": {
            "type": "array",
            "description": "The points a prune folded into this one (their data is in its images), oldest first.",
            "items": {
                "type": "object",
                "required": ["sequence", "level", "finished"],
                "additionalProperties": False,
                "properties": {
                    "sequence": {"type": "integer", "minimum": 0},
                    "level": {"enum": ["full", "incremental", "differential"]},
                    "finished": {"type": "string", "format": "date-time"},
                },
            },
        },
        "definition": {
            "type": "object",
            "description": "The VM's definition as the qemu.qmp.vm role started it (its vm_ variables without the "
                           "prefix), so a restore can start the VM from the backup alone.",
        },
        "disks": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["node", "image", "backing", "virtual_size", "image_size", "bytes_copied", "checked",
                             "digest"],
                "additionalProperties": False,
                "properties": {
                    "node": {"type": "string", "minLength": 1},
                    "device": {"type": ["string", "null"]},
                    "image": {"type": "string", "pattern": IMAGE_PATTERN},
                    "backing": {"type": ["string", "null"]},
                    "virtual_size": {"type": "integer", "minimum": 0},
                    "image_size": {"type": "integer", "minimum": 0},
                    "bytes_copied": {"type": "integer", "minimum": 0,
                                     "description": "Push mode: bytes QEMU's job went through, zeros included (a "
                                                    "full backup's is the disk's virtual size). Pull mode: bytes "
                                                    "read over NBD."},
                    "bytes_written": {"type": "integer", "minimum": 0,
                                      "description": "Bytes the image takes on its file system once synced "
                                                     "(st_blocks times 512). Optional: older manifests lack it."},
                    "duration": {"type": ["number", "null"], "minimum": 0},
                    "checked": {"type": "boolean"},
                    "digest": _DIGEST,
                },
            },
        },
    },
}

# What a manifest of format 1 (no generation, no checksums) must hold to be read at all.
LEGACY_SCHEMA = {
    "type": "object",
    "required": ["chain", "sequence", "level", "bitmap", "full_bitmap", "finished", "disks"],
    "properties": {
        "chain": {"type": "string", "pattern": CHAIN_PATTERN},
        "sequence": {"type": "integer", "minimum": 0},
        "level": {"enum": ["full", "incremental", "differential"]},
        "based_on": {"type": ["integer", "null"], "minimum": 0},
        "bitmap": {"type": "string", "minLength": 1},
        "full_bitmap": {"type": "string", "minLength": 1},
        "finished": {"type": "string"},
        "disks": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["node", "image", "backing", "virtual_size", "image_size"],
            "properties": {
                "node": {"type": "string", "minLength": 1},
                "image": {"type": "string", "pattern": IMAGE_PATTERN},
                "backing": {"type": ["string", "null"]},
                "virtual_size": {"type": "integer", "minimum": 0},
                "image_size": {"type": "integer", "minimum": 0},
            },
        }},
    },
}

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value, name):
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def schema_errors(value, schema, path="$"):
    """How `value` breaks `schema`, one message per problem (empty when it fits).

    Covers what MANIFEST_SCHEMA uses: type, const, enum, required, properties,
    additionalProperties false, items, minItems, minLength, minimum, pattern.
    """
    errors = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_is_type(value, name) for name in names):
            return ["%s: %s is not of type %s" % (path, _short(value), " or ".join(names))]
    if "const" in schema and value != schema["const"]:
        errors.append("%s: %s is not %s" % (path, _short(value), _short(schema["const"])))
    if "enum" in schema and value not in schema["enum"]:
        errors.append("%s: %s is not one of %s" % (path, _short(value), ", ".join(map(str, schema["enum"]))))
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append("%s: %s is too short" % (path, _short(value)))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append("%s: %s does not match %s" % (path, _short(value), schema["pattern"]))
    if _is_type(value, "number") and "minimum" in schema and value < schema["minimum"]:
        errors.append("%s: %s is less than %s" % (path, value, schema["minimum"]))
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append("%s: %s is missing" % (path, key))
        for key, item in value.items():
            if key in properties:
                errors.extend(schema_errors(item, properties[key], "%s.%s" % (path, key)))
            elif schema.get("additionalProperties") is False:
                errors.append("%s: %s is not expected" % (path, key))
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append("%s: has %d items, at least %d expected" % (path, len(value), schema["minItems"]))
        if "items" in schema:
            for index, item in enumerate(value):
                errors.extend(schema_errors(item, schema["items"], "%s[%d]" % (path, index)))
    return errors


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def manifest_errors(manifest):
    """Why a manifest cannot be trusted (empty when it can); a format 1 manifest is checked loosely."""
    if not isinstance(manifest, dict):
        return ["$: is not a JSON object"]
    version = manifest.get("format")
    if not _is_type(version, "integer") or version not in READABLE_FORMATS:
        return ["$.format: %s is not a format this collection reads (%s)"
                % (_short(version), ", ".join(map(str, READABLE_FORMATS)))]
    if version == 1:
        return schema_errors(manifest, LEGACY_SCHEMA)
    return schema_errors(manifest, MANIFEST_SCHEMA)
