#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_blockdev
short_description: Add or remove a named block node in a running QEMU
version_added: 0.1.0
description:
  - Makes a block node (an image file, a format on top of it, an NBD client, a filter, ...)
    present or absent in a running QEMU, as C(blockdev-add) and C(blockdev-del) do, and can
    create the image file first through QMP alone.
  - An existing node is compared with the options given, only on what QEMU reports back about a
    node (C(query-named-block-nodes)); QEMU fills in defaults for everything else, so a whole-object
    comparison would never match. Compared are V(driver) (QEMU's C(drv)), V(read-only) (C(ro)),
    V(detect-zeroes), V(filename), the file name that V(file) leads to, the node that V(backing)
    names (matched by its file name), and V(cache.direct) and V(cache.no-flush). Other options
    cannot be checked on an existing node; they are listed in RV(not_compared).
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  node_name:
    description:
      - The node's name (C(node-name)). It must start with a letter and have at most 31 characters
        (letters, digits, V(-), V(.), V(_)).
    type: str
    required: true
  state:
    description:
      - V(present) adds the node when QEMU has none of that name. An existing node with the same
        options is unchanged; one with other options fails, naming each difference, unless
        O(recreate) is set.
      - V(absent) deletes the node (C(blockdev-del)). A node in use by a device, a job or another
        node fails, naming who uses it. Only nodes added with C(blockdev-add) can be deleted.
    type: str
    choices: [present, absent]
    default: present
  options:
    description:
      - The C(blockdev-add) arguments exactly as QEMU takes them (V(driver), V(file), V(backing),
        V(read-only), ...); C(node-name) is filled in from O(node_name).
      - Required to add a node.
    type: dict
    default: {}
  create:
    description:
      - Create the image file first when it does not exist yet, through C(blockdev-create) jobs (a
        C(file) job, then one for the format), so a target can be made where QMP is the only way in.
        The module waits up to O(wait_timeout) seconds for each job.
      - Needs C(file) in O(options) to be a file definition (a dictionary with C(driver=file) and C(filename)), or
        C(driver=file) in O(options) with C(filename).
      - To tell whether the file exists, QEMU opens it read-only and unlocked for a moment through a
        probe node it removes at once (also in check mode).
      - An existing file is never touched.
    type: dict
    suboptions:
      size:
        description: Virtual size, in bytes or with a unit (V(10G), V(512M)).
        type: raw
        required: true
      backing_file:
        description: Backing file recorded in the new image (qcow2).
        type: str
      backing_fmt:
        description: Format of O(create.backing_file).
        type: str
        default: qcow2
      cluster_size:
        description: Cluster size in bytes or with a unit (qcow2).
        type: raw
      options:
        description: Further C(blockdev-create) options of the format, as QEMU takes them (for example V(lazy-refcounts)).
        type: dict
  recreate:
    description:
      - When an existing node has other options, delete it and add it again. Fails when the node is
        in use.
    type: bool
    default: false
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: Create a 1 GiB qcow2 backup target through QMP and open it as node target0
  qemu.qmp.qmp_blockdev:
    socket: /run/qemu/vm1.qmp
    node_name: target0
    options:
      driver: qcow2
      file:
        driver: file
        filename: /var/lib/backup/vm1-disk0.qcow2
    create:
      size: 1G

- name: An incremental target whose backing file is the previous backup, already open as target0
  qemu.qmp.qmp_blockdev:
    socket: /run/qemu/vm1.qmp
    node_name: target1
    options:
      driver: qcow2
      file:
        driver: file
        filename: /var/lib/backup/vm1-disk0.inc1.qcow2
      backing: target0
    create:
      size: 1G
      backing_file: /var/lib/backup/vm1-disk0.qcow2

- name: Close both again
  qemu.qmp.qmp_blockdev:
    socket: /run/qemu/vm1.qmp
    node_name: "{{ item }}"
    state: absent
  loop: [target1, target0]
"""

RETURN = r"""
node:
  description:
    - The node as QEMU reports it in C(query-named-block-nodes); in check mode, the options that
      would be used. Null when the node is absent.
  returned: always
  type: dict
  sample: {"node-name": "target0", "drv": "qcow2", "ro": false, "file": "/var/lib/backup/vm1-disk0.qcow2"}
created:
  description: Whether the image file was created.
  returned: when O(create) is given
  type: bool
not_compared:
  description: Options given that QEMU does not report back, so they could not be compared with an existing node.
  returned: when the node already existed
  type: list
  elements: str
  sample: [aio, discard]
differences:
  description: Each option that differs, with the wanted value and QEMU's.
  returned: when an existing node differs
  type: dict
  sample: {"read-only": {"wanted": true, "qemu": false}}
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)).
      In check mode, the commands that would change QEMU are listed but not sent. A query sent
      several times in a row while waiting is listed once, with C(repeated) giving the count.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "query-named-block-nodes", "arguments": {"flat": true}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "Could not open '/x.qcow2': No such file or directory"}
