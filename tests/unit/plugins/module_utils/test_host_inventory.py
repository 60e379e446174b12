# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The parts of qmp_host_info that need no QEMU: the vm role's files, names, QEMU's answers shaped, sockets found."""

from __future__ import annotations

import json
import os
import socket

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils import host_inventory as hi
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPConnectError, QMPGreetingError
from ansible_collections.qemu.qmp.plugins.module_utils.vm_process import process_started


def role_file(name="vm1", instance="", run="/run/qemu-qmp", **extra):
    """A NAME.json as the vm role writes it."""
    definition = {"name": name, "instance": instance, "run_dir": run, "qmp_socket": "%s/%s%s.qmp" % (run, name, instance),
                  "extra_qmp_socket": "", "supervisor": "daemon", "memory": 256}
    saved = {"pid": 4242, "started": "123456", "command_line": ["qemu-system-x86_64", "-name", name],
             "definition": definition}
    saved.update(extra)
    return json.dumps(saved)


def test_a_file_of_the_role_is_a_vm():
    vm = hi.vm_from_definition_file("/run/qemu-qmp/vm1.json", role_file())
    assert vm == {"name": "vm1", "instance": "", "qmp_socket": "/run/qemu-qmp/vm1.qmp", "extra_qmp_socket": "",
                  "run_dir": "/run/qemu-qmp", "definition_file": "/run/qemu-qmp/vm1.json", "pid": 4242,
                  "started": "123456", "definition": json.loads(role_file())["definition"]}


def test_a_migration_destination_is_listed_with_its_instance():
    vm = hi.vm_from_definition_file("/run/q/vm1.incoming.json", role_file(instance=".incoming", run="/run/q"))
    assert (vm["name"], vm["instance"], vm["qmp_socket"]) == ("vm1", ".incoming", "/run/q/vm1.incoming.qmp")


def test_the_file_name_decides_the_instance():
    # adopt renames NAME.incoming.json to NAME.json and may leave the instance in the definition.
    vm = hi.vm_from_definition_file("/run/q/vm1.json", role_file(instance=".incoming", run="/run/q"))
    assert (vm["name"], vm["instance"]) == ("vm1", "")


@pytest.mark.parametrize("stem, name, instance, expected", [
    ("vm1", "vm1", "", ("vm1", "")),
    ("vm1.incoming", "vm1", ".incoming", ("vm1", ".incoming")),
    ("vm1.incoming", None, ".incoming", ("vm1", ".incoming")),
    ("vm1.incoming", None, None, ("vm1.incoming", "")),
    ("vm1", None, ".incoming", ("vm1", "")),
    ("copied", "vm1", ".x", ("vm1", ".x")),
    (".incoming", None, ".incoming", (".incoming", "")),
])
def test_name_and_instance_from_the_file_name(stem, name, instance, expected):
    assert hi.split_stem(stem, name, instance) == expected


def test_a_definition_without_sockets_gets_the_role_default():
    text = json.dumps({"command_line": [], "definition": {}, "pid": True})
    vm = hi.vm_from_definition_file("/r/vm2.json", text)
    assert (vm["name"], vm["qmp_socket"], vm["pid"], vm["started"]) == ("vm2", "/r/vm2.qmp", None, None)


@pytest.mark.parametrize("text", [
    "", "not json", "[]", "{}", json.dumps({"definition": "x", "command_line": []}),
    json.dumps({"definition": {}}), json.dumps({"command_line": ["q"]}),
    json.dumps({"vm": "vm1", "moved_to": "hv2"}),
])
def test_other_json_files_are_no_vm(text):
    assert hi.vm_from_definition_file("/r/x.json", text) is None


@pytest.mark.parametrize("path, name", [
    ("/s/vm1.qmp", "vm1"), ("/s/vm.1.qmp", "vm.1"), ("/s/.qmp", ".qmp"), ("/s/sock", "sock"),
])
def test_an_unmanaged_socket_is_named_by_its_file(path, name):
    assert hi.socket_name(path) == name


