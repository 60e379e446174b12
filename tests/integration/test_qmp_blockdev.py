# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_blockdev against a real QEMU."""

from __future__ import annotations

import json
import os
import subprocess

from harness import changed_flags, disk_args, make_image

MiB = 1024 * 1024
PROBE_NODES = [["query-named-block-nodes", None]]


def image_info(path):
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True,
                                     text=True, check=True).stdout)


def qcow2_node(vm, node_name, filename, **extra):
    options = {"driver": "qcow2", "file": {"driver": "file", "filename": filename}}
    options.update(extra.pop("options", {}))
    args = {"socket": vm.socket, "node_name": node_name, "options": options}
    args.update(extra)
    return args


def names(record):
    return sorted(n["node-name"] for n in record["probe"][0] if not n["node-name"].startswith("#"))


def test_create_through_qmp_then_absent(vm, workdir, ansible):
    target = os.path.join(workdir, "target0.qcow2")
    args = qcow2_node(vm, "target0", target, create={"size": "32M"})
    records = ansible.four_ways("qmp_blockdev", args, vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert [r["result"].get("created") for r in records] == [True, True, None, None]
    # Check mode neither created the file nor left its probe node behind.
    assert names(records[0]) == []
    assert names(records[1]) == ["target0"]
    assert [c["execute"] for c in records[0]["result"]["qmp_commands"]].count("blockdev-create") == 2
    node = vm.nodes()["target0"]
    assert (node["drv"], node["file"], node["ro"]) == ("qcow2", target, False)
    assert records[1]["result"]["node"]["node-name"] == "target0"
    info = image_info(target)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 32 * MiB)
    assert vm.jobs() == {}  # the creation jobs were dismissed

    records = ansible.four_ways("qmp_blockdev", {"socket": vm.socket, "node_name": "target0", "state": "absent"},
                                vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert names(records[0]) == ["target0"] and names(records[1]) == []
    assert os.path.exists(target)  # deleting a node never deletes its file


def test_backing_chain_and_existing_file(vm, workdir, ansible):
    base = os.path.join(workdir, "full.qcow2")
    inc = os.path.join(workdir, "inc1.qcow2")
    ansible.run("qmp_blockdev", qcow2_node(vm, "full", base, create={"size": "16M"}), vm=vm)
    args = qcow2_node(vm, "inc1", inc, options={"backing": "full"},
                      create={"size": "16M", "backing_file": base})
    records = ansible.four_ways("qmp_blockdev", args, vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    node = vm.nodes()["inc1"]
    assert node["backing_file_depth"] == 1 and node["backing_file"] == base
    assert image_info(inc)["backing-filename"] == base

    # An existing file is opened, never created again.
    ansible.run("qmp_blockdev", {"socket": vm.socket, "node_name": "inc1", "state": "absent"}, vm=vm)
    result = ansible.run("qmp_blockdev", args, vm=vm)
    assert result["changed"] is True and result["created"] is False
    assert "blockdev-create" not in [c["execute"] for c in result["qmp_commands"]]
    assert image_info(inc)["backing-filename"] == base


def test_other_options_fail_unless_recreate(vm, workdir, ansible):
    target = make_image(os.path.join(workdir, "t.qcow2"), "16M")
    ansible.run("qmp_blockdev", qcow2_node(vm, "t", target), vm=vm)
    wanted = qcow2_node(vm, "t", target, options={"read-only": True, "discard": "unmap"})
    result = ansible.run("qmp_blockdev", wanted, vm=vm)
    assert result["_status"] == "failed"
    assert "read-only is False, wanted True" in result["msg"] and "recreate=true" in result["msg"]
    assert result["differences"] == {"read-only": {"wanted": True, "qemu": False}}
    assert result["not_compared"] == ["discard"]
    assert vm.nodes()["t"]["ro"] is False

    records = ansible.four_ways("qmp_blockdev", dict(wanted, recreate=True), vm=vm, probe=PROBE_NODES)
    assert changed_flags(records) == [True, True, False, False]
    assert [next(n for n in r["probe"][0] if n["node-name"] == "t")["ro"] for r in records] == \
        [False, True, True, True]
    assert records[3]["result"]["not_compared"] == ["discard"]


def test_node_in_use(vm_factory, workdir, ansible):
    image = make_image(os.path.join(workdir, "disk0.qcow2"), "16M")
    vm = vm_factory(args=disk_args(image))
    result = ansible.run("qmp_blockdev", {"socket": vm.socket, "node_name": "disk0", "state": "absent"}, vm=vm)
    assert result["_status"] == "failed"
    assert result["msg"] == "cannot delete node disk0: it is in use by device /machine/peripheral/vdisk0/virtio-backend"
    assert "blockdev-del" not in [c["execute"] for c in result["qmp_commands"]]

    # A node used by a job, seen through the job's implicit filter node.
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "sink", "size": 16 * MiB})
    vm.qmp("blockdev-backup", {"job-id": "slow", "device": "disk0", "target": "sink", "sync": "full",
                               "speed": 1, "auto-dismiss": False})
    result = ansible.run("qmp_blockdev", {"socket": vm.socket, "node_name": "sink", "state": "absent"}, vm=vm)
    assert result["_status"] == "failed" and "in use by job slow" in result["msg"]
    result = ansible.run("qmp_blockdev", {"socket": vm.socket, "node_name": "sink", "recreate": True,
                                          "options": {"driver": "null-co", "read-only": True}}, vm=vm)
    assert result["_status"] == "failed" and result["msg"].startswith("cannot recreate node sink")
    assert "sink" in vm.nodes()


def test_missing_file_without_create(vm, workdir, ansible):
    missing = os.path.join(workdir, "missing.qcow2")
    result = ansible.run("qmp_blockdev", qcow2_node(vm, "m", missing), vm=vm)
    assert result["_status"] == "failed"
    assert missing in result["msg"] and "No such file or directory" in result["qmp_error"]["desc"]
    assert "m" not in vm.nodes()


def test_node_name_must_agree(vm, ansible):
    result = ansible.run("qmp_blockdev", {"socket": vm.socket, "node_name": "a",
                                          "options": {"driver": "null-co", "node-name": "b"}}, vm=vm)
    assert result["_status"] == "failed" and "differs from node_name" in result["msg"]
