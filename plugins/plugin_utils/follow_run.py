# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Follows a detached run on the managed host from the controller, printing its progress.

The action plugin of each engine module (qmp_backup_chain, qmp_migration). The module starts the run and returns at once when it takes longer than one
poll interval. This plugin then loops in Python (no task recursion, memory
that does not grow): every poll interval it runs one small Python command on
the host that touches the run's heartbeat and prints its status, shows the
progress line, and returns the run's own result when it is done.
"""

from __future__ import annotations

import json
import os
import shlex
import time

from ansible.errors import AnsibleConnectionFailure
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import POLL_SCRIPT

display = Display()


class FollowRunAction(ActionBase):
    """Runs the module, then follows its detached run until it ends."""

    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        # Ansible's workers run in sessions of their own: when ansible-playbook itself is killed, this
        # worker goes on. It must stop polling then, so the run on the host sees its controller gone.
        self.controller = os.getppid()
        first = self._execute_module(module_name=self._task.resolved_action or self._task.action,
                                     module_args=self._task.args, task_vars=task_vars)
        if first.get("failed") or not first.get("running"):
            result.update(first)
            return result
        run = first["run"]
        host = task_vars.get("inventory_hostname", "") if task_vars else ""
        self.show(host, first.get("line"))
        result.update(self.follow(host, run, float(first["poll_interval"]), float(first["controller_timeout"])))
        return result

    def show(self, host, line):
        if line:
            display.display("%s: %s" % (host, line))

    def poll(self, run):
        # -I -S: the poll needs no site-packages; it starts in a few milliseconds.
        command = "%s -I -S -c %s %s" % (shlex.quote(run["python"]), shlex.quote(POLL_SCRIPT), shlex.quote(run["dir"]))
        answer = self._low_level_execute_command(command, sudoable=True)
        if answer.get("rc") != 0:
            raise ValueError((answer.get("stderr") or answer.get("stdout") or "rc %s" % answer.get("rc")).strip())
        lines = [line for line in answer.get("stdout", "").splitlines() if line.startswith("{")]
        if not lines:
            raise ValueError("no status in %r" % answer.get("stdout", "")[-200:])
        return json.loads(lines[-1])

    def follow(self, host, run, interval, controller_timeout):
        result = self.follow_run(host, run, interval, controller_timeout)
        result.setdefault("qmp_commands", [])
        return result

    def follow_run(self, host, run, interval, controller_timeout):
        heard = time.monotonic()
        last_error = None
        while True:
            time.sleep(interval)
            if os.getppid() != self.controller:
                return {"failed": True, "run_ended": "controller_gone",
                        "msg": "ansible-playbook went away; the run in %s stops by itself and undoes what it did"
                        % run["dir"]}
            try:
                status = self.poll(run)
            except (AnsibleConnectionFailure, ValueError) as exc:
                last_error = exc
                if time.monotonic() - heard > controller_timeout:
                    return {"failed": True, "run_ended": "host_lost",
                            "msg": "lost the host for %ds while following the run in %s (%s); the run stops by itself "
                            "and undoes what it did, and the next run cleans up"
                            % (time.monotonic() - heard, run["dir"], last_error)}
                continue
            heard = time.monotonic()
            if status.get("state") == "done":
                return status.get("result") or {}
            if not status.get("alive"):
                return {"failed": True, "run_ended": "killed",
                        "msg": "the run on the host (%s) ended without a result during: %s. It was killed or crashed; "
                        "the next run cleans up after it" % (run["dir"], status.get("phase") or status.get("error") or "?")}
            self.show(host, status.get("line"))
