# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Two SSH hosts on one machine, for the cross-host integration tests (migration, fleets).

Each host is an sshd that is PID 1 of its own mount, PID, UTS and IPC namespaces
(unshare), listening on its own loopback address and a free port. Ansible reaches
both as root over SSH with a key, with the host keys pinned in a known_hosts file.

Inside each host:
  /run                      its own (a tmpfs): /run/qemu-qmp is the host's state folder `run`,
                            and there is no /run/systemd, so QEMU runs as a daemon with a pidfile
  /var/lib                  the machine's entries, but /var/lib/qemu-qmp is the host's state folder `lib`
  /var/lib/qemu-qmp/shared  the same folder on both hosts (shared storage, as NFS would be)
  /root                     private (the host's state folder `root`: authorized_keys, Ansible's temp files)
  /tmp, /dev/shm            private (empty tmpfs)
  /proc                     its own: a host sees only its own processes
  hostname                  host1 or host2
The checkout (QEMU 10.0 and the test guest under .cache), the QEMU under test and
the sshd configuration stay visible at their own paths, even where they live under
a folder the host has its own of (a clone under /tmp, for example). The state
folder of the other host and the controller's key are not visible. Everything else
(/usr, /etc, the machine's QEMU 7.2) is the machine's own, as on two identically
installed hosts. Nothing is mounted on a folder of the machine's (which the machine
could remove under a host), and nothing is left on the machine after stop().

Not isolated: the network. Both hosts share the machine's loopback, so a socket
bound to 0.0.0.0 on one host answers on the other's address too.

Each pytest-xdist worker gets its own pair of addresses (worker_addresses) and each
sshd a free port, so workers, and a pair started by hand, never collide. The
unshare process of each host carries MARKER and its owner (pid and start time of
the process that started it) in its command line: a pair whose owner is gone (a
killed test run) is ended by the next start().

Needs root, openssh-server and util-linux.
"""

from __future__ import annotations

import concurrent.futures
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time

import yaml

from harness import GUEST_DIR, ROOT, qemu_binary

SSHD = "/usr/sbin/sshd"
HOST_NAMES = ("host1", "host2")
GROUP = "qemu_hosts"
RUN_DIR = "/run/qemu-qmp"
LIB_DIR = "/var/lib/qemu-qmp"
SHARED_DIR = LIB_DIR + "/shared"
HOST_PYTHON = "/usr/bin/python3"
MARKER = "qemu-qmp-test-host"
STAMP = ".qemu-qmp-test-hosts"
# Folders every host has its own of (covered inside the host), when the machine has them.
PRIVATE_ROOTS = ("/run", "/root", "/tmp", "/dev/shm", os.path.dirname(LIB_DIR))
HOST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
SSHD_CONFIG = """\
# sshd of {name} (qemu.qmp integration tests)
ListenAddress {address}:{port}
HostKey {state}/ssh/ssh_host_ed25519_key
PidFile none
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
X11Forwarding no
MaxStartups 50:30:100
MaxSessions 50
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def worker_addresses(worker=None):
    """The loopback addresses of host1 and host2 for a pytest-xdist worker (PYTEST_XDIST_WORKER):
    gw0 and a run without xdist 127.0.0.2 and 127.0.0.3, gw1 127.0.0.4 and 127.0.0.5, and so on."""
    if worker is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    if index > 125:
        raise ValueError("no loopback addresses left for xdist worker %s" % worker)
    return "127.0.0.%d" % (2 + 2 * index), "127.0.0.%d" % (3 + 2 * index)


def unavailable_reason(sshd=SSHD):
    """Why the hosts cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "the two test hosts need root (namespaces, mounts, sshd)"
    missing = [name for name in (sshd, "ssh", "ssh-keygen") if not shutil.which(name)]
    if missing:
        return "the two test hosts need openssh-server (missing: %s)" % ", ".join(missing)
    missing = [name for name in ("unshare", "nsenter") if not shutil.which(name)]
    if missing:
        return "the two test hosts need util-linux (missing: %s)" % ", ".join(missing)
    return None


def free_port(address):
    """A TCP port nothing listens on at `address`, nor on a wildcard address."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def default_visible():
    """Folders the hosts must see at their own paths: the checkout, the test guest and the QEMU under test."""
    binary = os.path.realpath(shutil.which(qemu_binary()) or qemu_binary())
    prefix = os.path.dirname(binary)
    if os.path.basename(prefix) == "bin":
        prefix = os.path.dirname(prefix)
    return [ROOT, GUEST_DIR, prefix]


