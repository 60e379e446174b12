# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Live restore on stock QEMU: a VM runs from its backup at once, and its data is copied while it runs.

Each disk's final image is first a new qcow2 overlay whose backing file is the backup point's image (by its
absolute path), so it holds nothing yet and is created in an instant, whatever the disk's size. The VM
starts on these overlays: it reads from the backup chain, which QEMU opens read-only, and writes into the
overlays. Then `block-stream` copies into each overlay what it still reads from the chain, and drops the
backing file: the VM depends on its final images alone. A copy cancelled or failed leaves the VM running on
the chain; running the copy again resumes it (what was copied is not copied again).

A marker in the chain's folder (`.in-use-VM.json`) names the overlays: while one of them is still backed by
the chain, no prune touches the chain.
"""

from __future__ import annotations

import json
import os

from ansible_collections.qemu.qmp.plugins.module_utils.backup_catalog import FILE_MODE
from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import write_json

QCOW2_MAGIC = b"QFI\xfb"
MARKER_PREFIX = ".in-use-"
JOB_PREFIX = "qemu-qmp-restore-"


def qcow2_backing(path):
    """The backing file name written in a qcow2 image's header: "" when it has none, None when the file is not
    a qcow2 image. Read from the file itself, so an image a running QEMU holds is read too."""
    with open(path, "rb") as handle:
        header = handle.read(20)
        if len(header) < 20 or header[:4] != QCOW2_MAGIC:
            return None
        offset, size = int.from_bytes(header[8:16], "big"), int.from_bytes(header[16:20], "big")
        if not offset:
            return ""
        handle.seek(offset)
        return handle.read(size).decode("utf-8", "replace")


def marker_path(chain_dir, name):
    return os.path.join(chain_dir, MARKER_PREFIX + name + ".json")


def read_marker(path):
    try:
        with open(path, encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(path, marker):
    write_json(path, marker, durable=True, mode=FILE_MODE, indent=1)


def reads_chain(marker, chain_dir):
    """Whether one of the marker's overlays is still backed by an image of the chain."""
    if marker.get("state") == "copied":
        return False
    for output in (marker.get("outputs") or {}).values():
        try:
            backing = qcow2_backing(output)
        except OSError:
            continue
        if backing and os.path.realpath(backing).startswith(os.path.realpath(chain_dir) + os.sep):
            return True
    return False


def chain_of_backing(root, backing):
    """(chain id, backup folder name) of an image path under the VM's backup folder `root`, or None."""
    relative = os.path.relpath(os.path.realpath(backing), os.path.realpath(root))
    parts = relative.split(os.sep)
    if len(parts) != 3 or parts[0] == "..":
        return None
    return parts[0], parts[1]


def create_overlay(tool, qemu_img, output, image, virtual_size):
    """A new qcow2 image at `output`, backed by the backup image `image` by its absolute path: it appears under
    its name only once created (a temporary name, then a rename)."""
    folder = os.path.dirname(os.path.abspath(output))
    tmp = os.path.join(folder, ".%s.live-restore.tmp" % os.path.basename(output))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    tool.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", os.path.abspath(image), "-F", "qcow2", tmp,
              str(virtual_size)], "creating the live-restore image %s on %s" % (output, image))
    try:
        os.chmod(tmp, FILE_MODE)
        os.rename(tmp, output)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def streaming_nodes(nodes, root):
    """{node name: backing file} of the VM's format nodes still backed by an image under `root`."""
    found = {}
    for node in nodes:
        backing = node.get("backing_file") or ""
        name = node.get("node-name") or ""
        # Nodes QEMU named itself (#block...) are the backing images: the VM's disks are the named ones.
        if name and not name.startswith("#") and backing and chain_of_backing(root, backing) is not None:
            found[name] = backing
    return found
