# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Helpers for backup tests: target images, reference copies made by QEMU, restores and comparisons."""

from __future__ import annotations

import json
import os
import subprocess

MiB = 1024 * 1024


def qemu_img(*args):
    return subprocess.run(["qemu-img"] + list(args), capture_output=True, text=True, check=False)


def create_target(path, size, backing=None):
    if os.path.exists(path):
        os.unlink(path)
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    result = qemu_img(*(args + [path, str(size)]))
    assert result.returncode == 0, result.stderr
    return path


def add_target(vm, node, path):
    """Open a target image in QEMU without its backing chain (the job only writes into it)."""
    vm.qmp("blockdev-add", {"driver": "qcow2", "node-name": node, "backing": None,
                            "file": {"driver": "file", "filename": path}})


def remove_node(vm, node):
    vm.qmp("blockdev-del", {"node-name": node})


def reference_copy(vm, node, path, size):
    """A copy of `node` as it is now, made by QEMU itself (a full backup job)."""
    create_target(path, size)
    ref = "ref-" + node
    add_target(vm, ref, path)
    vm.qmp("blockdev-backup", {"job-id": ref, "device": node, "target": ref, "sync": "full",
                               "auto-dismiss": False})
    vm.wait_job(ref, "concluded", timeout=120)
    job = vm.jobs()[ref]
    assert not job.get("error"), job
    vm.qmp("job-dismiss", {"id": ref})
    remove_node(vm, ref)
    return path


def restore(image, path):
    """Flatten a backup image and its backing chain into one standalone image."""
    result = qemu_img("convert", "-O", "qcow2", image, path)
    assert result.returncode == 0, result.stderr
    return path


def same_content(a, b):
    result = qemu_img("compare", "-q", a, b)
    return result.returncode == 0


def allocated_bytes(path):
    """Bytes of data the image itself holds (not its backing file)."""
    result = qemu_img("map", "--output=json", path)
    assert result.returncode == 0, result.stderr
    return sum(e["length"] for e in json.loads(result.stdout) if e.get("data") and e.get("depth", 0) == 0)


def image_info(path):
    result = qemu_img("info", "-U", "--output=json", path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def exists(path):
    return os.path.exists(path)
