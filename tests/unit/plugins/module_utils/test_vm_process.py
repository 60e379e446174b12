# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The parts of the vm role's host-side step that need no QEMU: names, files, markers, process facts."""

from __future__ import annotations

import os
import subprocess

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils import vm_process
from ansible_collections.qemu.qmp.plugins.module_utils.vm_process import VMProcess, VMProcessError


def params(tmp_path, **overrides):
    base = {"name": "vm1", "instance": "", "run_dir": str(tmp_path / "run"), "state": "running",
            "definition": {"qmp_socket": str(tmp_path / "run" / "vm1.qmp"),
                           "serial": {"type": "file", "path": str(tmp_path / "run" / "vm1.serial.log")}},
            "supervisor": "daemon", "restart_on_change": False, "start_timeout": 5, "shutdown_timeout": 0,
            "moved_to": "", "start_moved": False, "adopt_instance": "", "this_host": "here"}
    base.update(overrides)
    return base


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", ".", "", "nul\x00"])
def test_a_name_that_is_not_plain_is_refused(tmp_path, name):
    with pytest.raises(VMProcessError, match="must be a plain name"):
        VMProcess(params(tmp_path, name=name))


def test_an_instance_with_a_slash_is_refused(tmp_path):
    with pytest.raises(VMProcessError, match="must be a plain suffix"):
        VMProcess(params(tmp_path, instance="/x"))


@pytest.mark.parametrize("serial", [{"type": "pipe", "path": "/x"}, {"type": "file"}, "file", {"path": 3}])
def test_a_serial_port_that_is_not_one_is_refused(tmp_path, serial):
    with pytest.raises(VMProcessError, match="vm_serial must be null"):
        VMProcess(params(tmp_path, definition={"serial": serial}))


def test_files_are_named_after_the_vm_and_its_instance(tmp_path):
    vm = VMProcess(params(tmp_path, instance=".incoming", definition={}))
    run = str(tmp_path / "run")
    assert vm.files() == {"run_dir": run, "qmp_socket": run + "/vm1.incoming.qmp", "extra_qmp_socket": None,
                          "pidfile": run + "/vm1.incoming.pid", "definition_file": run + "/vm1.incoming.json",
                          "serial_log": None, "moved_marker": run + "/vm1.moved"}


@pytest.mark.parametrize("content, moved", [
    (None, None),
    ('{"moved_to": "b", "moved_at": "2026-01-01T00:00:00Z"}', {"to": "b", "at": "2026-01-01T00:00:00Z"}),
    ("garbage", {"to": "an unknown host", "at": "an unknown time"}),
    ("{not json}", {"to": "an unknown host", "at": "an unknown time"}),
])
def test_a_moved_marker_that_cannot_be_read_still_says_the_vm_moved(tmp_path, content, moved):
    vm = VMProcess(params(tmp_path))
    if content is not None:
        os.makedirs(vm.run_dir)
        with open(vm.moved_marker, "w", encoding="utf-8") as handle:
            handle.write(content)
    assert vm.read_moved() == moved


def test_the_start_time_is_read_after_a_command_name_with_spaces_and_parentheses(tmp_path):
    program = tmp_path / "a) b (c"
    os.symlink("/bin/sleep", program)
    process = subprocess.Popen([str(program), "30"])
    try:
        with open("/proc/%d/stat" % os.getpid(), encoding="utf-8") as handle:
            mine = handle.read().rsplit(")", 1)[1].split()[19]
        started = vm_process.process_started(process.pid)
        assert started is not None and started.isdigit() and int(started) >= int(mine)
        assert "\x00" in vm_process.process_cmdline(process.pid) and not vm_process.process_gone(process.pid)
    finally:
        process.kill()
        process.wait()
    assert vm_process.process_gone(process.pid) and vm_process.process_started(process.pid) is None


def test_a_run_folder_anyone_can_change_is_refused_and_a_sticky_one_kept(tmp_path):
    vm = VMProcess(params(tmp_path))
    os.makedirs(vm.run_dir)
    os.chmod(vm.run_dir, 0o777)
    with pytest.raises(VMProcessError, match="writable by every user and has no sticky bit"):
        vm.make_run_dir()
    os.chmod(vm.run_dir, 0o1777)
    vm.make_run_dir()
    assert os.stat(vm.run_dir).st_mode & 0o7777 == 0o1777 and not vm.changed


def test_a_new_run_folder_is_private_and_check_mode_makes_none(tmp_path):
    checked = VMProcess(params(tmp_path), check_mode=True)
    checked.make_run_dir()
    assert checked.changed and not os.path.exists(checked.run_dir)
    made = VMProcess(params(tmp_path))
    made.make_run_dir()
    assert os.stat(made.run_dir).st_mode & 0o7777 == 0o750


def test_a_socket_nothing_listens_on_is_none_and_the_queries_are_logged(tmp_path):
    log = vm_process.CommandLog()
    assert vm_process.probe(str(tmp_path / "missing.qmp"), log, 5)["state"] == "none"
    assert log == []


def test_a_repeated_command_is_listed_once():
    class Client:
        address = "/run/vm1.qmp"

        def execute(self, command, arguments=None):
            return {}
    log = vm_process.CommandLog()
    for dummy in range(3):
        log.execute(Client(), "query-status")
    log.execute(Client(), "quit")
    assert log == [{"execute": "query-status", "socket": "/run/vm1.qmp", "repeated": 3},
                   {"execute": "quit", "socket": "/run/vm1.qmp"}]
