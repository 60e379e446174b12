# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The running QEMU's QMP schema: feature probes, a disk cache, validation.

`query-qmp-schema` describes exactly what the connected binary accepts, so
every version difference is decided here, never from a version number.
The schema is cached on disk per QEMU binary (version and package string) so
a module run normally does not fetch its 200+ KB again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

SCHEMA_CACHE_ENV = "QMP_SCHEMA_CACHE"
_CACHE_FORMAT = 1

# Commands QEMU declares with a fixed set of members but whose handler takes
# any further key (QAPI 'gen': false): device properties for device_add.
_OPEN_ARGUMENT_COMMANDS = frozenset(["device_add"])

# Named probes the modules rely on, reported by qmp_info's `features`.
# (kind, command or event, member path); kind "enum" reports the values.
FEATURE_PROBES = {
    "query_jobs": ("command", "query-jobs", None),
    "job_commands": ("command", "job-dismiss", None),
    "blockdev_create": ("command", "blockdev-create", None),
    "blockdev_reopen": ("command", "blockdev-reopen", None),
    "named_block_nodes_flat": ("argument", "query-named-block-nodes", "flat"),
    "bitmap_persistent": ("argument", "block-dirty-bitmap-add", "persistent"),
    "bitmap_add_disabled": ("argument", "block-dirty-bitmap-add", "disabled"),
    "bitmap_enable_disable": ("command", "block-dirty-bitmap-enable", None),
    "bitmap_merge": ("command", "block-dirty-bitmap-merge", None),
    "bitmap_recording_field": ("returns", "query-named-block-nodes", "dirty-bitmaps.recording"),
    "backup_bitmap_mode": ("argument", "blockdev-backup", "bitmap-mode"),
    "backup_perf": ("argument", "blockdev-backup", "x-perf"),
    "backup_sync_modes": ("enum", "blockdev-backup", "sync"),
    "transaction_completion_mode": ("argument", "transaction", "properties.completion-mode"),
    "block_export": ("command", "block-export-add", None),
    "nbd_server_add": ("command", "nbd-server-add", None),
    "chardev_change": ("command", "chardev-change", None),
    "migrate_set_parameters": ("command", "migrate-set-parameters", None),
    "migrate_max_bandwidth": ("argument", "migrate-set-parameters", "max-bandwidth"),
    "migrate_downtime_limit": ("argument", "migrate-set-parameters", "downtime-limit"),
    "migrate_set_speed": ("command", "migrate_set_speed", None),
    "migrate_set_downtime": ("command", "migrate_set_downtime", None),
    "migrate_channels": ("argument", "migrate", "channels"),
    "migrate_block_bitmap_mapping": ("argument", "migrate-set-parameters", "block-bitmap-mapping"),
    "migration_capabilities": ("enum", "migrate-set-capabilities", "capabilities.capability"),
}


class SchemaValidationUnavailable(Exception):
    """jsonschema is not installed on this host."""