BLOCK = [
    {"device": "drv1", "qdev": "", "inserted": {
        "node-name": "#block173", "drv": "raw", "file": "/img/a.raw",
        "image": {"virtual-size": 1048576, "filename": "/img/a.raw", "format": "raw"}}},
    {"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend", "inserted": {
        "node-name": "disk0", "drv": "qcow2", "file": "/img/d.qcow2",
        "image": {"virtual-size": 67108864, "filename": "/img/d.qcow2", "format": "qcow2"},
        "dirty-bitmaps": [{"name": "b", "recording": True, "persistent": True, "busy": False, "granularity": 65536,
                           "count": 0},
                          {"recording": True, "busy": True, "granularity": 65536, "count": 7},
                          {"name": "a", "status": "frozen", "granularity": 512, "count": 3}]}},
    {"device": "", "qdev": "cd0", "removable": True, "tray_open": False},
    {"device": "", "qdev": "/machine/peripheral-anon/device[3]/virtio-backend", "inserted": {
        "node-name": "d1-thr", "drv": "throttle", "file": "json:{\"driver\": \"throttle\"}",
        "image": {"format": "throttle", "filename": "json:{}", "virtual-size": 2097152,
                  "backing-image": {"format": "qcow2", "filename": "/img/e.qcow2", "virtual-size": 2097152}}}},
]
NODES = [
    {"node-name": "d1-thr", "drv": "throttle", "file": "json:{}", "image": {"format": "throttle"}},
    {"node-name": "d1-file", "drv": "file", "file": "/img/e.qcow2", "image": {"filename": "/img/e.qcow2"}},
    {"node-name": "d1", "drv": "qcow2", "file": "/img/e.qcow2",
     "image": {"filename": "/img/e.qcow2", "format": "qcow2", "virtual-size": 2097152},
     "dirty-bitmaps": [{"name": "x", "recording": False, "persistent": False, "busy": False, "granularity": 65536,
                        "count": 65536}]},
]


def test_disks_are_the_format_nodes_of_the_inserted_drives():
    assert hi.needs_named_nodes(BLOCK) and not hi.needs_named_nodes(BLOCK[:3])
    disks = hi.disks_from(BLOCK, NODES)
    assert disks == [
        {"device": "drv1", "node_name": "#block173", "file": "/img/a.raw", "format": "raw", "virtual_size": 1048576,
         "bitmaps": []},
        {"device": "vd0", "node_name": "disk0", "file": "/img/d.qcow2", "format": "qcow2", "virtual_size": 67108864,
         "bitmaps": [
             # QEMU before 4.0 gave a status only.
             {"name": "a", "count": 3, "granularity": 512, "recording": False, "busy": True, "persistent": None,
              "inconsistent": False},
             {"name": "b", "count": 0, "granularity": 65536, "recording": True, "busy": False, "persistent": True,
              "inconsistent": False}]},
        {"device": "/machine/peripheral-anon/device[3]/virtio-backend", "node_name": "d1", "file": "/img/e.qcow2",
         "format": "qcow2", "virtual_size": 2097152, "bitmaps": [
             {"name": "x", "count": 65536, "granularity": 65536, "recording": False, "busy": False,
              "persistent": False, "inconsistent": False}]},
    ]


def test_a_filter_whose_format_node_is_not_found_is_shown_as_it_is():
    disk = hi.disks_from(BLOCK[3:], nodes=[])[0]
    assert (disk["node_name"], disk["format"], disk["virtual_size"]) == ("d1-thr", "throttle", 2097152)


