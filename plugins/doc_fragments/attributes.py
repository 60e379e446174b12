# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # Attributes every module of the collection shares.
    DOCUMENTATION = r"""
options: {}
attributes:
  action_group:
    description: Use C(group/qemu.qmp.qmp) in C(module_defaults) to set the connection options once.
    support: full
    membership:
      - qemu.qmp.qmp
  platform:
    description: Runs on the host where QEMU's QMP socket is reachable.
    support: full
    platforms: posix
"""

    CHECK_AND_DIFF = r"""
options: {}
attributes:
  check_mode:
    description: Reads QEMU's state and reports what would change, without changing it.
    support: full
  diff_mode:
    description: Shows the state before and after.
    support: full
"""

    READ_ONLY = r"""
options: {}
attributes:
  check_mode:
    description: Only reads QEMU's state, so it runs the same in check mode.
    support: full
  diff_mode:
    description: Never changes anything, so it has no diff.
    support: N/A
"""