class QMPSchema:
    """Lookups over query-qmp-schema's SchemaInfo list."""

    def __init__(self, entries):
        self.entries = {entry["name"]: entry for entry in entries}
        self._validators = {}
        self._json_defs = None

    # -- probes -----------------------------------------------------------

    def has_command(self, name):
        entry = self.entries.get(name)
        return entry is not None and entry["meta-type"] == "command"

    def has_event(self, name):
        entry = self.entries.get(name)
        return entry is not None and entry["meta-type"] == "event"

    def _member_types(self, type_name, path):
        """Types reached by following `path` (dotted member names) from type_name."""
        current = [type_name]
        for part in path.split(".") if path else []:
            found = []
            for name in current:
                for obj in self._objects(name):
                    for member in self._all_members(obj):
                        if member["name"] == part:
                            found.append(member["type"])
            if not found:
                return []
            current = found
        return current

    def _objects(self, type_name, _seen=None):
        """The object types a value of type_name can be (arrays and alternates unwrapped)."""
        seen = _seen if _seen is not None else set()
        if type_name in seen:
            return []
        seen.add(type_name)
        entry = self.entries.get(type_name)
        if entry is None:
            return []
        meta = entry["meta-type"]
        if meta == "object":
            return [entry]
        if meta == "array":
            return self._objects(entry["element-type"], seen)
        if meta == "alternate":
            out = []
            for member in entry["members"]:
                out.extend(self._objects(member["type"], seen))
            return out
        return []

    def _all_members(self, obj):
        members = list(obj.get("members", []))
        for variant in obj.get("variants", []):
            for variant_obj in self._objects(variant["type"]):
                members.extend(self._all_members(variant_obj))
        return members

    def _root(self, kind, name):
        entry = self.entries.get(name)
        if entry is None or entry["meta-type"] != ("event" if kind == "event" else "command"):
            return None
        return entry["ret-type"] if kind == "returns" else entry["arg-type"]

    def has_argument(self, command, path):
        root = self._root("argument", command)
        return root is not None and bool(self._member_types(root, path))

    def returns_member(self, command, path):
        root = self._root("returns", command)
        return root is not None and bool(self._member_types(root, path))

    def event_member(self, event, path):
        root = self._root("event", event)
        return root is not None and bool(self._member_types(root, path))

    def enum_values(self, command, path, kind="argument"):
        """Values of the enum at `path` of a command's arguments (or returns), or None."""
        root = self._root(kind, command)
        if root is None:
            return None
        values = []
        for type_name in self._member_types(root, path):
            for enum in self._enums(type_name):
                for value in _enum_names(enum):
                    if value not in values:
                        values.append(value)
        return values or None

    def _enums(self, type_name):
        entry = self.entries.get(type_name)
        if entry is None:
            return []
        if entry["meta-type"] == "enum":
            return [entry]
        if entry["meta-type"] == "array":
            return self._enums(entry["element-type"])
        if entry["meta-type"] == "alternate":
            return [e for m in entry["members"] for e in self._enums(m["type"])]
        return []

    def feature(self, name):
        kind, target, path = FEATURE_PROBES[name]
        if kind == "command":
            return self.has_command(target)
        if kind == "argument":
            return self.has_argument(target, path)
        if kind == "returns":
            return self.returns_member(target, path)
        return self.enum_values(target, path) or []

    def features(self):
        return dict((name, self.feature(name)) for name in sorted(FEATURE_PROBES))

    # -- validation -------------------------------------------------------

    def json_schema(self, command):
        """A JSON Schema (draft 2020-12) for the arguments of `command`."""
        entry = self.entries.get(command)
        if entry is None or entry["meta-type"] != "command":
            return None
        if self._json_defs is None:
            self._json_defs = dict((name, self._to_json(e)) for name, e in self.entries.items()
                                   if e["meta-type"] not in ("command", "event"))
        root = dict(self._json_defs[entry["arg-type"]])
        if command in _OPEN_ARGUMENT_COMMANDS:
            root.pop("additionalProperties", None)
        root["$defs"] = self._json_defs
        return root

    def _to_json(self, entry):
        meta = entry["meta-type"]
        if meta == "builtin":
            return dict(_BUILTIN_JSON_TYPES[entry["json-type"]])
        if meta == "enum":
            return {"enum": _enum_names(entry)}
        if meta == "array":
            return {"type": "array", "items": _ref(entry["element-type"])}
        if meta == "alternate":
            return {"anyOf": [_ref(member["type"]) for member in entry["members"]]}
        return self._object_json(entry, {}, [])

    def _object_json(self, entry, inherited, inherited_required):
        """An object's schema; a union's variant members are merged into per-case branches.

        Each branch lists every member it allows (base and variant) and forbids
        others, so a wrong value in one member never makes its valid siblings
        look unknown.
        """
        properties = dict(inherited)
        properties.update((m["name"], _ref(m["type"])) for m in entry.get("members", []))
        required = list(inherited_required) + [m["name"] for m in entry.get("members", []) if "default" not in m]
        schema = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        variants = [v for v in entry.get("variants", [])
                    if self.entries.get(v["type"], {}).get("meta-type") == "object"]
        if not variants:
            schema["additionalProperties"] = False
            return schema
        tag = entry["tag"]
        branches = [{
            "if": {"properties": {tag: {"const": v["case"]}}, "required": [tag]},
            "then": self._object_json(self.entries[v["type"]], properties, required),
        } for v in variants]
        branches.append({
            "if": {"properties": {tag: {"enum": [v["case"] for v in variants]}}},
            "else": {"properties": properties, "additionalProperties": False},
        })
        schema["allOf"] = branches
        return schema

    def validate(self, command, arguments):
        """Error messages (empty when valid) for sending `command` with `arguments`.

        Raises SchemaValidationUnavailable when jsonschema is not installed.
        """
        if not self.has_command(command):
            return ["QEMU has no command %r" % command]
        validator = self._validators.get(command)
        if validator is None:
            try:
                import jsonschema  # pylint: disable=import-outside-toplevel
            except ImportError:
                raise SchemaValidationUnavailable("the Python library jsonschema is not installed")
            validator = jsonschema.Draft202012Validator(self.json_schema(command))
            self._validators[command] = validator
        errors = []
        for error in sorted((_deepest(e) for e in validator.iter_errors(arguments or {})),
                            key=lambda e: [str(p) for p in e.absolute_path]):
            if error.validator == "additionalProperties":
                names = _quoted_names(error.message)
                message = "unknown argument%s %s" % ("s" if len(names) > 1 else "", ", ".join(names))
            else:
                message = error.message
            where = ".".join(str(p) for p in error.absolute_path) or "arguments"
            line = "%s: %s: %s" % (command, where, message)
            if line not in errors:  # a union's branches repeat the base members
                errors.append(line)
        return errors


