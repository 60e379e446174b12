# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: qmp
short_description: The QEMU VMs running on your hypervisors, as inventory hosts
description:
  - Finds the VMs on each hypervisor of the inventory (the hosts of O(hypervisors), from the inventory sources
    given before this file) and makes each VM an inventory host, with its QMP socket, run state, QEMU version,
    disks, bitmaps and last backup as variables.
  - Each hypervisor is reached over Ansible's own connection, with its own variables. The plugin runs the
    M(qemu.qmp.qmp_host_info) module there, on every hypervisor at once (up to O(forks)), through a separate
    C(ansible) process that reads the same inventory sources.
  - On each hypervisor it finds the VMs the C(qemu.qmp.vm) role started (their saved definitions in
    O(run_dirs)), and any QMP socket in O(socket_dirs). A VM whose QMP socket is busy (another client holds it)
    or dead is listed with that state (group C(qmp_unreachable)), never fatal; a hypervisor that cannot be
    reached gives a warning.
  - "A VM host carries its hypervisor's connection variables (every C(ansible_*) variable of the hypervisor), so
    a play or an ad-hoc command on a VM runs on its hypervisor; and, for a VM the vm role started, the role's
    C(vm_*) variables from its saved definition, so the qemu.qmp roles (backup, migrate, vm) work on it as
    they are."
  - Hosts are added one hypervisor after the other in turn, so that Ansible's forks spread the work of a play
    over every hypervisor.
  - The discovery is cached with Ansible's inventory cache when O(cache) is on.
  - Inventory file names must end in C(qmp.yml) or C(qmp.yaml) (for example C(fleet.qmp.yml)).
author:
  - qemu.qmp maintainers (@qemu-qmp)
version_added: 0.1.0
extends_documentation_fragment:
  - ansible.builtin.constructed
  - ansible.builtin.inventory_cache
options:
  plugin:
    description: The name of this plugin; it marks the file as this plugin's.
    required: true
    choices: [qemu.qmp.qmp]
    type: str
  hypervisors:
    description:
      - The hypervisors, as names of hosts or groups of the inventory sources given before this file.
    type: list
    elements: str
    default: [qemu_hosts]
  run_dirs:
    description: Folders where the C(qemu.qmp.vm) role keeps its VMs' files (its O(ignore:vm_run_dir)).
    type: list
    elements: path
    default: [/run/qemu-qmp]
  socket_dirs:
    description: Folders whose C(*.qmp) sockets are listed too, as VMs the vm role did not start.
    type: list
    elements: path
    default: []
  backup_dir:
    description:
      - The backup role's O(ignore:backup_dir) on the hypervisors; each VM's last backup is read from
        C(backup_dir/NAME). An empty string reads no backups.
    type: path
    default: /var/lib/qemu-qmp/backups
  timeout:
    description: Seconds to wait for each VM's QMP greeting; a socket that accepts but stays silent is busy.
    type: float
    default: 2
  forks:
    description: How many hypervisors are asked at once.
    type: int
    default: 20
  discovery_timeout:
    description: Seconds the discovery on all hypervisors may take, as a whole.
    type: float
    default: 300
  group:
    description: The group of every VM found.
    type: str
    default: qmp_vms
  connection_vars:
    description: Give each VM host its hypervisor's C(ansible_*) variables, so that tasks on the VM run there.
    type: bool
    default: true
  vm_vars:
    description: Give each VM the vm role's C(vm_*) variables of its saved definition.
    type: bool
    default: true
  use_vars_plugins:
    description:
      - Read the hypervisors' variables from vars plugins too (C(host_vars/) and C(group_vars/) folders), as
        the C(ansible.builtin.constructed) option of that name does, for O(connection_vars).
    type: bool
    default: true
