# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_command against a real QEMU."""

from __future__ import annotations

from harness import changed_flags


def test_query_is_never_a_change(vm, ansible):
    records = ansible.four_ways("qmp_command", {"socket": vm.socket, "command": "query-status"}, vm=vm)
    assert changed_flags(records) == [False, False, False, False]
    assert [r["result"]["result"]["status"] for r in records] == ["prelaunch"] * 4


def test_command_runs_only_outside_check_mode(vm, ansible):
    args = {"socket": vm.socket, "command": "block-dirty-bitmap-add",
            "arguments": {"node": "null0", "name": "bm0"}}
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 1048576})
    result = ansible.run("qmp_command", args, check=True, vm=vm)
    assert result["changed"] is True and result["result"] is None
    assert result["qmp_commands"] == [{"execute": "query-qmp-schema"},
                                      {"execute": "block-dirty-bitmap-add", "arguments": args["arguments"]}]
    assert _bitmaps(vm) == []

    result = ansible.run("qmp_command", args, vm=vm)
    assert result["changed"] is True and result["result"] == {}
    assert _bitmaps(vm) == ["bm0"]

    # A raw command is not idempotent: QEMU's own error comes back.
    result = ansible.run("qmp_command", args, vm=vm)
    assert result["_status"] == "failed"
    assert result["qmp_error"]["class"] == "GenericError"
    assert "bm0" in result["qmp_error"]["desc"] and result["qmp_error"]["desc"] in result["msg"]


def test_events_are_returned(vm, ansible):
    result = ansible.run("qmp_command", {"socket": vm.socket, "command": "cont"}, vm=vm)
    assert "RESUME" in [e["event"] for e in result["events"]]
    assert vm.status() == "running"


def test_check_mode_reports_what_qemu_would_refuse(vm, ansible):
    args = {"socket": vm.socket, "command": "blockdev-backup",
            "arguments": {"device": "x", "target": "y", "sync": "sideways", "speed": "fast"}}
    result = ansible.run("qmp_command", args, check=True, vm=vm, validate=False)
    assert result["_status"] == "failed"
    assert "sync" in result["msg"] and "sideways" in result["msg"]
    assert any(e.startswith("blockdev-backup: speed:") for e in result["validation_errors"])
    # The real run gets QEMU's own refusal, not a traceback.
    result = ansible.run("qmp_command", args, vm=vm, validate=False)
    assert result["_status"] == "failed" and result["qmp_error"]["class"] == "GenericError"


def test_unknown_command(vm, ansible):
    result = ansible.run("qmp_command", {"socket": vm.socket, "command": "no-such-command"}, vm=vm,
                         validate=False)
    assert result["_status"] == "failed"
    assert result["qmp_error"]["class"] == "CommandNotFound"


def _bitmaps(vm):
    return [b["name"] for n in vm.qmp("query-named-block-nodes") for b in n.get("dirty-bitmaps", [])]


def test_check_mode_without_jsonschema_on_the_managed_host(vm, workdir, ansible):
    """The modules need only the standard library; check mode says when it cannot validate."""
    import os  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    bare = os.path.join(workdir, "bare-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True)
    python = os.path.join(bare, "bin", "python")
    probe = subprocess.run([python, "-c", "import jsonschema"], capture_output=True, check=False)
    assert probe.returncode != 0, "the bare interpreter must not have jsonschema"

    args = {"socket": vm.socket, "command": "stop"}
    result = ansible.run("qmp_command", args, check=True, vm=vm, interpreter=python)
    assert result["changed"] is True
    assert any("could not validate" in w and "jsonschema" in w for w in result["warnings"])
    assert vm.status() == "prelaunch"
    result = ansible.run("qmp_info", {"socket": vm.socket}, vm=vm, interpreter=python)
    assert result["status"] == "prelaunch" and result["features"]["query_jobs"] is True
    assert not result.get("warnings")
