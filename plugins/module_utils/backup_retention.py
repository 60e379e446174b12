# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which backups a retention policy keeps, with the prune rules of Proxmox Backup Server.

The options keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly and
keep_yearly are applied in that order, newest backup first. Each keeps the
latest backup of each of its last N periods that hold a backup (keep_last: of
the last N backups); periods without a backup do not count. An option leaves
alone what earlier options decided, and periods in which they already kept a
backup, so each one only reaches further back. When no option is set,
everything is kept.

Periods are read from each datetime's own fields (PBS uses the host's local
time): callers convert to the time zone they mean before calling.
"""

from __future__ import annotations

import datetime
import re

RULES = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")

# What select() answers for every backup when no option is set.
KEEP_ALL = "all"

_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")

# The period of a backup, per option, from its position in the newest-first
# list and its time. keep_last's period is the backup itself; weeks are ISO
# weeks (they start on Monday, and 2021-01-03 is in week 53 of 2020).
_PERIOD = {
    "keep_last": lambda position, _moment: position,
    "keep_hourly": lambda _position, moment: (moment.year, moment.month, moment.day, moment.hour),
    "keep_daily": lambda _position, moment: (moment.year, moment.month, moment.day),
    "keep_weekly": lambda _position, moment: tuple(moment.isocalendar())[:2],
    "keep_monthly": lambda _position, moment: (moment.year, moment.month),
    "keep_yearly": lambda _position, moment: moment.year,
}


class RetentionError(ValueError):
    """A policy or a list of backups select() cannot work with; the message names the culprit."""


def _count(rule, value):
    """The number of periods `rule` keeps: 0 for None, ints as they are, whole numbers in strings."""
    if value is None:
        return 0
    # bool is an int to Python, but `keep_daily: true` is a mistake, not a 1
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise RetentionError("%s must be a whole number, not %r" % (rule, value))
    if number < 0:
        raise RetentionError("%s must be 0 or more, not %r" % (rule, value))
    return number


def normalize_policy(policy):
    """All six RULES to ints >= 0 from a dict that may lack some, hold None, or hold numbers as strings."""
    if policy is None:
        policy = {}
    if not isinstance(policy, dict):
        raise RetentionError("a retention policy is a dict of %s, not %r" % (", ".join(RULES), policy))
    for name, value in policy.items():
        if name not in RULES:
            raise RetentionError("unknown retention option %r (set to %r): the options are %s"
                                 % (name, value, ", ".join(RULES)))
    return {rule: _count(rule, policy.get(rule)) for rule in RULES}


def policy_is_empty(policy):
    """True when no option keeps anything: the policy keeps every backup."""
    return not any(normalize_policy(policy).values())


def describe(policy):
    """A short human form of the policy: "keep_last=3 keep_daily=7", or "keep everything"."""
    counts = normalize_policy(policy)
    return " ".join("%s=%d" % (rule, counts[rule]) for rule in RULES if counts[rule]) or "keep everything"


def _newest_first(points):
    """The (key, moment) points, newest first; at equal moments the larger key counts as newer."""
    backups = []
    keys = set()
    for key, moment in points:
        if not isinstance(moment, datetime.datetime):
            raise RetentionError("backup %r: its time must be a datetime, not %r" % (key, moment))
        if key in keys:
            raise RetentionError("backup %r is listed twice" % (key,))
        keys.add(key)
        backups.append((key, moment))
    try:
        backups.sort(key=lambda point: (point[1], point[0]), reverse=True)
    except TypeError as exc:
        raise RetentionError("the backups cannot be put in order (naive and aware times mixed, or keys that "
                             "cannot be compared at equal times): %s" % exc) from exc
    return backups


def _apply(rule, count, backups, marks):
    """Mark, in `marks` (position -> rule, or None to remove), what `rule` keeps and removes."""
    period_of = _PERIOD[rule]
    # Periods in which an earlier option already kept a backup are covered: this one skips them, so
    # that keep_last=1 keep_daily=2 keeps two more days, not the other backups of the newest day.
    covered = {period_of(position, moment) for position, (dummy, moment) in enumerate(backups) if marks.get(position)}
    kept = set()
    for position, (dummy, moment) in enumerate(backups):
        if position in marks:
            continue  # decided by an earlier option
        period = period_of(position, moment)
        if period in covered:
            continue
        if period in kept:
            marks[position] = None  # an older backup of a period kept by this option: only the latest is kept
        elif len(kept) < count:
            kept.add(period)
            marks[position] = rule
        else:
            break  # N periods kept: older backups are left to the next options


def select(points, policy):
    """Which backups a policy keeps: {key: the rule that keeps it, or None to remove it}.

    `points` is an iterable of (key, moment): a hashable id and a datetime,
    naive or aware, in any order. With an empty policy every key maps to "all".
    """
    counts = normalize_policy(policy)
    backups = _newest_first(points)
    if not any(counts.values()):
        return {key: KEEP_ALL for key, dummy in backups}
    marks = {}
    for rule in RULES:
        if counts[rule]:
            _apply(rule, counts[rule], backups, marks)
    # a backup that no option marked is removed, like one an option marked for removal
    return {key: marks.get(position) for position, (key, dummy) in enumerate(backups)}
