# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""User-creatable objects (secrets, TLS credentials, I/O threads, throttle groups, ...): what
QEMU reports of them under /objects, and comparing a request with it.

QEMU lists each object as a `child<TYPE>` property of /objects and reads its properties back
with `qom-get`, in its own types: booleans, numbers, enum values as strings, structures as
dictionaries. Properties it cannot read back are left out, and each comparison says so.
"""

from __future__ import annotations

import difflib
import re

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import REDACTED
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_devices import qom_children

OBJECTS = "/objects"
# Properties that hold secret material (a secret object's `data`): compared, never shown.
SECRET_PROPS = ("data",)
# QEMU's rule for object ids (id_wellformed): a letter, then letters, digits, '-', '.' and '_'.
_OBJECT_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_TRUE = ("on", "true", "yes", "1")
_FALSE = ("off", "false", "no", "0")


def id_error(object_id):
    """Why QEMU would refuse `object_id` as an object id, or None."""
    if _OBJECT_ID.match(object_id):
        return None
    return ("id %r is not a valid object id: QEMU wants a letter first, then only letters, digits, "
            "'-', '.' and '_'" % object_id)


def type_error(qom_type, known):
    """Why `qom_type` is not one of the types object-add takes (`known`, from the schema), or None."""
    if not known or qom_type in known:
        return None
    close = difflib.get_close_matches(qom_type, known, n=3)
    hint = " (did you mean %s?)" % " or ".join(repr(name) for name in close) if close else ""
    return "qom_type %r is not an object type this QEMU can create%s; its object-add takes: %s" % (
        qom_type, hint, ", ".join(sorted(known)))


def object_types(query):
    """{id: type} of the user-creatable objects QEMU has (the `child<TYPE>` properties of /objects)."""
    return qom_children(query, OBJECTS)


def read_object(query, object_id, names=()):
    """The object with id `object_id`, or None.

    {id, qom_type, path, props: {name: value}} with the values QEMU reports for the named
    properties; those it cannot read (write-only, unknown to the type) are left out.
    """
    qom_type = object_types(query).get(object_id)
    if qom_type is None:
        return None
    path = "%s/%s" % (OBJECTS, object_id)
    obj = {"id": object_id, "qom_type": qom_type, "path": path, "props": {}}
    for name in names:
        try:
            obj["props"][name] = query("qom-get", {"path": path, "property": name})
        except QMPCommandError:
            pass
    return obj


def secret_values(props):
    """The values of the secret properties in `props`."""
    return [props[name] for name in SECRET_PROPS if name in props]


def shown(props):
    """`props` with the secret properties' values replaced by REDACTED."""
    return dict((name, REDACTED if name in SECRET_PROPS else value) for name, value in props.items())


def shown_object(obj):
    if obj is None:
        return None
    out = dict(obj)
    out["props"] = shown(obj.get("props") or {})
    return out


def same_value(wanted, reported):
    """Whether a value given for object-add is the value QEMU reports back.

    QEMU reports booleans, numbers and enum values in its own types; a structure (a throttle
    group's `limits`) is reported whole, so only the members given are compared.
    """
    if isinstance(reported, dict):
        return isinstance(wanted, dict) and all(
            key in reported and same_value(value, reported[key]) for key, value in wanted.items())
    if isinstance(reported, list):
        return isinstance(wanted, (list, tuple)) and len(wanted) == len(reported) and all(
            same_value(w, r) for w, r in zip(wanted, reported))
    if isinstance(reported, bool):
        if isinstance(wanted, str):
            return wanted.strip().lower() in (_TRUE if reported else _FALSE)
        return isinstance(wanted, (bool, int)) and bool(wanted) == reported and wanted in (0, 1)
    if isinstance(reported, (int, float)):
        if isinstance(wanted, bool):
            return False
        if isinstance(wanted, str):
            return _number(wanted) == reported
        return isinstance(wanted, (int, float)) and wanted == reported
    if isinstance(reported, str):
        if isinstance(wanted, bool):
            return reported.strip().lower() in (_TRUE if wanted else _FALSE)
        if isinstance(wanted, (int, float)):
            return str(wanted) == reported
        return wanted == reported
    return wanted == reported


def _number(text):
    """The number a string spells (decimal, 0x hexadecimal, or a float), or None."""
    for convert in (lambda t: int(t, 0), float):
        try:
            return convert(text.strip())
        except ValueError:
            pass
    return None


def _differences(name, wanted, reported, out):
    """Add to `out` each part of `wanted` that differs from `reported`, by dotted name."""
    if isinstance(wanted, dict) and isinstance(reported, dict):
        for key in sorted(wanted):
            _differences("%s.%s" % (name, key), wanted[key], reported.get(key), out)
    elif not same_value(wanted, reported):
        out[name] = {"wanted": wanted, "qemu": reported}


def compare_object(qom_type, props, obj):
    """(differences, not_compared) between the wanted object and QEMU's report.

    Another type is the only difference reported (the properties of one type mean nothing for
    another). Differences of secret properties show REDACTED for both values.
    """
    if qom_type != obj["qom_type"]:
        return {"qom_type": {"wanted": qom_type, "qemu": obj["qom_type"]}}, sorted(props)
    differences, not_compared = {}, []
    for name, wanted in sorted(props.items()):
        if name not in obj["props"]:
            not_compared.append(name)
        else:
            _differences(name, wanted, obj["props"][name], differences)
    for name in differences:
        if name.split(".", 1)[0] in SECRET_PROPS:
            differences[name] = {"wanted": REDACTED, "qemu": REDACTED}
    return differences, not_compared