def _deepest(error):
    """For anyOf/oneOf failures, the error of the branch that got furthest."""
    while error.context:
        error = max(error.context, key=lambda e: len(list(e.absolute_path)))
    return error


def _quoted_names(message):
    return re.findall(r"'([^']*)'", message.split("(", 1)[-1])


def _enum_names(entry):
    if "members" in entry:
        return [m["name"] for m in entry["members"]]
    return list(entry.get("values", []))


def _ref(type_name):
    return {"$ref": "#/$defs/" + type_name}


_BUILTIN_JSON_TYPES = {
    "string": {"type": "string"},
    "int": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "value": {},
}


# -- the disk cache ---------------------------------------------------------

def default_cache_dir():
    explicit = os.environ.get(SCHEMA_CACHE_ENV)
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qemu.qmp")


def cache_path(cache_dir, version):
    """Cache file for one QEMU binary, keyed by its version and package string."""
    key = json.dumps([version.get("major"), version.get("minor"), version.get("micro"),
                      version.get("package")], sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, "schema-%s.%s.%s-%s.json" % (
        version.get("major"), version.get("minor"), version.get("micro"), digest))


def _read_cache(path, version):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT
            or data.get("version") != version or not isinstance(data.get("schema"), list)):
        return None
    if not all(_well_formed(e) for e in data["schema"]):
        return None
    return data["schema"]


# The keys each kind of SchemaInfo has (QAPI's introspection), and so the lookups read.
_REQUIRED_KEYS = {
    "command": ("arg-type", "ret-type"),
    "event": ("arg-type",),
    "object": ("members",),
    "alternate": ("members",),
    "array": ("element-type",),
    "builtin": ("json-type",),
    "enum": (),
}


def _well_formed(entry):
    """Whether a cached SchemaInfo has what the lookups read: a cache of another shape is fetched again."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return False
    required = _REQUIRED_KEYS.get(entry.get("meta-type"))
    if required is None or not all(isinstance(entry.get(key), (str, list)) for key in required):
        return False
    if entry["meta-type"] == "enum":
        return True
    parts = [entry.get("members", []), entry.get("variants", [])]
    return all(isinstance(part, list) and all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in part)
               for part in parts)


def _write_cache(path, version, entries):
    """Write atomically; a cache that cannot be written is not an error."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".schema-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"format": _CACHE_FORMAT, "version": version, "schema": entries}, handle,
                          separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        return False
    return True


def load_schema(execute, version, cache_dir=None, use_cache=True):
    """The QMPSchema of the connected QEMU.

    `execute(command)` runs a QMP command; `version` is the greeting's
    {major, minor, micro, package}. Returns (schema, fetched) where fetched
    says whether query-qmp-schema was called.
    """
    path = cache_path(cache_dir or default_cache_dir(), version) if use_cache else None
    entries = _read_cache(path, version) if path else None
    fetched = entries is None
    if fetched:
        entries = execute("query-qmp-schema")
        if path:
            _write_cache(path, version, entries)
    return QMPSchema(entries), fetched
