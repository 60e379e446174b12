# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Make `ansible_collections.qemu.qmp` importable from a checkout (tools/bootstrap.sh links it)."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(ROOT, "build", "collections")
LINK = os.path.join(COLLECTIONS, "ansible_collections", "qemu", "qmp")

if not os.path.islink(LINK) and "/ansible_collections/qemu/qmp" not in ROOT.replace(os.sep, "/"):
    os.makedirs(os.path.dirname(LINK), exist_ok=True)
    os.symlink(ROOT, LINK)
if "/ansible_collections/qemu/qmp" in ROOT.replace(os.sep, "/"):
    # Run from inside an installed collection tree (ansible-test, a galaxy install).
    COLLECTIONS = ROOT.replace(os.sep, "/").rsplit("/ansible_collections/", 1)[0]
if COLLECTIONS not in sys.path:
    sys.path.insert(0, COLLECTIONS)
