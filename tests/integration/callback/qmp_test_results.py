# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test-only callback: writes each task result, and QEMU's state right after it, as JSON lines.

QMP_TEST_RESULTS       file to append to (one JSON object per task result)
QMP_TEST_PROBE_SOCKET  a second QMP socket of the QEMU under test (optional)
QMP_TEST_PROBE         JSON list of [command, arguments] queries to run after each task
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: qmp_test_results
type: aggregate
short_description: Record task results and QEMU's state after each task (tests only)
description:
  - Used by the collection's integration tests.
requirements: []
"""

import json
import os

from ansible.plugins.callback import CallbackBase

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient, QMPError


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "qmp_test_results"
    CALLBACK_NEEDS_ENABLED = True

    def _probe(self):
        path = os.environ.get("QMP_TEST_PROBE_SOCKET")
        queries = json.loads(os.environ.get("QMP_TEST_PROBE") or "[]")
        if not path or not queries:
            return None
        try:
            with QMPClient(socket_path=path, timeout=10) as client:
                return [client.execute(command, arguments) for command, arguments in queries]
        except QMPError as exc:
            return {"probe_error": str(exc)}

    def _record(self, result, status):
        path = os.environ.get("QMP_TEST_RESULTS")
        if not path:
            return
        entry = {
            "task": result._task.get_name(),
            "action": result._task.action,
            "status": status,
            "result": result._result,
            "probe": self._probe(),
        }
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")
