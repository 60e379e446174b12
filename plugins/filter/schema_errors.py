# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: schema_errors
short_description: Check data against a JSON Schema
version_added: 0.1.0
description:
  - Returns the list of the ways the input does not match the JSON Schema (draft 2020-12); empty when it
    matches. The C(qemu.qmp.backup) role checks each manifest with it before writing it.
  - Needs the Python library C(jsonschema) on the controller.
options:
  _input:
    description: The data to check.
    type: raw
    required: true
  schema:
    description: The JSON Schema.
    type: dict
    required: true
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Check a manifest
  ansible.builtin.assert:
    that: manifest | qemu.qmp.schema_errors(lookup('ansible.builtin.file', 'manifest.schema.json') | from_json) == []
"""

RETURN = r"""
_value:
  description: One message per mismatch, each starting with the path of the offending value.
  type: list
  elements: str
"""

from ansible.errors import AnsibleFilterError

try:
    import jsonschema
except ImportError:
    jsonschema = None


def _plain(value):
    """Ansible's tagged values as plain JSON types."""
    if isinstance(value, dict):
        return dict((str(k), _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def schema_errors(data, schema):
    if jsonschema is None:
        raise AnsibleFilterError("qemu.qmp.schema_errors needs the Python library jsonschema on the controller")
    validator = jsonschema.Draft202012Validator(_plain(schema), format_checker=jsonschema.FormatChecker())
    return ["%s: %s" % ("/".join(str(p) for p in error.absolute_path) or "(top)", error.message)
            for error in sorted(validator.iter_errors(_plain(data)), key=lambda e: list(map(str, e.absolute_path)))]


class FilterModule:
    def filters(self):
        return {"schema_errors": schema_errors}
