# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: json_lines
type: stdout
short_description: One line of JSON per task result, for programs that read Ansible's output
version_added: 0.1.0
description:
  - Prints each task result of each host as one line of JSON, C({"host", "status", "result"}), with C(status)
    one of V(ok), V(changed), V(failed), V(unreachable), V(skipped); nothing else goes to the standard output.
  - A result is shown as Ansible's other callbacks show it, without its internal keys, C(invocation), C(diff),
    warnings and exception; a C(no_log) task's result is censored.
  - The C(qemu.qmp.qmp) inventory plugin reads the discovery on every hypervisor through it
    (C(ansible -m qemu.qmp.qmp_host_info)). For an ad-hoc command, set C(ANSIBLE_LOAD_CALLBACK_PLUGINS=1) too.
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

import json

from ansible.module_utils.common.json import AnsibleJSONEncoder
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "qemu.qmp.json_lines"

    def _emit(self, result, status):
        # ansible-core 2.19 gives a TaskResult, newer ones a CallbackTaskResult: both name the host and the result.
        host = getattr(result, "host", None) or getattr(result, "_host")
        data = getattr(result, "result", None)
        if not isinstance(data, dict):
            data = getattr(result, "_result", {})
        if status == "ok" and data.get("changed"):
            status = "changed"
        # Ansible's own view of the result, as every callback shows it (internal keys, invocation, warnings out).
        shown = self._dump_results(data, serialize=False)
        line = json.dumps({"host": host.get_name(), "status": status, "result": shown}, cls=AnsibleJSONEncoder,
                          sort_keys=True)
        self._display.display(line, screen_only=True)

    def v2_runner_on_ok(self, result):
        self._emit(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._emit(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._emit(result, "unreachable")

    def v2_runner_on_skipped(self, result):
        self._emit(result, "skipped")
