# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The plan of a prune: which points go, in which order, and which are folded into which."""

from __future__ import annotations

import time

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.backup_prune import describe_action, plan_prune
from ansible_collections.qemu.qmp.tests.unit.plugins.module_utils.test_backup_catalog import Store


@pytest.fixture(name="store")
def fixture_store(tmp_path, monkeypatch):
    # The policy's days are the host's local days: pin them.
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield Store(tmp_path / "vm1")
    monkeypatch.undo()
    time.tzset()


def add(store, chain, sequence, day, hour=10, **extra):
    doc = store.add(chain, sequence, **extra)
    doc["finished"] = "2026-11-%02dT%02d:00:00Z" % (day, hour)
    store.write_manifest(chain, sequence, doc)


def test_points_no_kept_point_reads_go_newest_first_and_the_rest_fold(store):
    old, new = "20261101T100000Z", "20261104T100000Z"
    # The older chain: A0 to A3 on days 1 to 3 (A2 and A3 on one day), A4 and A5 on day 4, with the newer chain.
    for sequence, day, hour in ((0, 1, 10), (1, 2, 10), (2, 3, 10), (3, 3, 11), (4, 4, 8), (5, 4, 9)):
        add(store, old, sequence, day, hour)
    for sequence, hour in ((0, 10), (1, 11), (2, 12)):
        add(store, new, sequence, 4, hour)
    plan = plan_prune(store.catalog(), {"keep_daily": 2})
    # keep_daily keeps the newest of day 4 (new/2) and of day 3 (old/3).
    assert plan["kept"] == {new + "/0002-incremental": "keep_daily", old + "/0003-incremental": "keep_daily"}
    assert [describe_action(a) for a in plan["actions"]] == [
        "remove %s/0005-incremental" % old,
        "remove %s/0004-incremental" % old,
        "fold %s/0000-full, %s/0001-incremental, %s/0002-incremental into 0003-incremental" % (old, old, old),
        "fold %s/0000-full, %s/0001-incremental into 0002-incremental" % (new, new),
    ]


def test_a_chain_none_of_whose_points_is_kept_is_deleted_and_the_newest_point_always_stays(store):
    old, new = "20261101T100000Z", "20261104T100000Z"
    for sequence in range(3):
        add(store, old, sequence, 1 + sequence)
    for sequence in range(2):
        add(store, new, sequence, 5 + sequence)
    plan = plan_prune(store.catalog(), {"keep_last": 1})
    assert plan["kept"] == {new + "/0001-incremental": "keep_last"}
    assert [describe_action(a) for a in plan["actions"]] == [
        "delete chain %s (0000-full, 0001-incremental, 0002-incremental)" % old,
        "fold %s/0000-full into 0001-incremental" % new]


def test_a_full_backup_under_several_differentials_stays_as_their_base(store):
    chain = "20261101T100000Z"
    add(store, chain, 0, 1)
    add(store, chain, 1, 2, level="differential")
    add(store, chain, 2, 3, level="differential")
    plan = plan_prune(store.catalog(), {"keep_last": 2})
    assert plan["kept"][chain + "/0000-full"] == "base of 2 points"
    assert plan["actions"] == []
