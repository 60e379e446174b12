#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qmp_object
short_description: Add or remove a user-creatable object (secret, TLS credentials, I/O thread, ...) in a running QEMU
version_added: 0.1.0
description:
  - Makes a user-creatable object present in a running QEMU with C(object-add), or absent with C(object-del), as
    C(-object) does on QEMU's command line. Such objects are what other parts of QEMU refer to by id, for example
    TLS credentials (V(tls-creds-x509)) for encrypted migration and NBD, secrets (V(secret)) holding the passphrase
    of an encrypted image, I/O threads (V(iothread)) for virtio disks, throttle groups (V(throttle-group)) shared
    by several disks, or memory back ends.
  - An existing object is found by its id under C(/objects) in QEMU's object tree and compared on its type and
    on each property given in O(props) that QEMU can read back (C(qom-get)), with QEMU's own types (V(true) or
    V("on") for a boolean, a number or its string, an enum value as its name, only the given members of a
    structure). Properties QEMU cannot read are listed in RV(not_compared).
  - QEMU cannot change an object's properties once it exists; O(recreate) deletes the object and adds it again.
extends_documentation_fragment:
  - qemu.qmp.connection
  - qemu.qmp.attributes
  - qemu.qmp.attributes.check_and_diff
options:
  id:
    description:
      - The object's id, how the rest of QEMU refers to it (for example in C(tls-creds), C(key-secret),
        C(iothread) or C(throttle-group)).
      - QEMU wants a letter first, then only letters, digits, C(-), C(.) and C(_).
    type: str
    required: true
  qom_type:
    description:
      - The object's type (QOM type), as C(-object) and C(object-add) name it, for example V(secret),
        V(tls-creds-x509), V(tls-creds-psk), V(iothread), V(throttle-group) or V(memory-backend-ram).
      - Checked against the types the running QEMU's schema lists; the module fails naming the types it takes.
      - Required with O(state=present).
    type: str
  props:
    description:
      - The object's properties, as C(object-add) takes them beside C(qom-type) and C(id), with the types QEMU's
        schema gives them (numbers as numbers, booleans as booleans), for example C(dir), C(endpoint) and
        C(verify-peer) for TLS credentials, C(data) or C(file) for a secret, C(poll-max-ns) for an I/O thread,
        C(limits) for a throttle group.
      - Ansible never logs this option. In results, the value of C(data) (a secret's content) is never shown, in
        RV(object), RV(differences), RV(qmp_commands), the diff and failure messages alike; the other properties
        are shown as they are, so keep secrets in C(data), or in a file QEMU reads (C(file)).
      - When a task fails, Ansible shows where it is written, with some of its lines; give secrets through
        variables (for example from Ansible Vault) rather than as text in the task.
    type: dict
  state:
    description:
      - V(present) adds the object when QEMU has none with that id. An existing object of the same type whose
        readable properties have the given values is unchanged; another type or another value fails, naming
        what differs, unless O(recreate) is set.
      - V(absent) deletes the object. QEMU refuses to delete an object something still uses (a throttle group
        with disks in it, a memory back end a device maps); that fails with QEMU's error. Only O(id) counts.
    type: str
    choices: [present, absent]
    default: present
  recreate:
    description:
      - When an existing object has another type or other property values, delete it (C(object-del)) and add it
        again with O(qom_type) and O(props). QEMU refuses this for an object that is in use.
    type: bool
    default: false
notes:
  - QEMU reads the files an object names (certificates, a secret's C(file)) when the object is added. For changed
    files to count, delete the object (O(state=absent)) and add it again; O(recreate) acts only on differences
    QEMU reports.
  - Objects given on QEMU's command line (C(-object)) are managed the same way.
seealso:
  - module: qemu.qmp.qmp_nbd
    description: The NBD server takes TLS credentials in its O(qemu.qmp.qmp_nbd#module:tls_creds) option.
author:
  - qemu.qmp maintainers (@qemu-qmp)
"""

EXAMPLES = r"""
- name: A secret holding a disk's passphrase; its value never shows in results or logs
  qemu.qmp.qmp_object:
    socket: /run/qemu/vm1.qmp
    id: disk1-key
    qom_type: secret
    props:
      data: "{{ disk1_passphrase }}"
  vars:
    disk1_passphrase: correct horse battery staple  # in practice from Ansible Vault

- name: An I/O thread for virtio disks (iothread=iothread1), polling up to 32 microseconds before it sleeps
  qemu.qmp.qmp_object:
    socket: /run/qemu/vm1.qmp
    id: iothread1
    qom_type: iothread
    props:
      poll-max-ns: 32768

- name: A throttle group that several disks share (block nodes of driver throttle, throttle-group=slow)
  qemu.qmp.qmp_object:
    socket: /run/qemu/vm1.qmp
    id: slow
    qom_type: throttle-group
    props:
      limits:
        iops-total: 200
        bps-total: 10485760

# TLS credentials read ca-cert.pem, server-cert.pem and server-key.pem from their folder.
# For a lab, a throwaway CA will do; elsewhere use the files of your own CA.
- name: A folder for the certificates
  ansible.builtin.file:
    path: /var/lib/qemu/pki
    state: directory
    mode: "0700"

- name: A throwaway CA, and a certificate for this host signed by it
  ansible.builtin.shell: |
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=lab-ca -keyout ca-key.pem -out ca-cert.pem
    openssl req -x509 -CA ca-cert.pem -CAkey ca-key.pem -newkey rsa:2048 -nodes -days 365 \
      -subj /CN={{ inventory_hostname }} -addext subjectAltName=DNS:{{ inventory_hostname }} \
      -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth,clientAuth \
      -keyout server-key.pem -out server-cert.pem
  args:
    chdir: /var/lib/qemu/pki
    creates: /var/lib/qemu/pki/server-cert.pem

- name: TLS credentials for incoming migrations and NBD clients (tls-creds=tls0)
  qemu.qmp.qmp_object:
    socket: /run/qemu/vm1.qmp
    id: tls0
    qom_type: tls-creds-x509
    props:
      dir: /var/lib/qemu/pki
      endpoint: server
      verify-peer: false

- name: Replace them, now asking clients for a certificate from the same CA
  qemu.qmp.qmp_object:
    socket: /run/qemu/vm1.qmp
    id: tls0
    qom_type: tls-creds-x509
    props:
      dir: /var/lib/qemu/pki
      endpoint: server
      verify-peer: true
    recreate: true
  register: tls0

- name: Show what was replaced
  ansible.builtin.debug:
    var: tls0.differences

- name: Remove them all
  qemu.qmp.qmp_object:
    socket: /run/qemu/vm1.qmp
    id: "{{ item }}"
    state: absent
  loop: [tls0, slow, iothread1, disk1-key]
"""

RETURN = r"""
object:
  description:
    - The object as QEMU reports it afterwards; in check mode, as it would be. Null when absent.
  returned: always
  type: dict
  contains:
    id:
      description: Its id.
      type: str
    qom_type:
      description: Its type.
      type: str
    path:
      description: Its path in QEMU's object tree.
      type: str
    props:
      description:
        - The values QEMU reports for the properties given in O(props) (those it cannot read are left out).
          In check mode, the values given.
        - The value of C(data) shows as V(********).
      type: dict
  sample: {"id": "tls0", "qom_type": "tls-creds-x509", "path": "/objects/tls0",
           "props": {"dir": "/etc/pki/qemu", "endpoint": "server", "verify-peer": true}}
not_compared:
  description: Properties given in O(props) that QEMU cannot read back, so they could not be compared with an existing object.
  returned: when the object already existed
  type: list
  elements: str
  sample: []
differences:
  description:
    - Each difference from the wanted object (its C(qom_type), or a property, with dotted names for members of a
      structure such as C(limits.iops-total)), with the wanted value and QEMU's.
    - The values of C(data) show as V(********).
  returned: when an existing object differs
  type: dict
  sample: {"verify-peer": {"wanted": true, "qemu": false}}
qmp_commands:
  description:
    - The QMP commands the module sent, in order, as they went on the wire (without the C(id)), with the value
      of C(data) shown as V(********). In check mode, the commands that would change QEMU are listed but not sent.
  returned: always
  type: list
  elements: dict
  sample: [{"execute": "qom-list", "arguments": {"path": "/objects"}},
           {"execute": "object-add", "arguments": {"qom-type": "secret", "id": "disk1-key", "data": "********"}}]
qmp_error:
  description: QEMU's own error when QEMU refused a command, with its C(class) and C(desc).
  returned: when QEMU refused a command
  type: dict
  sample: {"class": "GenericError", "desc": "object 'slow' is in use, can not be deleted"}
"""

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPCommandError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import QMPModule, secret_strings
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_objects import (
    OBJECTS,
    SECRET_PROPS,
    compare_object,
    id_error,
    read_object,
    secret_values,
    shown,
    shown_object,
    type_error,
)


def summary(obj):
    if obj is None:
        return {"state": "absent"}
    return {"state": "present", "id": obj["id"], "qom_type": obj["qom_type"], "props": shown(obj["props"])}


def delete(qm, object_id, result, purpose=""):
    try:
        qm.change("object-del", {"id": object_id})
    except QMPCommandError as exc:
        hint = " (something still uses it, such as a block node, a device, a job or another object; " \
            "remove that first)" if "in use" in exc.desc else ""
        qm.fail("cannot delete object %s%s: %s%s" % (object_id, purpose, exc.desc, hint),
                qmp_error={"class": exc.error_class, "desc": exc.desc}, **result)


def add_arguments(qm, object_id, qom_type, props):
    """object-add's arguments and the paths of the secrets among them."""
    secrets = [name for name in SECRET_PROPS if name in props]
    if qm.schema.has_argument("object-add", "props"):
        # QEMU before 6.0 takes the properties in one dictionary.
        return {"qom-type": qom_type, "id": object_id, "props": dict(props)}, ["props." + name for name in secrets]
    arguments = {"qom-type": qom_type, "id": object_id}
    arguments.update(props)
    return arguments, secrets


def ensure_present(qm, object_id, before, result):
    qom_type, props = qm.params["qom_type"], qm.params["props"] or {}
    for name in ("qom-type", "id"):
        if name in props:
            qm.fail("props.%s is set by the module's own option %s" % (name, name.replace("-", "_")))
    error = id_error(object_id)
    if error:
        qm.fail(error)
    if before is None or before["qom_type"] != qom_type:
        error = type_error(qom_type, qm.schema.enum_values("object-add", "qom-type"))
        if error:
            qm.fail(error)
    if before is not None:
        differences, not_compared = compare_object(qom_type, props, before)
        if not qm.needs_recreate("object %s" % object_id, differences, not_compared, result,
                                 "delete it and add it again"):
            return before
        delete(qm, object_id, result, " to add it again")
    arguments, secrets = add_arguments(qm, object_id, qom_type, props)
    qm.change("object-add", arguments, redact=secrets)
    if qm.check_mode:
        return {"id": object_id, "qom_type": qom_type, "path": "%s/%s" % (OBJECTS, object_id), "props": dict(props)}
    after = read_object(qm.query, object_id, props)
    qm.hide(*secret_values(after["props"]))
    return after


def main():
    qm = QMPModule(
        argument_spec=dict(
            id=dict(type="str", required=True),
            qom_type=dict(type="str"),
            props=dict(type="dict", no_log=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            recreate=dict(type="bool", default=False),
        ),
        required_if=[("state", "present", ["qom_type"])],
    )
    props = qm.params["props"] or {}
    # props is no_log, so Ansible never logs it; but Ansible would also hide each of its values
    # wherever it appears in the result (a 0 would hide every 0). Only the secrets need that.
    qm.module.no_log_values.difference_update(secret_strings(props))
    qm.hide(*secret_values(props))
    object_id = qm.params["id"]
    present = qm.params["state"] == "present"
    result = {}
    with qm.connected():
        before = read_object(qm.query, object_id, props if present else ())
        if before is not None:
            qm.hide(*secret_values(before["props"]))
        if present:
            after = ensure_present(qm, object_id, before, result)
        else:
            after = None
            if before is not None:
                delete(qm, object_id, result)
    qm.exit(object=shown_object(after), before=summary(before), after=summary(after), **result)


if __name__ == "__main__":
    main()
