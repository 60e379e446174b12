# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Screen output of the qemu.qmp demo (playbooks/demo): its story, step by step, on one screen."""

from __future__ import annotations

import time

from ansible import constants as C
from ansible.playbook.task_include import TaskInclude
from ansible.plugins.callback.default import CallbackModule as DefaultCallback

DOCUMENTATION = """
    name: qmp_demo
    type: stdout
    short_description: The qemu.qmp demo's steps, one line each, and a table of them at the end
    description:
      - Announces each step of the demo once (a block or task with the variable C(demo_step)), shows what the
        demo's debug tasks say and every failure in full (as the default callback does), and ends with one row
        per step with its seconds, the data it moved and its result.
      - The data a step moved is the fact C(demo_step_bytes) a task of the step sets, a text such as C(1.2 MiB written).
      - Results of tasks that succeed, changed or not, are not shown; their warnings are.
    extends_documentation_fragment:
      - default_callback
      - result_format_callback
"""

STEP_VAR = "demo_step"
BYTES_FACT = "demo_step_bytes"
DEBUG_ACTIONS = ("debug", "ansible.builtin.debug", "ansible.legacy.debug")


class CallbackModule(DefaultCallback):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "qmp_demo"

    def __init__(self):
        super().__init__()
        self._steps = []  # step names, in the playbook's order
        self._rows = {}  # step name -> {"seconds", "bytes", "result"}
        self._step = None
        self._step_started = None
        self._run_started = time.monotonic()

    # -- steps ----------------------------------------------------------------

    def _collect_steps(self, blocks):
        for item in blocks or []:
            name = (getattr(item, "vars", None) or {}).get(STEP_VAR)
            if name and str(name) not in self._steps:
                self._steps.append(str(name))
            for attr in ("block", "rescue", "always"):
                children = getattr(item, attr, None)
                if isinstance(children, list):
                    self._collect_steps(children)

    @staticmethod
    def _step_of(task):
        # The nearest `demo_step` up the task's parents: blocks, and the include_role task of a role's tasks.
        node = task
        while node is not None:
            name = (getattr(node, "vars", None) or {}).get(STEP_VAR)
            if name:
                return str(name)
            node = getattr(node, "_parent", None)
        return None

    def _enter(self, name):
        if name is None or name == self._step:
            return
        self._leave()
        if name not in self._steps:
            self._steps.append(name)
        self._rows.setdefault(name, {"seconds": 0.0, "bytes": "", "result": "ok"})
        self._step, self._step_started = name, time.monotonic()
        self._display.display("")
        self._display.display("[%d/%d] %s" % (self._steps.index(name) + 1, len(self._steps), name),
                              color=C.COLOR_HIGHLIGHT)

    def _leave(self):
        if self._step is not None:
            self._rows[self._step]["seconds"] += time.monotonic() - self._step_started
        self._step = None

    def _fail_step(self, task):
        name = self._step_of(task) or self._step
        if name in self._rows:
            self._rows[name]["result"] = "FAILED"

    # -- events ---------------------------------------------------------------

    def v2_playbook_on_play_start(self, play):
        self._play = play
        for section in ("pre_tasks", "tasks", "post_tasks"):
            self._collect_steps(getattr(play, section, None))
        self._display.display(play.get_name().strip())

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._enter(self._step_of(task))
        super().v2_playbook_on_task_start(task, is_conditional)

    def v2_playbook_on_include(self, included_file):
        pass  # the roles' inner files are theirs, not the demo's story

    def v2_runner_retry(self, result):
        pass  # waiting is part of a step; a failure in the end is shown

    def v2_playbook_on_no_hosts_remaining(self):
        pass  # the table says which step failed

    def v2_runner_on_ok(self, result):
        task = result.task
        self._handle_warnings_and_exception(result)
        if isinstance(task, TaskInclude):
            return
        moved = (result.result.get("ansible_facts") or {}).get(BYTES_FACT)
        if moved and self._step in self._rows:
            self._rows[self._step]["bytes"] = str(moved)
        if task.action in DEBUG_ACTIONS and "msg" in result.result:
            for line in self._lines(result.result["msg"]):
                self._display.display("    " + line)

    def v2_runner_item_on_ok(self, result):
        self._handle_warnings_and_exception(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if ignore_errors:
            # The roles ignore some failures on purpose (a QEMU that is gone already): not the demo's failure.
            return
        self._fail_step(result.task)
        super().v2_runner_on_failed(result, ignore_errors)

    def v2_runner_item_on_failed(self, result):
        self._fail_step(result.task)
        super().v2_runner_item_on_failed(result)

    def v2_runner_on_unreachable(self, result):
        self._fail_step(result.task)
        super().v2_runner_on_unreachable(result)

    def v2_playbook_on_stats(self, stats):
        self._leave()
        failed = any(stats.summarize(host)["failures"] or stats.summarize(host)["unreachable"]
                     for host in stats.processed)
        self._table(failed)

    # -- output ---------------------------------------------------------------

    @classmethod
    def _lines(cls, msg):
        if isinstance(msg, (list, tuple)):
            lines = []
            for item in msg:
                lines.extend(cls._lines(item))
            return lines
        return str(msg).splitlines() or [""]

    def _table(self, failed):
        rows = [(name, self._rows.get(name)) for name in self._steps]
        header = ("step", "seconds", "data", "result")
        cells = [("%d %s" % (number, name),
                  "%.1f" % row["seconds"] if row else "",
                  row["bytes"] if row else "",
                  row["result"] if row else "not run")
                 for number, (name, row) in enumerate(rows, 1)]
        total = ("total", "%.1f" % (time.monotonic() - self._run_started), "", "FAILED" if failed else "ok")
        widths = [max(len(line[column]) for line in [header, total] + cells) for column in range(4)]

        def render(line):
            return "  ".join((line[0].ljust(widths[0]), line[1].rjust(widths[1]), line[2].ljust(widths[2]),
                              line[3])).rstrip()

        rule = "  ".join("-" * width for width in widths)
        self._display.display("")
        self._display.display(render(header))
        self._display.display(rule)
        for line in cells:
            color = C.COLOR_ERROR if line[3] == "FAILED" else (C.COLOR_SKIP if line[3] == "not run" else None)
            self._display.display(render(line), color=color)
        self._display.display(rule)
        self._display.display(render(total), color=C.COLOR_ERROR if failed else C.COLOR_OK)
