# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The QMP connection options shared by every module of the collection.
    DOCUMENTATION = r"""
options:
  socket:
    description:
      - Path of QEMU's QMP unix socket on the managed host, as given to QEMU with
        C(-qmp unix:PATH,server=on,wait=off) or C(-chardev socket,id=ID,path=PATH,server=on,wait=off -mon ID,mode=control).
      - When neither O(socket) nor O(host) is set, the path is taken from the
        environment variable E(QMP_SOCKET) of the module's process (for example set with the
        C(environment) keyword).
      - A QMP socket serves one client at a time. If another tool (libvirt, Proxmox, a
        console) holds it, give QEMU a second C(-qmp) socket for Ansible.
      - Mutually exclusive with O(host).
    type: path
  host:
    description:
      - Host name or address of a QMP TCP server (C(-qmp tcp:HOST:PORT,server=on,wait=off)).
      - QMP over TCP is plain text with no authentication, so anyone who can reach the port
        controls the VM. The modules warn when O(host) is not a loopback address; prefer a
        unix socket, or tunnel the port over SSH.
      - Requires O(port). Mutually exclusive with O(socket).
    type: str
  port:
    description:
      - TCP port of the QMP server given in O(host).
    type: int
  timeout:
    description:
      - Seconds to wait for QEMU, for the connection and its greeting, and for the answer to
        each command. Unless O(wait_timeout) is set, also for whatever the module waits on
        (events, jobs, the guest).
      - A QMP socket already used by another client accepts the connection but sends no
        greeting until that client leaves; the module waits up to O(timeout) for it.
      - Must be more than 0 and at most 1000000000.
    type: float
    default: 30
  wait_timeout:
    description:
      - Seconds a module waits for QEMU to finish what it started or follows (a job, a shutdown,
        an unplug, a migration, an export going away).
      - "Default: the value of O(timeout). O(timeout) alone bounds the connection and each reply."
      - Must be more than 0 and at most 1000000000.
    type: float
notes:
  - The modules run on the managed host and need only Python's standard library there.
    In check mode they validate the commands they would send against the running QEMU's
    QMP schema when the Python library C(jsonschema) is installed on that host, and warn
    when it is not.
  - Features are detected from the running QEMU's schema (C(query-qmp-schema)), which is
    cached per QEMU binary under C(~/.cache/qemu.qmp) (or E(XDG_CACHE_HOME), or the folder
    in E(QMP_SCHEMA_CACHE)).
  - Every module returns RV(qmp_commands), the QMP commands it sent, or in check mode
    would have sent.
"""