def write_inventory(hosts, path, group_vars=None, host_vars=None):
    """Write a YAML inventory for `hosts` (a TwoHosts) to `path`: host1 and host2 in the group
    qemu_hosts, with `group_vars` for the group and `host_vars` ({name: {...}}) per host."""
    entries = {}
    for host in hosts:
        entry = {
            "ansible_host": host.address,
            "ansible_port": host.port,
            "ansible_user": "root",
            # The test runs pass `-c local` for localhost: the hosts keep ssh.
            "ansible_connection": "ssh",
            "ansible_python_interpreter": HOST_PYTHON,
            "ansible_ssh_common_args": hosts.ssh_common_args,
            "ansible_control_path_dir": os.path.join(hosts.controller, "cp"),
        }
        entry.update((host_vars or {}).get(host.name, {}))
        entries[host.name] = entry
    data = {"all": {"children": {GROUP: {"hosts": entries, "vars": dict(group_vars or {})}}}}
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, default_flow_style=False, sort_keys=False, width=1000)
    return path


def _read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _argv(pid):
    return [arg.decode(errors="replace") for arg in _read("/proc/%d/cmdline" % pid).split(b"\0")[:-1]]


def _stat(pid):
    """(state, ppid, start time) of a process, or None when it is gone."""
    text = _read("/proc/%d/stat" % pid).decode(errors="replace")
    if ")" not in text:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), fields[19]


def _alive(pid):
    """Running, not a zombie waiting for its parent."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _pid_ns(pid):
    try:
        return os.readlink("/proc/%d/ns/pid" % pid)
    except OSError:
        return None


def _children(pid):
    return [p for p in _pids() if (_stat(p) or (None, None))[1] == pid]


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait(condition, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _is_qemu(argv):
    return bool(argv) and os.path.basename(argv[0]).startswith("qemu-")


def _owner_token(pid):
    stat = _stat(pid)
    return "%d.%s" % (pid, stat[2] if stat else "0")


def _owner_alive(token):
    pid, dummy, start = token.partition(".")
    stat = _stat(int(pid)) if pid.isdigit() else None
    return stat is not None and stat[0] not in ("Z", "X") and stat[2] == start


def _under(path, folder):
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def find_hosts():
    """Every test host running on the machine: [{pid (of unshare), host, owner, base}]."""
    found = []
    for pid in _pids():
        argv = _argv(pid)
        if not argv or os.path.basename(argv[0]) != "unshare" or MARKER not in argv:
            continue
        entry = {"pid": pid}
        for arg in argv[argv.index(MARKER) + 1:]:
            key, dummy, value = arg.partition("=")
            entry[key] = value
        found.append(entry)
    return found


def _remove_state(base):
    """Remove a pair's base folder: one that start() made its own (it holds STAMP), or an empty one."""
    base = os.path.abspath(base)
    if base.count("/") >= 2 and os.path.exists(os.path.join(base, STAMP)):
        shutil.rmtree(base, ignore_errors=True)
    elif os.path.isdir(base) and not os.listdir(base):
        os.rmdir(base)


def end_hosts(pids, processes=None, qemu_timeout=20):
    """End the hosts whose unshare processes are `pids`: SIGTERM every QEMU in them (QEMU
    saves persistent dirty bitmaps and flushes its images), then their sshd, the namespace's
    init (the kernel kills what is left in the namespace), then SIGKILL what still runs.
    `processes` maps a pid to its subprocess.Popen when this process started it (to reap it).
    Returns [(pid outside, argv)] of the QEMUs that were sent SIGTERM."""
    processes = processes or {}

    def gone(pid):
        if pid in processes:
            return processes[pid].poll() is not None
        return not _alive(pid)

    pids = [pid for pid in pids if not gone(pid)]
    inits = dict((pid, _children(pid)) for pid in pids)
    namespaces = set(_pid_ns(init) for children in inits.values() for init in children) - {None}
    qemus = []
    for pid in _pids():
        argv = _argv(pid)
        if _is_qemu(argv) and _pid_ns(pid) in namespaces:
            qemus.append((pid, argv))
    for pid, dummy in qemus:
        _signal(pid, signal.SIGTERM)
    _wait(lambda: not any(_alive(pid) for pid, dummy in qemus), qemu_timeout)
    for children in inits.values():
        for init in children:
            # Before it becomes sshd, PID 1 is a shell, which ignores SIGTERM from outside.
            sshd = _read("/proc/%d/comm" % init).strip() == b"sshd"
            _signal(init, signal.SIGTERM if sshd else signal.SIGKILL)
    if not _wait(lambda: all(gone(pid) for pid in pids), 5):
        for pid in pids:
            if not gone(pid):
                # unshare --kill-child: its child, the namespace's init, gets SIGKILL too.
                _signal(pid, signal.SIGKILL)
        _wait(lambda: all(gone(pid) for pid in pids), 5)
    left = [pid for pid in pids if not gone(pid)]  # gone() reaps the processes this process started
    if left:
        raise RuntimeError("test hosts did not end (unshare pids %s)" % left)
    return qemus