notes:
  - "Variables of each VM host: C(qmp_hypervisor) (the hypervisor's inventory name), C(qmp_socket),
    C(qmp_extra_socket), C(qmp_state) (QEMU's run state, such as C(running), C(paused) or C(postmigrate); or
    C(busy), C(dead), C(error)), C(qmp_state_msg), C(qmp_qemu_version), C(qmp_pid), C(qmp_managed) (started by
    the vm role), C(qmp_definition_file), C(qmp_run_dir), C(qmp_disks) (device, node name, file, format,
    virtual size, bitmaps), C(qmp_jobs), C(qmp_last_backup) (label, chain, level, finished) and C(qmp_backups),
    C(qmp_discovered_at) (when the hypervisor was asked, UTC)."
  - "Groups: O(group) (every VM), C(qmp_answering) (QEMU answers: the VMs a backup can reach),
    C(qmp_unreachable) (busy, dead or error), and C(qmp_on_HYPERVISOR) (the VMs of each hypervisor)."
  - A VM name found on more than one hypervisor (a migration's two QEMUs) becomes one host, the one whose QEMU
    runs the guest (not C(postmigrate), C(inmigrate) or unreachable), with a warning; C(qmp_also_on) names the
    others.
  - The discovery's C(ansible) gets this run's connection, become and vault options (C(--private-key), C(--user),
    C(--become), C(--vault-id), C(--vault-password-file), ...); passwords asked at a prompt are not passed on,
    so give them as files.
  - A VM with the name of a host the inventory has already (a hypervisor's, say) is not listed, with a warning.
  - List this file after the inventory of the hypervisors (C(-i hypervisors.yml -i fleet.qmp.yml), or file names
    that sort that way in an inventory folder).
seealso:
  - module: qemu.qmp.qmp_host_info
"""

EXAMPLES = r"""
# fleet.qmp.yml, used as: ansible-inventory -i hypervisors.yml -i fleet.qmp.yml --graph
plugin: qemu.qmp.qmp
hypervisors: [qemu_hosts]
socket_dirs: [/srv/vms]
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/qemu-qmp-inventory
cache_timeout: 300
keyed_groups:
  # qemu_7_2_0, qemu_10_0_2, ...
  - key: qmp_qemu_version | replace('.', '_') if qmp_qemu_version else none
    prefix: qemu
compose:
  backup_level: "'full' if qmp_last_backup is none else 'auto'"
groups:
  never_backed_up: qmp_last_backup is none
"""

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

from ansible import context
from ansible.errors import AnsibleParserError
from ansible.inventory.helpers import get_group_vars
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.vars import combine_vars

try:
    from ansible.vars.plugins import get_vars_from_inventory_sources
except ImportError:  # pragma: no cover - every supported ansible-core has it
    get_vars_from_inventory_sources = None

# Set in the environment of the discovery's own `ansible` process: a source of this plugin that it reads again
# (an inventory folder holding both files) adds nothing there, instead of discovering again.
NESTED = "QEMU_QMP_INVENTORY_DISCOVERY"
# States in which a QEMU does not run the guest: another QEMU of the same name is the VM.
NOT_THE_GUEST = ("postmigrate", "inmigrate", "busy", "dead", "error", "shutdown", "internal-error", "guest-panicked")
# Command line options of the ansible-playbook, ansible or ansible-inventory run that the discovery's own
# `ansible` is given too, so that it reaches the hypervisors the same way (prompted passwords cannot be).
PASSED_OPTIONS = (("private_key_file", "--private-key"), ("remote_user", "--user"), ("connection", "--connection"),
                  ("timeout", "--timeout"), ("ssh_common_args", "--ssh-common-args"),
                  ("ssh_extra_args", "--ssh-extra-args"), ("connection_password_file", "--connection-password-file"),
                  ("become_method", "--become-method"), ("become_user", "--become-user"),
                  ("become_password_file", "--become-password-file"))


def safe_group(text):
    return re.sub(r"[^A-Za-z0-9_]", "_", str(text))


def parse_results(output):
    """{host: (ok, result or message)} from the qemu.qmp.json_lines callback's output (one line per result)."""
    found = {}
    for line in output.splitlines():
        try:
            entry = json.loads(line) if line.startswith("{") else None
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not {"host", "status", "result"} <= set(entry):
            continue
        result = entry["result"] if isinstance(entry["result"], dict) else {}
        if entry["status"] in ("ok", "changed"):
            found[entry["host"]] = (True, result)
        else:
            message = result.get("msg") or result.get("module_stderr") or entry["status"]
            found[entry["host"]] = (False, "%s: %s" % (entry["status"], str(message).strip()))
    return found


def passed_options(cli_args):
    """The options of this run's command line that the discovery's `ansible` takes too."""
    passed = []
    for key, flag in PASSED_OPTIONS:
        value = cli_args.get(key)
        if value not in (None, ""):
            passed += [flag, str(value)]
    if cli_args.get("become"):
        passed.append("--become")
    for vault_id in cli_args.get("vault_ids") or ():
        passed += ["--vault-id", vault_id]
    for path in cli_args.get("vault_password_files") or ():
        passed += ["--vault-password-file", path]
    return passed


def preferred(candidates):
    """The one of several QEMUs of one VM name that runs the guest (ties: the first hypervisor's)."""
    return sorted(candidates, key=lambda c: (c[1]["state"] in NOT_THE_GUEST, not c[1].get("managed")))[0]


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "qemu.qmp.qmp"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("qmp.yml", "qmp.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache=cache)
        self._qmp_path = path
        self._read_config_data(path)
        if os.environ.get(NESTED):
            return
        hypervisors = self._hypervisors()
        cache_key = self.get_cache_key(path)
        use_cache = self.get_option("cache") and cache
        update_cache = self.get_option("cache") and not cache
        discovered = None
        if use_cache:
            try:
                discovered = self._cache[cache_key]
            except KeyError:
                update_cache = True
        if discovered is None or sorted(discovered.get("hypervisors", {})) != sorted(hypervisors):
            discovered = self._discover(hypervisors)
            update_cache = bool(self.get_option("cache"))
        if update_cache:
            self._cache[cache_key] = discovered
        self._populate(discovered)

    # -- the hypervisors --------------------------------------------------------------------------------

    def _hypervisors(self):
        """The hypervisors' inventory names, in the order they are given."""
        names = []
        for name in self.get_option("hypervisors"):
            if name in self.inventory.groups:
                members = self.inventory.groups[name].get_hosts()
                names.extend(host.name for host in members if host.name not in names)
            elif name in self.inventory.hosts:
                if name not in names:
                    names.append(name)
            else:
                self.display.warning("qemu.qmp.qmp: %s is neither a host nor a group of the inventory sources read "
                                     "before %s: list those sources first" % (name, self._path()))
        if not names:
            raise AnsibleParserError("qemu.qmp.qmp: no hypervisor found for %s (hypervisors: %s) in the inventory "
                                     "sources read before it" % (self._path(), ", ".join(self.get_option("hypervisors"))))
        return names

    def _path(self):
        return getattr(self, "_qmp_path", None) or "this inventory file"

    def _sources(self):
        return [s for s in getattr(self.inventory, "processed_sources", []) if s]

    def _hypervisor_vars(self, name):
        """The hypervisor's variables as the inventory has them (not templated: they are templated where used)."""
        host = self.inventory.hosts[name]
        variables = get_group_vars(host.get_groups())
        sources = self._sources()
        if self.get_option("use_vars_plugins") and get_vars_from_inventory_sources and sources:
            variables = combine_vars(variables, get_vars_from_inventory_sources(self.loader, sources, host.get_groups(), "all"))
        variables = combine_vars(variables, host.get_vars())
        if self.get_option("use_vars_plugins") and get_vars_from_inventory_sources and sources:
            variables = combine_vars(variables, get_vars_from_inventory_sources(self.loader, sources, [host], "all"))
        return variables

    # -- discovery ----------------------------------------------------------------------------------------

    def _module_args(self):
        return json.dumps({
            "run_dirs": self.get_option("run_dirs"), "socket_dirs": self.get_option("socket_dirs"),
            "backup_dir": self.get_option("backup_dir") or "", "timeout": self.get_option("timeout")})

    def _discover(self, hypervisors):
        """Run qemu.qmp.qmp_host_info on every hypervisor with a separate `ansible` over the same sources."""
        sources = self._sources()
        if not sources:
            raise AnsibleParserError("qemu.qmp.qmp: no inventory source was read before %s, so the hypervisors "
                                     "cannot be reached: list their inventory first" % self._path())
        command = [sys.executable, "-m", "ansible.cli.adhoc", ",".join(hypervisors)]
        for source in sources:
            command += ["-i", source]
        command += ["-m", "qemu.qmp.qmp_host_info", "-a", self._module_args(), "-f", str(self.get_option("forks"))]
        command += passed_options(context.CLIARGS)
        env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="qemu.qmp.json_lines", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
                   ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_RETRY_FILES_ENABLED="0",
                   ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
        env[NESTED] = "1"
        env.pop("ANSIBLE_CALLBACKS_ENABLED", None)
        moment = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            try:
                done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                                      timeout=self.get_option("discovery_timeout"), check=False)
            except subprocess.TimeoutExpired:
                raise AnsibleParserError("qemu.qmp.qmp: the discovery on %s did not end within %gs (discovery_timeout)"
                                         % (", ".join(hypervisors), self.get_option("discovery_timeout")))
            stdout.seek(0)
            stderr.seek(0)
            output = stdout.read().decode("utf-8", "replace")
            errors = stderr.read().decode("utf-8", "replace").strip()
        results = parse_results(output)
        found = {}
        for name in hypervisors:
            ok, result = results.get(name, (False, None))
            if result is None:
                result = "no result (ansible exited %d: %s)" % (done.returncode, errors[-500:] or output[-500:])
            found[name] = {"ok": ok, "vms": result.get("vms", []) if ok else [],
                           "msg": "" if ok else result, "at": moment}
        return {"hypervisors": found, "at": moment}

    # -- the hosts ---------------------------------------------------------------------------------------

    def _populate(self, discovered):
        self._connections = {}
        self._added = set()
        group = self.inventory.add_group(self.get_option("group"))
        answering = self.inventory.add_group("qmp_answering")
        unreachable = self.inventory.add_group("qmp_unreachable")
        by_name = {}
        order = []
        for hypervisor, found in discovered["hypervisors"].items():
            if hypervisor not in self.inventory.hosts:
                continue
            if not found["ok"]:
                self.display.warning("qemu.qmp.qmp: the VMs of %s are not listed: %s" % (hypervisor, found["msg"]))
                continue
            for index, vm in enumerate(found["vms"]):
                if vm["name"] not in by_name:
                    by_name[vm["name"]] = []
                    order.append((index, len(order), vm["name"]))
                by_name[vm["name"]].append((hypervisor, vm, found["at"]))
        # One hypervisor's first VM, then the next hypervisor's first, and so on: forks spread over the hosts.
        for dummy, dummy2, name in sorted(order):
            candidates = by_name[name]
            hypervisor, vm, moment = preferred(candidates)
            others = [c[0] for c in candidates if c[0] != hypervisor or c[1] is not vm]
            if others:
                self.display.warning("qemu.qmp.qmp: VM %s has a QEMU on %s (%s) and on %s; its host is the one on %s"
                                     % (name, hypervisor, vm["state"], ", ".join(others), hypervisor))
            if name in self.inventory.hosts and name not in self._added:
                self.display.warning("qemu.qmp.qmp: VM %s on %s is not listed: a host of that name is in the inventory "
                                     "already" % (name, hypervisor))
                continue
            self._added.add(name)
            self._add_vm(name, hypervisor, vm, moment, others)
            self.inventory.add_child(group, name)
            self.inventory.add_child(answering if vm["state"] not in ("busy", "dead", "error") else unreachable, name)
            self.inventory.add_child(self.inventory.add_group("qmp_on_" + safe_group(hypervisor)), name)

    def _connection_vars(self, hypervisor):
        """The hypervisor's `ansible_*` variables (read once per hypervisor: vars plugins read files)."""
        if hypervisor not in self._connections:
            connection = dict((k, v) for k, v in self._hypervisor_vars(hypervisor).items() if k.startswith("ansible_"))
            connection.setdefault("ansible_host", hypervisor)
            self._connections[hypervisor] = connection
        return self._connections[hypervisor]

    def _add_vm(self, name, hypervisor, vm, moment, others):
        self.inventory.add_host(name)
        variables = {}
        if self.get_option("connection_vars"):
            variables.update(self._connection_vars(hypervisor))
        if self.get_option("vm_vars"):
            variables["vm_name"] = name
            variables["vm_qmp_socket"] = vm["qmp_socket"]
            for key, value in (vm.get("definition") or {}).items():
                if key != "name":
                    variables["vm_" + key] = value
        variables.update({
            "qmp_hypervisor": hypervisor, "qmp_socket": vm["qmp_socket"],
            "qmp_extra_socket": vm.get("extra_qmp_socket") or "", "qmp_state": vm["state"],
            "qmp_state_msg": vm.get("state_msg") or "", "qmp_qemu_version": vm.get("qemu_version"),
            "qmp_pid": vm.get("pid"), "qmp_managed": bool(vm.get("managed")),
            "qmp_definition_file": vm.get("definition_file") or "", "qmp_run_dir": vm.get("run_dir") or "",
            "qmp_instance": vm.get("instance") or "", "qmp_disks": vm.get("disks") or [],
            "qmp_jobs": vm.get("jobs") or [], "qmp_last_backup": vm.get("last_backup"),
            "qmp_backups": vm.get("backups") or 0, "qmp_also_on": others, "qmp_discovered_at": moment,
        })
        for key, value in variables.items():
            self.inventory.set_variable(name, key, value)
        strict = self.get_option("strict")
        hostvars = self.inventory.get_host(name).get_vars()
        self._set_composite_vars(self.get_option("compose"), hostvars, name, strict=strict)
        hostvars = self.inventory.get_host(name).get_vars()
        self._add_host_to_composed_groups(self.get_option("groups"), hostvars, name, strict=strict)
        self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, name, strict=strict)
