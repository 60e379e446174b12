# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A fleet run's report (one row per VM) as a table people read, and as JUnit XML."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr, escape

from ansible_collections.qemu.qmp.plugins.module_utils.backup_host import human


def _cell(key, value):
    if value is None or value == "":
        return "-"
    if key.endswith("bytes") and isinstance(value, (int, float)):
        return human(value)
    if key.endswith("seconds") and isinstance(value, (int, float)):
        return "%.1f" % value
    return str(value)


def fleet_table(rows, columns):
    table = [[c.upper() for c in columns]] + [[_cell(c, (row or {}).get(c)) for c in columns] for row in rows or []]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in table]


def fleet_junit(rows, suite="qemu.qmp"):
    """JUnit XML: a test case per row (name: vm, class: host), failed when its result is not ok/changed/skipped."""
    rows = rows or []
    failures = [r for r in rows if r.get("result") not in ("ok", "changed", "unchanged", "skipped")]
    total = sum(float(r.get("seconds") or 0) for r in rows)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<testsuites><testsuite name=%s tests="%d" failures="%d" time="%.3f">'
             % (quoteattr(suite), len(rows), len(failures), total)]
    for row in rows:
        head = '<testcase name=%s classname=%s time="%.3f"' % (
            quoteattr(str(row.get("vm"))), quoteattr("%s.%s" % (suite, row.get("host"))), float(row.get("seconds") or 0))
        if row in failures:
            msg = str(row.get("msg") or row.get("result"))
            lines.append('%s><failure message=%s>%s</failure></testcase>' % (head, quoteattr(msg[:1000]), escape(msg)))
        elif row.get("result") == "skipped":
            lines.append('%s><skipped/></testcase>' % head)
        else:
            lines.append('%s/>' % head)
    lines.append("</testsuite></testsuites>")
    return "\n".join(lines) + "\n"
