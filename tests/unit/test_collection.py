# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's metadata agrees with its modules."""

from __future__ import annotations

import ast
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "plugins", "modules"))
                 if f.endswith(".py") and not f.startswith("_"))


def _load(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _documentation(module):
    with open(os.path.join(ROOT, "plugins", "modules", module + ".py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "DOCUMENTATION":
            return yaml.safe_load(node.value.value)
    raise AssertionError("%s has no DOCUMENTATION" % module)


def test_every_module_is_in_the_action_group():
    group = _load("meta/runtime.yml")["action_groups"]["qmp"]
    assert sorted(group) == MODULES


def test_every_module_documents_its_action_group_and_connection():
    for module in MODULES:
        fragments = _documentation(module)["extends_documentation_fragment"]
        assert "qemu.qmp.connection" in fragments, module
        assert "qemu.qmp.attributes" in fragments, module


def test_galaxy_names_the_collection():
    galaxy = _load("galaxy.yml")
    assert (galaxy["namespace"], galaxy["name"]) == ("qemu", "qmp")


def _pinned_core(requirements):
    with open(os.path.join(ROOT, requirements), encoding="utf-8") as handle:
        return next(line.split("==")[1].strip() for line in handle if line.startswith("ansible-core=="))


def test_requires_ansible_is_a_lower_bound_that_ci_tests():
    """Only a lower bound (an upper one makes every newer ansible-core warn), and it is the ansible-core
    the first CI lane runs; the second lane runs the newest."""
    oldest = _pinned_core("requirements-dev.txt").split(".")[:2]
    assert _load("meta/runtime.yml")["requires_ansible"] == ">=%s.0" % ".".join(oldest)
    newest = _pinned_core("requirements-latest.txt").split(".")[:2]
    assert [int(n) for n in newest] > [int(n) for n in oldest]