"""

from ansible.module_utils.common.text.formatters import human_to_bytes

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_block import (
    BlockError,
    ImageCreator,
    backing_links,
    compare_options,
    node_users,
    nodes_by_name,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule


def summary(node):
    """What the diff shows of a node."""
    if node is None:
        return {"state": "absent"}
    return {"state": "present", "driver": node.get("drv") or node.get("driver"),
            "read-only": node.get("ro", node.get("read-only", False)),
            "file": node.get("file") if not isinstance(node.get("file"), dict) else node["file"].get("filename")}


def fail_if_in_use(qm, node_name, doing):
    users = node_users(qm, node_name)
    if users:
        qm.fail("cannot %s node %s: it is in use by %s" % (doing, node_name, ", ".join(users)), users=users)


def create_image(qm, options, create):
    """Create the image file behind `options` when it does not exist. Returns whether it did."""
    fmt = options.get("driver")
    if fmt == "file":
        file_ref = {"driver": "file", "filename": options.get("filename")}
    else:
        file_ref = options.get("file")
    if not isinstance(file_ref, dict) or not file_ref.get("filename"):
        qm.fail("create needs options.file to be a file definition ({driver: file, filename: ...}), "
                "or options.driver=file with options.filename")
    creator = ImageCreator(qm, qm.params["node_name"])
    if creator.file_exists(file_ref["filename"]):
        return False
    creator.create(file_ref, fmt, create)
    return True


def ensure_present(qm, node_name, options, nodes, result):
    node = nodes.get(node_name)
    if node is not None:
        differences, not_compared = compare_options(options, node, nodes, backing_links(qm))
        if not qm.needs_recreate("node %s" % node_name, differences, not_compared, result,
                                 "delete and add it again"):
            return node
        fail_if_in_use(qm, node_name, "recreate")
        qm.change("blockdev-del", {"node-name": node_name})
    if not options.get("driver"):
        qm.fail("options.driver is required to add node %s" % node_name)
    create = qm.params["create"]
    if create is not None:
        create = dict(create)
        try:
            create["size"] = human_to_bytes(create["size"])
            if create.get("cluster_size") is not None:
                create["cluster_size"] = human_to_bytes(create["cluster_size"])
            result["created"] = create_image(qm, options, create)
        except ValueError as exc:
            qm.fail("create: %s" % exc)
    qm.change("blockdev-add", options)
    if qm.check_mode:
        return options
    return nodes_by_name(qm).get(node_name)


def main():
    qm = QMPModule(
        argument_spec=dict(
            node_name=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            options=dict(type="dict", default={}),
            create=dict(type="dict", options=dict(
                size=dict(type="raw", required=True),
                backing_file=dict(type="str"),
                backing_fmt=dict(type="str", default="qcow2"),
                cluster_size=dict(type="raw"),
                options=dict(type="dict"),
            )),
            recreate=dict(type="bool", default=False),
        ),
    )
    node_name = qm.params["node_name"]
    options = dict(qm.params["options"])
    if options.setdefault("node-name", node_name) != node_name:
        qm.fail("options.node-name (%s) differs from node_name (%s)" % (options["node-name"], node_name))
    result = {}
    with qm.connected():
        nodes = nodes_by_name(qm)
        before = nodes.get(node_name)
        try:
            if qm.params["state"] == "present":
                after = ensure_present(qm, node_name, options, nodes, result)
            else:
                after = None
                if before is not None:
                    fail_if_in_use(qm, node_name, "delete")
                    qm.change("blockdev-del", {"node-name": node_name})
        except BlockError as exc:
            qm.fail(str(exc), **result)
    qm.exit(node=after, before=summary(before), after=summary(after), **result)


if __name__ == "__main__":
    main()