def kill_leftovers(qemu_timeout=20):
    """End the test hosts whose owner is gone (a test run that was killed) and remove their state."""
    stale = [entry for entry in find_hosts() if not _owner_alive(entry.get("owner", ""))]
    if stale:
        end_hosts([entry["pid"] for entry in stale], qemu_timeout=qemu_timeout)
        for base in set(entry.get("base", "") for entry in stale):
            if base:
                _remove_state(base)
    return stale


class Host:
    """One of the two hosts. Paths ending in `_outside` are as the machine sees them."""

    def __init__(self, pair, name, address):
        self.pair = pair
        self.name = name
        self.address = address
        self.port = None
        self.state = os.path.join(pair.base, name)
        self.run_dir_outside = os.path.join(self.state, "run")
        self.lib_dir_outside = os.path.join(self.state, "lib")
        self.log = os.path.join(self.state, "sshd.log")
        self.process = None

    def __repr__(self):
        return "<%s %s:%s>" % (self.name, self.address, self.port)

    @property
    def init_pid(self):
        """The pid (as the machine sees it) of the host's sshd, PID 1 inside the host."""
        if self.process is None or self.process.poll() is not None:
            return None
        children = _children(self.process.pid)
        return children[0] if children else None

    def processes(self):
        """[(pid outside, argv)] of every process in the host but its sshd."""
        init = self.init_pid
        namespace = _pid_ns(init) if init else None
        if namespace is None:
            return []
        return [(pid, _argv(pid)) for pid in _pids() if pid != init and _pid_ns(pid) == namespace and _alive(pid)]

    def qemu_pids(self):
        return [pid for pid, argv in self.processes() if _is_qemu(argv)]

    def holds(self, pid):
        """Whether process `pid` (seen from outside) runs inside this host."""
        init = self.init_pid
        return bool(init) and pid != init and _pid_ns(pid) is not None and _pid_ns(pid) == _pid_ns(init)

    def _check(self, what, argv, proc, check):
        if check and proc.returncode != 0:
            raise RuntimeError("%s on %s: %s exited with %s\nstdout: %s\nstderr: %s"
                               % (what, self.name, argv, proc.returncode, proc.stdout, proc.stderr))
        return proc

    def run(self, argv, check=True, timeout=60, stdin=None):
        """Run `argv` (a list, or a string for /bin/sh -c) inside the host, as root, with nsenter:
        the host's mounts, processes and hostname, no SSH. Returns the CompletedProcess (text)."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        init = self.init_pid
        if init is None:
            raise RuntimeError("%s is not running" % self.name)
        cmd = ["nsenter", "--target", str(init), "--mount", "--uts", "--ipc", "--pid", "--"] + list(argv)
        proc = subprocess.run(cmd, env=HOST_ENV, cwd="/", capture_output=True, text=True, timeout=timeout,
                              input=stdin, check=False)
        return self._check("run", argv, proc, check)

    def ssh_argv(self):
        """ssh's command line up to the remote command, as the controller reaches the host."""
        options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-p", str(self.port)]
        return ["ssh"] + self.pair.ssh_options() + options + ["root@" + self.address]

    def ssh(self, argv, check=True, timeout=60, stdin=None):
        """Run `argv` (a list, or a string for the remote shell) on the host over SSH."""
        command = argv if isinstance(argv, str) else shlex.join(argv)
        proc = subprocess.run(self.ssh_argv() + ["--", command], capture_output=True, text=True, timeout=timeout,
                              input=stdin, check=False)
        return self._check("ssh", argv, proc, check)


