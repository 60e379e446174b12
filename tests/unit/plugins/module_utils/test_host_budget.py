# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host's budget: never more runs at once than slots, a waiting run goes on when one ends."""

from __future__ import annotations

import threading
import time

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.host_budget import BudgetError, HostBudget


class Lines:
    def __init__(self):
        self.lines = []

    def phase(self, text):
        self.lines.append(text)

    progress = phase


def test_never_more_than_the_budget_at_once(tmp_path):
    inside, most, lock = [0], [0], threading.Lock()

    def run(index):
        with HostBudget(str(tmp_path), "backup", 2, 30, Lines(), "run %d" % index):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.3)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 2
    # Three rounds of two: the runs did wait for each other, and went on when a slot came free.
    assert 0.85 < time.monotonic() - start < 3


def test_a_run_that_gets_no_slot_names_the_holders(tmp_path):
    reporter = Lines()
    with HostBudget(str(tmp_path), "migration", 1, 30, Lines(), "migration of vm1"):
        with pytest.raises(BudgetError) as failed:
            with HostBudget(str(tmp_path), "migration", 1, 0.5, reporter, "migration of vm2"):
                pytest.fail("got a slot that is held")
    assert "held by migration of vm1" in str(failed.value)
    assert reporter.lines and "held by migration of vm1" in reporter.lines[0]
    # Released: the next run gets it at once.
    with HostBudget(str(tmp_path), "migration", 1, 0, Lines(), "migration of vm3") as budget:
        assert budget.slot == 0 and budget.waited < 0.1


def test_no_budget_takes_no_slot(tmp_path):
    folder = tmp_path / "budget"
    with HostBudget(str(folder), "backup", 0, 0, Lines(), "x") as budget:
        assert budget.slot is None
    assert not folder.exists()
