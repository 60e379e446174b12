# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every module's EXAMPLES run as written, against a real QEMU (only the socket path differs)."""

from __future__ import annotations

import ast
import json
import os

import yaml

from harness import ROOT, make_image

EXAMPLE_SOCKET = "/run/qemu/vm1.qmp"
# Modules whose examples end the VM run last.
ORDER = ["qmp_info", "qmp_command", "qmp_vm"]


def examples(module):
    with open(os.path.join(ROOT, "plugins", "modules", module + ".py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXAMPLES":
            return node.value.value
    raise AssertionError("%s has no EXAMPLES" % module)


def modules():
    found = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "plugins", "modules")) if f.endswith(".py"))
    return [m for m in ORDER if m in found] + [m for m in found if m not in ORDER]


def test_examples_run_as_written(vm_factory, workdir, ansible):
    disk = make_image(os.path.join(workdir, "disk0.qcow2"))
    vm = vm_factory(guest=True, paused=False, args=[
        "-blockdev", "driver=file,filename=%s,node-name=disk0-file" % disk,
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0-node",
        "-device", "virtio-blk-pci,drive=disk0-node,id=disk0",
    ])
    vm.wait_serial("guest: ready")
    plays = []
    for module in modules():
        text = examples(module)
        assert EXAMPLE_SOCKET in text, "%s's examples should use %s" % (module, EXAMPLE_SOCKET)
        tasks = yaml.safe_load(text.replace(EXAMPLE_SOCKET, vm.socket))
        plays.append({"name": "examples of " + module, "hosts": "localhost", "gather_facts": False,
                      "tasks": tasks})
    records, proc = ansible.playbook(json.dumps(plays), vm=vm)
    failed = [r for r in records if r["status"] == "failed"]
    assert not failed, json.dumps(failed, indent=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The last qmp_vm example quit QEMU (after the guest powered off).
    assert vm.wait_exit(20) == 0