def test_jobs_and_version():
    assert hi.jobs_from([{"id": "j", "type": "backup", "status": "running", "current-progress": 1}]) == [
        {"id": "j", "type": "backup", "status": "running"}]
    greeting = {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": " Debian 1:7.2 "}}
    assert hi.version_of(greeting) == ("7.2.22", "Debian 1:7.2")
    assert hi.version_of({}) == (None, None)


@pytest.mark.parametrize("exc, state, text", [
    (QMPConnectError("x", "/s.qmp", "busy"), "busy",
     "/s.qmp accepts connections but sends no QMP greeting within 2 s: another client holds it"),
    (QMPConnectError("x", "/s.qmp", "missing"), "dead", "/s.qmp does not exist: no QEMU runs there"),
    (QMPConnectError("x", "/s.qmp", "refused"), "dead",
     "/s.qmp refuses connections: no QEMU listens there (it exited)"),
    (QMPConnectError("x", "/s.qmp", "not_socket"), "error", "/s.qmp is not a socket"),
    (QMPConnectError("x", "/s.qmp", "permission"), "error", "/s.qmp cannot be opened: permission denied"),
    (QMPGreetingError("/s.qmp is not a QMP socket: it sent 'hello'"), "error",
     "/s.qmp is not a QMP socket: it sent 'hello'"),
])
def test_why_a_socket_does_not_answer(exc, state, text):
    assert hi.not_answering(exc, "/s.qmp", 2.0) == (state, text)


def test_commands_are_counted_per_socket():
    sent = [[("query-status", None), ("query-block", None)], [("query-status", None)],
            [("query-named-block-nodes", {"flat": True})], []]
    assert hi.count_commands(sent) == [{"execute": "query-status", "repeated": 2}, {"execute": "query-block"},
                                       {"execute": "query-named-block-nodes", "arguments": {"flat": True}}]


def write(path, text):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def test_run_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    me, started = os.getpid(), process_started(os.getpid())
    write(run / "alive.json", role_file("alive", run=str(run), pid=me, started=started))
    write(run / "reused.json", role_file("reused", run=str(run), pid=me, started="1"))
    write(run / "pidfile.json", role_file("pidfile", run=str(run), pid=None, started=None))
    write(run / "pidfile.pid", "%d\n" % me)
    write(run / "notes.json", "{}")
    write(run / "alive.moved", "{}")
    (run / "folder.json").mkdir()
    warnings = []
    found = hi.managed_vms([str(run), str(run) + "/", str(tmp_path / "missing"), write(tmp_path / "file", "")],
                           warnings)
    assert [(vm["name"], vm["pid"]) for vm in found] == [("alive", me), ("pidfile", me), ("reused", None)]
    assert warnings == ["run_dirs folder %s is not a folder: it is skipped" % (tmp_path / "file")]


@pytest.fixture(name="listener")
def fixture_listener():
    """listen(path): a unix socket that accepts connections and never greets; closed after the test."""
    opened = []

    def listen(path):
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.listen(4)
        opened.append(sock)
        return path

    yield listen
    for sock in opened:
        sock.close()


def test_sockets_found_in_socket_folders(sock_dir, listener):
    listener(os.path.join(sock_dir, "a.qmp"))
    known = listener(os.path.join(sock_dir, "b.qmp"))
    listener(os.path.join(sock_dir, "c.sock"))
    write(os.path.join(sock_dir, "d.qmp"), "not a socket")
    os.mkdir(os.path.join(sock_dir, "sub"))
    listener(os.path.join(sock_dir, "sub", "e.qmp"))
    found = hi.unmanaged_sockets([sock_dir, sock_dir], {os.path.realpath(known)}, [])
    assert found == [os.path.join(sock_dir, "a.qmp")]


def test_a_host_without_qemu(sock_dir, listener):
    """A socket nobody listens on is dead, one that never greets is busy; another socket of a managed VM's
    process is not listed again; nothing fails."""
    run = os.path.join(sock_dir, "run")
    os.mkdir(run)
    me = os.getpid()
    write(os.path.join(run, "vm1.json"), role_file("vm1", run=run, pid=me, started=process_started(me)))
    listener(os.path.join(run, "vm1.qmp"))
    write(os.path.join(run, "gone.json"), role_file("gone", run=run))
    listener(os.path.join(sock_dir, "other.qmp"))  # listened on by vm1's process: vm1's own socket
    found = hi.host_inventory(run_dirs=[run], socket_dirs=[sock_dir, run], backup_dir="", timeout=0.2)
    assert found["warnings"] == [] and found["qmp_commands"] == []
    gone, vm1 = found["vms"]
    assert (gone["name"], gone["state"], gone["pid"], gone["managed"]) == ("gone", "dead", None, True)
    assert (vm1["name"], vm1["state"], vm1["pid"]) == ("vm1", "busy", me)
    assert vm1["state_msg"].endswith("within 0.2 s: another client holds it")
    assert (vm1["last_backup"], vm1["backups"], vm1["backup_msg"]) == (None, 0, "")


def test_backups_that_cannot_be_read(tmp_path):
    assert hi.backup_summary(str(tmp_path), "vm1") == {"last_backup": None, "backups": 0, "backup_msg": ""}
    write(tmp_path / "vm2", "a file where the folder should be")
    summary = hi.backup_summary(str(tmp_path), "vm2")
    assert summary["last_backup"] is None and "cannot read the backup folder" in summary["backup_msg"]
