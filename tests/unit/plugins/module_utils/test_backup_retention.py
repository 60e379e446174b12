# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of backup_retention: Proxmox Backup Server's prune rules, checked against the examples
and the sentences of its documentation, and against a plain reimplementation of those sentences.

Sources:
- PBS client docs, "Pruning and Removing Backups": https://pbs.proxmox.com/docs/backup-client.html#backup-pruning
  (docs/backup-client.rst in proxmox/proxmox-backup): the options, "each option covers a specific period of
  time", "the next option does not take care of already covered backups and only considers older backups",
  and a dated `prune --dry-run` example.
- PBS admin docs, "Pruning": https://pbs.proxmox.com/docs/maintenance.html#pruning: "If there is more than one
  backup for a single hour, only the latest is retained. Hours without backups do not count." (the same for
  days, weeks, months, years); "Weeks start on Monday and end on Sunday. The software uses the ISO week date
  system and handles weeks at the end of the year correctly."; "The retention options are processed in the
  order given above."
- Proxmox VE admin guide, "Backup Retention" and its "Retention Settings Example":
  https://pve.proxmox.com/pve-docs/chapter-vzdump.html#vzdump_retention (vzdump.adoc in proxmox/pve-docs).
"""

from __future__ import annotations

import datetime
import random

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.backup_retention import (
    RULES, RetentionError, describe, normalize_policy, policy_is_empty, select)

NONE = {rule: 0 for rule in RULES}


def _at(text):
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M")


def _points(*texts):
    """Backups named by their own time: the key sorts like the time."""
    return [(text, _at(text)) for text in texts]


def _daily(first, last, hour=2):
    """One backup a day at `hour`:00, from `first` to `last` (dates), keyed by "YYYY-MM-DD HH:MM"."""
    day, points = first, []
    while day <= last:
        moment = datetime.datetime(day.year, day.month, day.day, hour)
        points.append((moment.strftime("%Y-%m-%d %H:%M"), moment))
        day += datetime.timedelta(days=1)
    return points


def _kept(result):
    return {key: rule for key, rule in result.items() if rule is not None}


# A plain reimplementation of the documented sentences, written without looking at the module: for each
# option in order, the backups not yet decided are grouped by period, newest period first, leaving out the
# periods in which an earlier option already kept a backup ("does not take care of already covered
# backups"); in the N newest periods ("hours without backups do not count") the latest backup is kept and
# the others removed ("only the latest is kept"); older periods are left to the next options ("only
# considers older backups"). What no option keeps is removed. Periods come from the datetime's fields;
# a week is named by its Monday ("weeks start on Monday"), which needs no ISO year arithmetic.
_REFERENCE_PERIOD = {
    "keep_last": lambda key, moment: key,
    "keep_hourly": lambda key, moment: moment.replace(minute=0, second=0, microsecond=0),
    "keep_daily": lambda key, moment: moment.date(),
    "keep_weekly": lambda key, moment: moment.date() - datetime.timedelta(days=moment.weekday()),
    "keep_monthly": lambda key, moment: (moment.year, moment.month),
    "keep_yearly": lambda key, moment: moment.year,
}


def _reference(points, policy):
    counts = {rule: int(policy.get(rule) or 0) for rule in RULES}
    newest_first = sorted(points, key=lambda point: (point[1], point[0]), reverse=True)
    if not any(counts.values()):
        return {key: "all" for key, dummy in points}
    decided = {}
    for rule in RULES:
        if not counts[rule]:
            continue
        period = _REFERENCE_PERIOD[rule]
        covered = {period(key, moment) for key, moment in newest_first if decided.get(key)}
        groups = {}  # period -> its undecided backups, newest first; periods in newest-first order
        for key, moment in newest_first:
            if key not in decided and period(key, moment) not in covered:
                groups.setdefault(period(key, moment), []).append(key)
        for keys in list(groups.values())[:counts[rule]]:
            decided[keys[0]] = rule
            decided.update((key, None) for key in keys[1:])
    return {key: decided.get(key) for key, dummy in points}


# ---- the documented example with dates -------------------------------------------------------------------

def test_pbs_client_docs_dry_run_example():
    # https://pbs.proxmox.com/docs/backup-client.html#backup-pruning shows
    #   proxmox-backup-client prune host/elsa --dry-run --keep-daily 1 --keep-weekly 3
    # on five snapshots, and states keep 1/0/1/0/1 for 2019-12-04T13:20:37Z, 2019-12-03T09:35:01Z,
    # 2019-11-22T11:54:47Z, 2019-11-21T12:36:25Z, 2019-11-10T10:42:20Z. The times are given in UTC; as naive
    # datetimes with the same fields they are read the same way. keep_daily keeps 12-04; its ISO week (W49)
    # is then covered, so 12-03 (same week) is left out of keep_weekly and removed; keep_weekly keeps the
    # latest of W47 (11-22, removing 11-21) and of W45 (11-10).
    snapshots = [("host/elsa/2019-12-04T13:20:37Z", datetime.datetime(2019, 12, 4, 13, 20, 37)),
                 ("host/elsa/2019-12-03T09:35:01Z", datetime.datetime(2019, 12, 3, 9, 35, 1)),
                 ("host/elsa/2019-11-22T11:54:47Z", datetime.datetime(2019, 11, 22, 11, 54, 47)),
                 ("host/elsa/2019-11-21T12:36:25Z", datetime.datetime(2019, 11, 21, 12, 36, 25)),
                 ("host/elsa/2019-11-10T10:42:20Z", datetime.datetime(2019, 11, 10, 10, 42, 20))]
    result = select(snapshots, {"keep_daily": 1, "keep_weekly": 3})
    assert [result[key] is not None for key, dummy in snapshots] == [True, False, True, False, True]
    assert result == {"host/elsa/2019-12-04T13:20:37Z": "keep_daily",
                      "host/elsa/2019-12-03T09:35:01Z": None,
                      "host/elsa/2019-11-22T11:54:47Z": "keep_weekly",
                      "host/elsa/2019-11-21T12:36:25Z": None,
                      "host/elsa/2019-11-10T10:42:20Z": "keep_weekly"}
    assert result == _reference(snapshots, {"keep_daily": 1, "keep_weekly": 3})


# ---- the documented example without dates: Proxmox VE's "Retention Settings Example" ---------------------

PVE_EXAMPLE = {"keep_last": 3, "keep_daily": 13, "keep_weekly": 8, "keep_monthly": 11, "keep_yearly": 9}
PVE_NEWEST = datetime.date(2021, 6, 15)


@pytest.fixture(name="pve_example", scope="module")
def fixture_pve_example():
    # https://pve.proxmox.com/pve-docs/chapter-vzdump.html#vzdump_retention, "Retention Settings Example":
    # "we assume that you are doing daily backups, have a retention period of 10 years", with
    # keep-last=3, keep-hourly not set, keep-daily=13, keep-weekly=8, keep-monthly=11, keep-yearly=9.
    # Daily backups at 02:00 for eleven and a half years, and "an extra one just before or after a big
    # upgrade" on the newest day, at 14:00.
    points = _daily(datetime.date(2010, 1, 1), PVE_NEWEST) + _points("2021-06-15 14:00")
    return points, select(points, PVE_EXAMPLE)


def _days_with_a_kept_backup(result):
    return {datetime.datetime.strptime(key, "%Y-%m-%d %H:%M").date() for key in _kept(result)}


def test_pve_example_matches_the_reference_and_each_option_keeps_its_n(pve_example):
    points, result = pve_example
    assert result == _reference(points, PVE_EXAMPLE)
    rules = list(_kept(result).values())
    assert {rule: rules.count(rule) for rule in set(rules)} == PVE_EXAMPLE


def test_pve_example_keep_last_keeps_the_extra_backup(pve_example):
    # "keep-last=3 - even if only daily backups are taken, an admin may want to create an extra one just
    # before or after a big upgrade. Setting keep-last ensures this.": both backups of the newest day stay,
    # where keep_daily alone keeps only the latest of the day.
    points, result = pve_example
    assert result["2021-06-15 14:00"] == "keep_last" and result["2021-06-15 02:00"] == "keep_last"
    daily_only = select(points, {"keep_daily": 13})
    assert daily_only["2021-06-15 14:00"] == "keep_daily" and daily_only["2021-06-15 02:00"] is None


def test_pve_example_two_weeks_of_daily_backups(pve_example):
    # "keep-daily=13 - together with keep-last, which covers at least one day, this ensures that you have
    # at least two weeks of backups."
    days = _days_with_a_kept_backup(pve_example[1])
    assert all(PVE_NEWEST - datetime.timedelta(days=back) in days for back in range(14))


def test_pve_example_two_months_of_weekly_backups(pve_example):
    # "keep-weekly=8 - ensures that you have at least two full months of weekly backups.": each of the 9
    # newest ISO weeks (63 days, more than any two months) holds a kept backup, the 8 weekly ones each in
    # a week of its own.
    dummy, result = pve_example
    weeks = {day.isocalendar()[:2] for day in _days_with_a_kept_backup(result)}
    monday = PVE_NEWEST - datetime.timedelta(days=PVE_NEWEST.weekday())
    assert all((monday - datetime.timedelta(weeks=back)).isocalendar()[:2] in weeks for back in range(9))
    weekly = [_at(key).isocalendar()[:2] for key, rule in result.items() if rule == "keep_weekly"]
    assert len(set(weekly)) == 8


def test_pve_example_a_year_of_monthly_backups(pve_example):
    # "keep-monthly=11 - together with the previous keep settings, this ensures that you have at least a
    # year of monthly backups."
    months = {(day.year, day.month) for day in _days_with_a_kept_backup(pve_example[1])}
    year, month, wanted = PVE_NEWEST.year, PVE_NEWEST.month, []
    for dummy in range(12):
        wanted.append((year, month))
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    assert set(wanted) <= months


def test_pve_example_ten_years_of_coverage(pve_example):
    # "keep-yearly=9 - this is for the long term archive. As you covered the current year with the previous
    # options, you would set this to nine for the remaining ones, giving you a total of at least 10 years of
    # coverage."
    dummy, result = pve_example
    years = {day.year for day in _days_with_a_kept_backup(result)}
    assert set(range(PVE_NEWEST.year - 9, PVE_NEWEST.year + 1)) <= years
    assert sorted(_at(key).year for key, rule in result.items() if rule == "keep_yearly") == list(range(2011, 2020))


# ---- cases built from the documented sentences --------------------------------------------------------------

SENTENCE_CASES = [
    # "keep-last N: keep the last N backups": the 3 newest of 10 daily backups.
    pytest.param(
        ["2024-05-%02d 02:00" % day for day in range(1, 11)], {"keep_last": 3},
        {"2024-05-10 02:00": "keep_last", "2024-05-09 02:00": "keep_last", "2024-05-08 02:00": "keep_last"},
        id="keep_last-3-of-10-daily"),
    # "keep-daily N: ... if there is more than one backup for a single day, only the latest is kept": two
    # backups on some days; the last 7 days with a backup keep their latest one.
    pytest.param(
        ["2024-05-10 22:00", "2024-05-10 02:00", "2024-05-09 02:00", "2024-05-08 23:59", "2024-05-08 00:00",
         "2024-05-07 02:00", "2024-05-06 02:00", "2024-05-05 12:00", "2024-05-05 02:00", "2024-05-04 02:00",
         "2024-05-03 02:00", "2024-05-02 02:00"],
        {"keep_daily": 7},
        {"2024-05-10 22:00": "keep_daily", "2024-05-09 02:00": "keep_daily", "2024-05-08 23:59": "keep_daily",
         "2024-05-07 02:00": "keep_daily", "2024-05-06 02:00": "keep_daily", "2024-05-05 12:00": "keep_daily",
         "2024-05-04 02:00": "keep_daily"},
        id="keep_daily-7-latest-of-each-day"),
    # "days without backups do not count": 7 days with a backup reach back over the gaps.
    pytest.param(
        ["2024-05-30 02:00", "2024-05-20 02:00", "2024-05-19 02:00", "2024-05-01 02:00", "2024-04-15 02:00",
         "2024-04-14 02:00", "2024-03-01 02:00", "2024-02-29 02:00"],
        {"keep_daily": 7},
        {"2024-05-30 02:00": "keep_daily", "2024-05-20 02:00": "keep_daily", "2024-05-19 02:00": "keep_daily",
         "2024-05-01 02:00": "keep_daily", "2024-04-15 02:00": "keep_daily", "2024-04-14 02:00": "keep_daily",
         "2024-03-01 02:00": "keep_daily"},
        id="keep_daily-days-without-backups-do-not-count"),
    # "keep-hourly N: ... hours without backups do not count": hours 08-09 and 04-06 hold none.
    pytest.param(
        ["2024-05-10 10:40", "2024-05-10 10:05", "2024-05-10 07:15", "2024-05-10 03:30", "2024-05-10 03:10",
         "2024-05-10 01:00"],
        {"keep_hourly": 3},
        {"2024-05-10 10:40": "keep_hourly", "2024-05-10 07:15": "keep_hourly", "2024-05-10 03:30": "keep_hourly"},
        id="keep_hourly-hours-without-backups-do-not-count"),
    # "weeks start on Monday ... ISO week date system ... handles weeks at the end of the year": 2020-12-28
    # (Monday), 2020-12-31 and 2021-01-03 (Sunday) are all in 2020-W53; 2021-01-04 starts 2021-W01.
    pytest.param(
        ["2021-01-11 02:00", "2021-01-10 02:00", "2021-01-04 02:00", "2021-01-03 02:00", "2020-12-31 02:00",
         "2020-12-28 02:00", "2020-12-27 02:00"],
        {"keep_weekly": 3},
        {"2021-01-11 02:00": "keep_weekly", "2021-01-10 02:00": "keep_weekly", "2021-01-03 02:00": "keep_weekly"},
        id="keep_weekly-iso-week-53-across-new-year"),
    # ... and the other way round: 2019-12-30 (Monday) is already in 2020-W01, 2019-12-29 (Sunday) in 2019-W52.
    pytest.param(
        ["2020-01-01 02:00", "2019-12-30 02:00", "2019-12-29 02:00", "2019-12-23 02:00"],
        {"keep_weekly": 2},
        {"2020-01-01 02:00": "keep_weekly", "2019-12-29 02:00": "keep_weekly"},
        id="keep_weekly-iso-week-1-starts-in-december"),
    # "keep-monthly N" / "keep-yearly N": the latest of each month, of each year.
    pytest.param(
        ["2024-03-31 23:00", "2024-03-01 00:00", "2024-02-29 02:00", "2023-12-31 02:00", "2023-01-01 02:00",
         "2022-06-15 02:00"],
        {"keep_monthly": 2, "keep_yearly": 2},
        {"2024-03-31 23:00": "keep_monthly", "2024-02-29 02:00": "keep_monthly", "2023-12-31 02:00": "keep_yearly",
         "2022-06-15 02:00": "keep_yearly"},
        id="keep_monthly-then-keep_yearly"),
    # "The next option does not take care of already covered backups": keep_last=1 keeps the newest backup;
    # the other backup of that day is in a covered day, so keep_daily does not spend a slot on it (it is
    # removed) and keeps two more days instead.
    pytest.param(
        ["2024-05-10 20:00", "2024-05-10 08:00", "2024-05-09 20:00", "2024-05-08 20:00", "2024-05-07 20:00"],
        {"keep_last": 1, "keep_daily": 2},
        {"2024-05-10 20:00": "keep_last", "2024-05-09 20:00": "keep_daily", "2024-05-08 20:00": "keep_daily"},
        id="keep_last-covers-its-day-for-keep_daily"),
    # keep_last=2 keeps both backups of the newest day; keep_daily still keeps 2 other days.
    pytest.param(
        ["2024-05-10 20:00", "2024-05-10 08:00", "2024-05-09 20:00", "2024-05-08 20:00", "2024-05-07 20:00"],
        {"keep_last": 2, "keep_daily": 2},
        {"2024-05-10 20:00": "keep_last", "2024-05-10 08:00": "keep_last", "2024-05-09 20:00": "keep_daily",
         "2024-05-08 20:00": "keep_daily"},
        id="keep_last-2-same-day"),
    # "... and only considers older backups": once keep_daily has its 2 days it stops at 03-08, which it
    # leaves alone; keep_monthly skips it (March is covered) and keeps February's latest, then stops at
    # December; keep_yearly skips 2021 (covered) and keeps the latest of 2020 and of 2019.
    pytest.param(
        ["2021-03-10 02:00", "2021-03-09 02:00", "2021-03-08 02:00", "2021-02-20 02:00", "2021-02-10 02:00",
         "2020-12-15 02:00", "2020-06-01 02:00", "2019-05-05 02:00"],
        {"keep_daily": 2, "keep_monthly": 1, "keep_yearly": 2},
        {"2021-03-10 02:00": "keep_daily", "2021-03-09 02:00": "keep_daily", "2021-02-20 02:00": "keep_monthly",
         "2020-12-15 02:00": "keep_yearly", "2019-05-05 02:00": "keep_yearly"},
        id="each-option-stops-after-n-periods"),
    # "Each option covers a specific period of time. We say that backups within this period are covered by
    # this option. The next option does not take care of already covered backups" (the 2019 wording of the
    # PBS client docs, same page): 01-31 is in the week (2024-W05) whose latest backup, 02-04, keep_weekly
    # keeps; keep_weekly removes 01-31 and keep_monthly does not take it back for January: it keeps 01-28.
    pytest.param(
        ["2024-02-04 02:00", "2024-01-31 02:00", "2024-01-28 02:00"],
        {"keep_weekly": 1, "keep_monthly": 1},
        {"2024-02-04 02:00": "keep_weekly", "2024-01-28 02:00": "keep_monthly"},
        id="covered-by-an-earlier-option-stays-removed"),
    # "The retention options are processed in the order given above" whatever the order of the dict.
    pytest.param(
        ["2024-05-10 20:00", "2024-05-10 08:00", "2024-05-09 20:00"],
        {"keep_daily": 1, "keep_last": 1},
        {"2024-05-10 20:00": "keep_last", "2024-05-09 20:00": "keep_daily"},
        id="options-in-documented-order"),
    # an option set to 0 keeps nothing, another still applies
    pytest.param(
        ["2024-05-10 20:00", "2024-05-09 20:00"], {"keep_last": 0, "keep_daily": 1},
        {"2024-05-10 20:00": "keep_daily"}, id="zero-option-is-off"),
    # more periods asked for than there are: everything is kept
    pytest.param(
        ["2024-05-10 20:00", "2024-05-09 20:00"], {"keep_yearly": 5},
        {"2024-05-10 20:00": "keep_yearly"}, id="keep_yearly-more-than-there-are"),
    pytest.param([], {"keep_last": 3}, {}, id="no-backups"),
]


@pytest.mark.parametrize("texts, policy, kept", SENTENCE_CASES)
def test_select_documented_sentences(texts, policy, kept):
    points = _points(*texts)
    result = select(points, policy)
    assert set(result) == set(texts)
    assert _kept(result) == kept
    assert result == _reference(points, policy)


@pytest.mark.parametrize("texts, policy, kept", SENTENCE_CASES)
def test_select_does_not_depend_on_input_order(texts, policy, kept):
    points = _points(*texts)
    random.Random(len(points)).shuffle(points)
    assert _kept(select(iter(points), policy)) == kept  # any iterable will do


@pytest.mark.parametrize("policy", [None, {}, NONE, {"keep_last": None, "keep_daily": "0"}],
                         ids=["none", "empty", "all-zero", "none-and-zero-string"])
def test_empty_policy_keeps_everything(policy):
    # PBS keeps everything when no keep option is set
    points = _points("2024-05-10 20:00", "2024-05-10 08:00", "2020-01-01 00:00")
    assert select(points, policy) == {key: "all" for key, dummy in points}


def test_equal_times_are_ordered_by_key():
    moment = _at("2024-05-10 20:00")
    points = [("b", moment), ("a", moment), ("c", moment - datetime.timedelta(hours=1))]
    assert select(points, {"keep_last": 1}) == {"b": "keep_last", "a": None, "c": None}
    assert select(points, {"keep_hourly": 2}) == {"b": "keep_hourly", "a": None, "c": "keep_hourly"}
    assert select(reversed(points), {"keep_last": 1}) == {"b": "keep_last", "a": None, "c": None}


def test_aware_times_are_read_in_their_own_zone():
    # Periods come from the datetime's own fields, not from UTC: at +02:00, 01:00 on 1 March and 23:30 on
    # 28 February are two days (in UTC both are 28 February).
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    march = ("march", datetime.datetime(2021, 3, 1, 1, 0, tzinfo=plus_two))
    february = ("february", datetime.datetime(2021, 2, 28, 23, 30, tzinfo=plus_two))
    assert select([march, february], {"keep_daily": 2}) == {"march": "keep_daily", "february": "keep_daily"}
    # Times in other zones are ordered by their instant, each still read in its own fields: 22:59 UTC on
    # 28 February comes between the two (00:59 on 1 March at +02:00) and is a backup of 28 February, the
    # newest of that day, so it is the one kept for that day.
    utc = ("utc", datetime.datetime(2021, 2, 28, 22, 59, tzinfo=datetime.timezone.utc))
    assert select([march, february, utc], {"keep_daily": 2}) == {"march": "keep_daily", "utc": "keep_daily",
                                                                 "february": None}
    assert select([march, february, utc], {"keep_last": 2}) == {"march": "keep_last", "utc": "keep_last",
                                                                "february": None}


# ---- 60 days of daily and hourly backups ---------------------------------------------------------------------

SIXTY_DAYS_POLICY = {"keep_last": 2, "keep_hourly": 6, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 2}


def _sixty_days():
    # a daily backup at 01:00 from 2024-01-11 to 2024-03-10 (60 days), and hourly ones at HH:30 for the
    # last 36 hours, 2024-03-09 12:30 to 2024-03-10 23:30
    points = _daily(datetime.date(2024, 1, 11), datetime.date(2024, 3, 10), hour=1)
    start = _at("2024-03-09 12:30")
    points += [((start + datetime.timedelta(hours=h)).strftime("%Y-%m-%d %H:%M"), start + datetime.timedelta(hours=h))
               for h in range(36)]
    assert len(points) == 96
    return points


def test_sixty_days_of_daily_and_hourly_backups():
    points = _sixty_days()
    result = select(points, SIXTY_DAYS_POLICY)
    assert result == _reference(points, SIXTY_DAYS_POLICY)
    # By hand: 2024-03-10 is the Sunday of ISO week 10.
    assert _kept(result) == {
        # keep_last: the 2 newest
        "2024-03-10 23:30": "keep_last", "2024-03-10 22:30": "keep_last",
        # keep_hourly: the next 6 hours
        "2024-03-10 21:30": "keep_hourly", "2024-03-10 20:30": "keep_hourly", "2024-03-10 19:30": "keep_hourly",
        "2024-03-10 18:30": "keep_hourly", "2024-03-10 17:30": "keep_hourly", "2024-03-10 16:30": "keep_hourly",
        # keep_daily: 03-10 is covered; the latest of each of the 7 days before
        "2024-03-09 23:30": "keep_daily", "2024-03-08 01:00": "keep_daily", "2024-03-07 01:00": "keep_daily",
        "2024-03-06 01:00": "keep_daily", "2024-03-05 01:00": "keep_daily", "2024-03-04 01:00": "keep_daily",
        "2024-03-03 01:00": "keep_daily",
        # keep_weekly: weeks 10 and 9 (03-03 is its Sunday) are covered; the Sundays of weeks 8 to 5
        "2024-02-25 01:00": "keep_weekly", "2024-02-18 01:00": "keep_weekly", "2024-02-11 01:00": "keep_weekly",
        "2024-02-04 01:00": "keep_weekly",
        # keep_monthly: March and February are covered. 01-29 to 01-31 are in week 5, whose latest (02-04)
        # keep_weekly kept, so it removed them: an option skips what an earlier one decided, kept or removed.
        # January's latest backup still to be decided is 01-28 (keep_weekly stopped at week 4); no older month.
        "2024-01-28 01:00": "keep_monthly",
    }


@pytest.mark.parametrize("seed", range(25))
def test_select_matches_the_reference_on_random_backups(seed):
    rng = random.Random(seed)
    start = _at("2019-11-01 00:00")
    # backups over about three years, dense in places, some at the same minute
    minutes = [rng.choice([rng.randrange(3 * 365 * 24 * 60), rng.randrange(60 * 24 * 3)]) for dummy in range(rng.randrange(1, 300))]
    points = [(index, start + datetime.timedelta(minutes=minute)) for index, minute in enumerate(minutes)]
    policy = {rule: rng.choice([None, 0, 1, 2, 3, 5, 12]) for rule in RULES if rng.random() < 0.7}
    result = select(points, policy)
    assert result == _reference(points, policy)
    kept = list(_kept(result).values())
    assert all(kept.count(rule) <= (policy.get(rule) or 0) for rule in RULES) or policy_is_empty(policy)


# ---- policies ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, expected", [
    pytest.param(None, NONE, id="none"),
    pytest.param({}, NONE, id="empty"),
    pytest.param({"keep_last": 3}, dict(NONE, keep_last=3), id="missing-keys"),
    pytest.param({"keep_last": None, "keep_daily": 7}, dict(NONE, keep_daily=7), id="none-values"),
    pytest.param({"keep_last": "3", "keep_daily": " 13 ", "keep_yearly": "+9"},
                 dict(NONE, keep_last=3, keep_daily=13, keep_yearly=9), id="ints-as-strings"),
    pytest.param(dict.fromkeys(RULES, 1), dict.fromkeys(RULES, 1), id="all-six"),
])
def test_normalize_policy(policy, expected):
    assert normalize_policy(policy) == expected
    assert list(normalize_policy(policy)) == list(RULES)


@pytest.mark.parametrize("policy, words", [
    pytest.param({"keep_daily": -1}, ["keep_daily", "-1"], id="negative"),
    pytest.param({"keep_last": "-2"}, ["keep_last", "'-2'"], id="negative-string"),
    pytest.param({"keep_weekly": "three"}, ["keep_weekly", "'three'"], id="word"),
    pytest.param({"keep_monthly": "2.5"}, ["keep_monthly", "'2.5'"], id="decimal-string"),
    pytest.param({"keep_monthly": 2.5}, ["keep_monthly", "2.5"], id="float"),
    pytest.param({"keep_hourly": ""}, ["keep_hourly", "''"], id="empty-string"),
    pytest.param({"keep_yearly": True}, ["keep_yearly", "True"], id="bool"),
    pytest.param({"keep_daily": [7]}, ["keep_daily", "[7]"], id="list"),
    pytest.param({"keep-last": 3}, ["'keep-last'", "3", "keep_last"], id="unknown-hyphenated"),
    pytest.param({"keep_minutely": 1}, ["'keep_minutely'", "1"], id="unknown"),
    pytest.param("keep_last=3", ["keep_last=3"], id="not-a-dict"),
])
def test_normalize_policy_errors_name_the_option_and_value(policy, words):
    with pytest.raises(RetentionError) as caught:
        normalize_policy(policy)
    assert isinstance(caught.value, ValueError)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    # every entry point checks the policy the same way
    for call in (policy_is_empty, describe, lambda p: select([], p)):
        with pytest.raises(RetentionError):
            call(policy)


@pytest.mark.parametrize("policy, empty", [
    (None, True), ({}, True), (NONE, True), ({"keep_last": None, "keep_daily": "0"}, True),
    ({"keep_yearly": 1}, False), ({"keep_last": "2"}, False),
])
def test_policy_is_empty(policy, empty):
    assert policy_is_empty(policy) is empty


@pytest.mark.parametrize("policy, text", [
    # the example option string of vzdump's docs, "vzdump 777 --prune-backups keep-last=3,keep-daily=13,keep-yearly=9"
    # (https://pve.proxmox.com/pve-docs/chapter-vzdump.html#vzdump_retention)
    ({"keep_yearly": 9, "keep_daily": 13, "keep_last": 3}, "keep_last=3 keep_daily=13 keep_yearly=9"),
    ({"keep_last": "3", "keep_daily": 7, "keep_hourly": None}, "keep_last=3 keep_daily=7"),
    (PVE_EXAMPLE, "keep_last=3 keep_daily=13 keep_weekly=8 keep_monthly=11 keep_yearly=9"),
    ({}, "keep everything"),
    (NONE, "keep everything"),
])
def test_describe(policy, text):
    assert describe(policy) == text


# ---- bad lists of backups ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("points, words", [
    pytest.param([("a", _at("2024-05-10 20:00")), ("a", _at("2024-05-09 20:00"))], ["'a'", "twice"], id="duplicate-key"),
    pytest.param([("a", datetime.date(2024, 5, 10))], ["'a'", "datetime"], id="date-not-datetime"),
    pytest.param([("a", "2024-05-10 20:00")], ["'a'", "datetime"], id="string-time"),
    pytest.param([("a", _at("2024-05-10 20:00")),
                  ("b", datetime.datetime(2024, 5, 9, 20, 0, tzinfo=datetime.timezone.utc))], ["naive and aware"],
                 id="naive-and-aware"),
])
def test_select_rejects_bad_backups(points, words):
    with pytest.raises(RetentionError) as caught:
        select(points, {"keep_last": 1})
    assert all(word in str(caught.value) for word in words), str(caught.value)