class TwoHosts:
    """host1 and host2, SSH hosts on their own loopback addresses (see the module's description).

        hosts = TwoHosts("/tmp/qmpxh1234")   # the base folder: this pair's only, removed by stop()
        hosts.start()
        hosts.inventory                       # YAML inventory: host1, host2 in group qemu_hosts
        hosts.host1.address, hosts.host1.port
        hosts.host1.run(["hostname"])         # inside the host, with nsenter
        hosts.host1.ssh(["hostname"])         # over SSH, as Ansible
        hosts.shared                          # the shared folder as the machine sees it (SHARED_DIR inside)
        hosts.stop()

    base should be short (unix socket paths: the ssh control sockets live under it).
    addresses: (host1's, host2's); default worker_addresses().
    shared: a folder to use as the shared folder (kept by stop()); default base/shared.
    visible: folders the hosts see at their own paths; default default_visible().
    owner: the pid whose end makes the pair a leftover for kill_leftovers(); default this process.
    die_with_owner: the hosts get SIGKILL when this process dies without stop() (setpriv --pdeathsig;
    only when started from the main thread, which lives as long as the process).
    """

    def __init__(self, base, addresses=None, shared=None, visible=None, sshd=SSHD, owner=None,
                 die_with_owner=True):
        self.base = os.path.abspath(base)
        self.controller = os.path.join(self.base, "controller")
        self.key = os.path.join(self.controller, "id_ed25519")
        self.known_hosts = os.path.join(self.controller, "known_hosts")
        self.inventory = os.path.join(self.controller, "inventory.yml")
        self.shared = os.path.abspath(shared) if shared else os.path.join(self.base, "shared")
        self.visible = list(default_visible() if visible is None else visible)
        self.sshd = sshd
        self.owner = _owner_token(owner or os.getpid())
        self.die_with_owner = die_with_owner
        self.hosts = [Host(self, name, address) for name, address in zip(HOST_NAMES, addresses or worker_addresses())]
        self.host1, self.host2 = self.hosts
        self.start_seconds = self.stop_seconds = None
        self.stopped_qemus = []

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, name):
        return dict((host.name, host) for host in self.hosts)[name]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def ssh_options(self):
        return ["-i", self.key, "-o", "IdentitiesOnly=yes", "-o", "UserKnownHostsFile=" + self.known_hosts,
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes"]

    @property
    def ssh_common_args(self):
        return shlex.join(self.ssh_options())

    def write_inventory(self, path, group_vars=None, host_vars=None):
        return write_inventory(self, path, group_vars=group_vars, host_vars=host_vars)

    def start(self, timeout=30):
        """Start both hosts and write the inventory; on failure, end what started and raise."""
        began = time.monotonic()
        if not self.base.startswith("/") or self.base.count("/") < 2:
            raise ValueError("base %s: give a folder at least two levels below / (stop() removes it)" % self.base)
        kill_leftovers()
        try:
            self._prepare()
            self._launch_all(timeout)
            self.write_inventory(self.inventory)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self, qemu_timeout=20):
        """SIGTERM every QEMU in both hosts, then end both sshds, then remove the base folder.
        Safe to call at any time: before start(), after a failed start(), twice."""
        began = time.monotonic()
        processes = dict((host.process.pid, host.process) for host in self.hosts if host.process is not None)
        pids = set(processes)
        # Hosts of this pair that this object no longer knows of (an interrupted start()).
        pids.update(entry["pid"] for entry in find_hosts() if entry.get("base") == self.base)
        try:
            self.stopped_qemus = end_hosts(sorted(pids), processes, qemu_timeout=qemu_timeout)
        finally:
            for host in self.hosts:
                host.process = None
        _remove_state(self.base)
        self.stop_seconds = time.monotonic() - began

    def _private_roots(self):
        """The folders the hosts have their own of, the one holding the base folder last."""
        roots = []
        for root in PRIVATE_ROOTS:
            if os.path.isdir(root) and not os.path.islink(root):
                roots.append(os.path.realpath(root))
        if not any(_under(self.base, root) for root in roots):
            roots.append(self.base)  # hides the other host's state and the controller's key
        return sorted(roots, key=lambda root: _under(self.base, root))

    def _prepare(self):
        os.makedirs(self.base, exist_ok=True)
        with open(os.path.join(self.base, STAMP), "w", encoding="utf-8") as handle:
            handle.write("qemu.qmp test hosts, owner %s\n" % self.owner)
        os.makedirs(self.controller, mode=0o700, exist_ok=True)
        os.makedirs(self.shared, exist_ok=True)
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        if not os.path.exists(self.key):
            subprocess.run(keygen + ["-C", "qemu-qmp-test-controller", "-f", self.key], check=True)
        with open(self.key + ".pub", encoding="utf-8") as handle:
            public_key = handle.read()
        shadow = self._unlocked_shadow()
        for host in self.hosts:
            for folder, mode in (("ssh", 0o700), ("run", 0o750), ("lib/shared", 0o755), ("root/.ssh", 0o700)):
                os.makedirs(os.path.join(host.state, folder), mode=mode, exist_ok=True)
            os.chmod(os.path.join(host.state, "root"), 0o700)
            for index in range(len(self._private_roots())):
                os.makedirs(os.path.join(host.state, "stage", str(index)), exist_ok=True)
            host_key = os.path.join(host.state, "ssh", "ssh_host_ed25519_key")
            if not os.path.exists(host_key):
                subprocess.run(keygen + ["-C", host.name, "-f", host_key], check=True)
            authorized = os.path.join(host.state, "root", ".ssh", "authorized_keys")
            with open(authorized, "w", encoding="utf-8") as handle:
                handle.write(public_key)
            os.chmod(authorized, 0o600)
            if shadow is not None:
                path = os.path.join(host.state, "ssh", "shadow")
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as handle:
                    handle.write(shadow)

    @staticmethod
    def _unlocked_shadow():
        """With UsePAM no, sshd refuses a locked account ("!" in /etc/shadow) even with a key:
        the hosts then get a copy of /etc/shadow where root is only without a password ("*")."""
        try:
            with open("/etc/shadow", encoding="utf-8") as handle:
                lines = handle.read().splitlines(True)
        except OSError:
            return None
        for index, line in enumerate(lines):
            fields = line.split(":")
            if fields[0] == "root" and len(fields) > 1 and fields[1].startswith("!"):
                fields[1] = "*"
                lines[index] = ":".join(fields)
                return "".join(lines)
        return None

    def _init_script(self, host):
        """What runs as PID 1 inside the new namespaces before it becomes sshd: the host's own mounts.

        Each private folder is built on a stage (a folder in the host's state) and then moved over
        the machine's: a tmpfs (/run, /tmp, /dev/shm, the base folder), the host's state (/root),
        or a tmpfs holding every entry of the machine's own plus the host's qemu-qmp (/var/lib).
        The folders that must stay visible are bound into the stage first. The stage of the folder
        holding the base folder is moved last, so the stages and the state stay reachable until then.
        No mount point is a folder of the machine's, which could be removed under the host."""
        q = shlex.quote

        def bind(source, target):
            lines.append("mount -n --bind %s %s" % (q(source), q(target)))

        lines = ["set -e", "hostname " + q(host.name)]
        if os.path.exists(os.path.join(host.state, "ssh", "shadow")):
            bind(os.path.join(host.state, "ssh", "shadow"), "/etc/shadow")
        keep = []
        for path in [os.path.join(host.state, "ssh")] + self.visible:
            path = os.path.realpath(path)
            if os.path.isdir(path) and path not in keep:
                keep.append(path)
        keep = [path for path in keep if not any(other != path and _under(path, other) for other in keep)]
        for index, root in enumerate(self._private_roots()):
            stage = os.path.join(host.state, "stage", str(index))
            if root == "/root":
                bind(os.path.join(host.state, "root"), stage)
            elif root == "/run":
                lines.append("mount -n -t tmpfs -o mode=755 qmp-test-run %s" % q(stage))
                lines.append("mkdir -m 755 %s %s" % (q(stage + "/sshd"), q(stage + "/lock")))
                run_dir = stage + RUN_DIR[len(root):]
                lines.append("mkdir -p -m 750 %s" % q(run_dir))
                bind(host.run_dir_outside, run_dir)
            elif root == os.path.dirname(LIB_DIR):
                lines.append("mount -n -t tmpfs -o mode=755 qmp-test-lib %s" % q(stage))
                for entry in sorted(os.scandir(root), key=lambda entry: entry.name):
                    target = os.path.join(stage, entry.name)
                    if entry.path == LIB_DIR:
                        continue
                    if entry.is_symlink():
                        lines.append("ln -s %s %s" % (q(os.readlink(entry.path)), q(target)))
                    elif entry.is_dir():
                        lines.append("mkdir %s" % q(target))
                        bind(entry.path, target)
                    elif entry.is_file():
                        lines.append(": > %s" % q(target))
                        bind(entry.path, target)
                lib_dir = stage + LIB_DIR[len(root):]
                lines.append("mkdir -m 755 %s" % q(lib_dir))
                bind(host.lib_dir_outside, lib_dir)
                bind(self.shared, stage + SHARED_DIR[len(root):])
                keep = [path for path in keep if not _under(path, root)]  # visible already
            elif root in ("/tmp", "/dev/shm"):
                lines.append("mount -n -t tmpfs -o mode=1777 qmp-test-tmp %s" % q(stage))
            else:
                lines.append("mount -n -t tmpfs -o mode=755,size=1m qmp-test-hidden %s" % q(stage))
            for path in keep:
                if path != root and _under(path, root):
                    inside = stage + path[len(root.rstrip("/")):]
                    lines.append("mkdir -p %s" % q(inside))
                    bind(path, inside)
            lines.append("mount -n --move %s %s" % (q(stage), q(root)))
        lines.append("exec %s -D -e -f %s" % (q(self.sshd), q(os.path.join(host.state, "ssh", "sshd_config"))))
        return "\n".join(lines) + "\n"

    def _launch(self, host):
        host.port = free_port(host.address)
        with open(os.path.join(host.state, "ssh", "sshd_config"), "w", encoding="utf-8") as handle:
            handle.write(SSHD_CONFIG.format(name=host.name, address=host.address, port=host.port, state=host.state))
        self._write_known_hosts()
        argv = []
        if self.die_with_owner and shutil.which("setpriv") and threading.current_thread() is threading.main_thread():
            # When the test run dies (SIGKILL, a crash), its hosts die with it.
            argv = ["setpriv", "--pdeathsig", "KILL"]
        argv += ["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "--propagation", "private", "--", "/bin/sh", "-c", self._init_script(host),
                 MARKER, "host=" + host.name, "owner=" + self.owner, "base=" + self.base]
        with open(host.log, "wb") as log:
            host.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            cwd="/", env=HOST_ENV, start_new_session=True)

    def _write_known_hosts(self):
        lines = []
        for host in self.hosts:
            path = os.path.join(host.state, "ssh", "ssh_host_ed25519_key.pub")
            if host.port and os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    key = " ".join(handle.read().split()[:2])
                lines.append("[%s]:%d %s\n" % (host.address, host.port, key))
        with open(self.known_hosts + ".new", "w", encoding="utf-8") as handle:
            handle.writelines(lines)
        os.replace(self.known_hosts + ".new", self.known_hosts)

    def _launch_all(self, timeout):
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            self._launch(host)
        pending, attempts = list(self.hosts), 0
        while pending:
            # Both hosts answer at the same time; only this thread starts processes (see _launch).
            with concurrent.futures.ThreadPoolExecutor(len(pending)) as pool:
                ready = list(pool.map(lambda host: self._wait_ready(host, deadline), pending))
            pending = [host for host, ok in zip(pending, ready) if not ok]
            attempts += 1
            for host in pending:
                log = _read(host.log).decode(errors="replace")
                host.process.wait(5)
                if "Address already in use" not in log or attempts >= 5:
                    raise RuntimeError("%s did not start (exit status %s); its log:\n%s"
                                       % (host.name, host.process.returncode, log[-3000:]))
                self._launch(host)  # another process took the port first: take another one

    def _wait_ready(self, host, deadline):
        """True once the host answers over SSH with its own name; False when its sshd ended."""
        while True:
            if host.process.poll() is not None:
                return False
            # While ssh waits (for a banner that may never come from a process that took the
            # port), watch the sshd: it ends at once when it cannot listen.
            with subprocess.Popen(host.ssh_argv() + ["--", "hostname"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) as proc:
                while proc.poll() is None and host.process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                if proc.poll() is None:
                    proc.kill()
                out, err = proc.communicate()
            if proc.returncode == 0 and out.strip() == host.name:
                return True
            if host.process.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise RuntimeError("%s does not answer over SSH on %s:%s: %s\nits log:\n%s"
                                   % (host.name, host.address, host.port, err.strip(),
                                      _read(host.log).decode(errors="replace")[-3000:]))
            time.sleep(0.05)
