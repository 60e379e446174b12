# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Runs the qmp_backup_chain module, then follows its run on the host until it ends, printing its progress."""

from __future__ import annotations

from ansible_collections.qemu.qmp.plugins.plugin_utils.follow_run import FollowRunAction


class ActionModule(FollowRunAction):
    """The run is the module's; following it is shared by the collection's engines."""
