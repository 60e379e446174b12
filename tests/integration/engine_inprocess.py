# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qmp_backup_chain module run inside the test's process, against real QEMU and qemu-img, with the host's
clock replaced: sixty days of backups take a minute, not sixty days.

Only the detached worker is left out (the run happens in this process, as the worker would run it); the
module's options, checks, engine and results are the real ones.

Run as a script, it runs the module once and is killed (os._exit, as by SIGKILL: nothing is cleaned up)
when the prune reaches a given step:  python engine_inprocess.py ARGS_JSON STEP COUNT
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import sys

from ansible.module_utils.testing import patch_module_args

from ansible_collections.qemu.qmp.plugins.module_utils import backup_engine, detached_run
from ansible_collections.qemu.qmp.plugins.module_utils.backup_prune import Pruner
from ansible_collections.qemu.qmp.plugins.modules import qmp_backup_chain


class Clock:
    """The host's clock as the backup engine reads it."""

    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, **delta):
        self.now += datetime.timedelta(**delta)


def _run_here(qm, run, dummy_poll, dummy_timeout):
    detached_run.finish(qm, run(detached_run.Reporter()))


def run_module(args, check=False, diff=False, clock=None):
    """Run qmp_backup_chain with `args`; returns its result (a dict, with "failed" when it failed)."""
    module_args = dict(args, _ansible_check_mode=check, _ansible_diff=diff)
    out = io.StringIO()
    saved = detached_run.run_or_follow, backup_engine.utc_now
    detached_run.run_or_follow = _run_here
    if clock is not None:
        backup_engine.utc_now = clock
    try:
        with patch_module_args(module_args), contextlib.redirect_stdout(out):
            try:
                qmp_backup_chain.main()
            except SystemExit:
                pass
    finally:
        detached_run.run_or_follow, backup_engine.utc_now = saved
    text = out.getvalue()
    return json.loads(text[text.index("{"):])


# The steps of a prune, in the order they happen, each a method of Pruner that a kill can follow.
PRUNE_STEPS = ("record", "fold_disk", "rewrite_manifest", "remove_point")


def die_after(step, count):
    """Make the process die, as by SIGKILL, right after the `count`th call of Pruner.`step`."""
    original = getattr(Pruner, step)
    calls = []

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == count:
            os._exit(9)
        return result
    setattr(Pruner, step, wrapped)


if __name__ == "__main__":
    die_after(sys.argv[2], int(sys.argv[3]))
    print(json.dumps(run_module(json.loads(sys.argv[1]))))
