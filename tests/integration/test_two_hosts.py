# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The two SSH hosts the cross-host tests run on (two_hosts.py): Ansible reaches them as
ordinary hosts, each keeps its own run folder, processes and QEMUs, both see one shared
folder, and stopping them ends every QEMU with SIGTERM and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient, QMPError
from harness import COLLECTIONS, GUEST_DIR, ROOT, qemu_binary, short_tmpdir
from two_hosts import RUN_DIR, SHARED_DIR, TwoHosts, default_visible, find_hosts, kill_leftovers, unavailable_reason, worker_addresses

QEMU_7 = "/usr/bin/qemu-system-x86_64"
QEMU_10 = os.path.join(ROOT, ".cache", "qemu10", "bin", "qemu-system-x86_64")
HERE = os.path.dirname(os.path.abspath(__file__))


def unique():
    return "t" + uuid.uuid4().hex[:8]


def qemu_argv(name, socket_path, binary=None):
    """A QEMU with no guest, paused (-S), answering QMP on `socket_path`."""
    return [binary or qemu_binary(), "-name", name, "-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
            "-no-user-config", "-S", "-display", "none", "-qmp", "unix:%s,server=on,wait=off" % socket_path]


def qemu_major(binary):
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.split("version", 1)[1].split(".")[0])


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def listening(port):
    """Local addresses of the TCP sockets listening on `port` (ss)."""
    out = subprocess.run(["ss", "-Hltn", "sport = :%d" % port], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[3] for line in out.splitlines() if line.strip())


def wait_for(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def answers_qmp(path):
    """QEMU runs a QMP command on `path`: its main loop runs, so it handles SIGTERM now (the QMP
    greeting alone comes from the monitor's own thread, possibly before that)."""
    try:
        with QMPClient(socket_path=path, timeout=5) as client:
            return bool(client.execute("query-status"))
    except (OSError, QMPError):
        return False


def start_logged_qemu(host, name):
    """Start a QEMU in `host`, detached, its stderr in the shared folder (which outlives the hosts)."""
    host.run(["setsid", "-f", "/bin/sh", "-c", 'exec "$0" "$@" </dev/null >/dev/null 2>%s/%s.err' % (SHARED_DIR, name)]
             + qemu_argv(name, "%s/%s.qmp" % (RUN_DIR, name)))
    wait_for(lambda: answers_qmp(os.path.join(host.run_dir_outside, name + ".qmp")))


@pytest.fixture
def pair_factory():
    """Pairs of hosts of the test's own (the shared `two_hosts` pair stays up); all stopped at the end."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    made = []

    def make(**kwargs):
        hosts = TwoHosts(short_tmpdir("qmpxt"), **kwargs)
        made.append(hosts)
        return hosts

    yield make
    for hosts in made:
        hosts.stop()


@pytest.fixture
def kept_folder():
    """A folder of the test's own, outside any pair's base folder (so it outlives the pair)."""
    path = short_tmpdir("qmpxk")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_each_worker_has_its_own_addresses(two_hosts):
    assert worker_addresses("") == worker_addresses("master") == ("127.0.0.2", "127.0.0.3")
    assert worker_addresses("gw0") == ("127.0.0.2", "127.0.0.3")
    assert worker_addresses("gw1") == ("127.0.0.4", "127.0.0.5")
    assert (two_hosts.host1.address, two_hosts.host2.address) == worker_addresses()
    # Each sshd listens on its own address only, on a port nothing else used.
    for host in two_hosts:
        assert listening(host.port) == ["%s:%d" % (host.address, host.port)]


def test_ansible_reaches_both_hosts(two_hosts, ansible):
    play = [{"name": "both hosts", "hosts": "qemu_hosts", "gather_facts": False, "tasks": [
        {"name": "who answers", "ansible.builtin.shell": 'echo "{{ inventory_hostname }} $(hostname) $(id -un)"',
         "changed_when": False},
    ]}]
    records, proc = ansible.playbook(json.dumps(play), args=["-i", two_hosts.inventory])
    assert [r["status"] for r in records] == ["ok", "ok"], proc.stdout + proc.stderr
    assert sorted(r["result"]["stdout"] for r in records) == ["host1 host1 root", "host2 host2 root"]


def test_run_folders_are_private_and_the_shared_folder_is_shared(two_hosts):
    name = unique()
    host1, host2 = two_hosts.host1, two_hosts.host2
    host1.ssh("echo run > {run}/{n} && echo lib > /var/lib/qemu-qmp/{n} && echo tmp > /tmp/{n} && echo shared > {shared}/{n}"
              .format(run=RUN_DIR, shared=SHARED_DIR, n=name))
    try:
        assert host1.ssh(["cat", "%s/%s" % (RUN_DIR, name), "/var/lib/qemu-qmp/" + name, "/tmp/" + name]).stdout == "run\nlib\ntmp\n"
        seen = host2.ssh("for f in {run}/{n} /var/lib/qemu-qmp/{n} /tmp/{n}; do test ! -e $f || echo $f; done; cat {shared}/{n}"
                         .format(run=RUN_DIR, shared=SHARED_DIR, n=name))
        assert seen.stdout == "shared\n"
        # As the machine sees it: in host1's state folder and the shared folder, nowhere else.
        assert os.path.exists(os.path.join(host1.run_dir_outside, name))
        assert not os.path.exists(os.path.join(host2.run_dir_outside, name))
        assert not os.path.exists(os.path.join(RUN_DIR, name)) and not os.path.exists(os.path.join("/tmp", name))
        with open(os.path.join(two_hosts.shared, name), encoding="utf-8") as handle:
            assert handle.read() == "shared\n"
    finally:
        os.unlink(os.path.join(two_hosts.shared, name))
        os.unlink(os.path.join(host1.run_dir_outside, name))
        os.unlink(os.path.join(host1.lib_dir_outside, name))


def test_qemu_and_the_test_guest_run_inside_the_hosts(two_hosts):
    binaries = sorted(set(b for b in (qemu_binary(), QEMU_7, QEMU_10) if os.path.exists(b)))
    guest = [os.path.join(GUEST_DIR, f) for f in ("vmlinuz", "initrd.gz") if os.path.exists(os.path.join(GUEST_DIR, f))]
    for host in two_hosts:
        assert host.run(["hostname"]).stdout == host.name + "\n"
        for binary in binaries:
            assert host.run([binary, "--version"]).stdout.startswith("QEMU emulator version"), binary
        for path in guest:
            host.run(["test", "-r", path])
        # Its own processes only: its sshd is PID 1, the test run is not there.
        names = host.run(["ps", "-e", "-o", "pid=,comm="]).stdout.split()
        assert names[:2] == ["1", "sshd"] and "pytest" not in names and not [n for n in names if n.startswith("python")], names


def test_qemu_started_on_host1_answers_on_host1_only(two_hosts, ansible):
    name = unique()
    sock = "%s/%s.qmp" % (RUN_DIR, name)
    pidfile = "%s/%s.pid" % (RUN_DIR, name)
    play = [
        {"name": "on host1", "hosts": "host1", "gather_facts": False, "tasks": [
            {"name": "start QEMU", "ansible.builtin.command": {"argv": qemu_argv(name, sock) + ["-daemonize", "-pidfile", pidfile]}},
            {"name": "query it", "qemu.qmp.qmp_info": {"socket": sock, "gather": ["version", "status"]}},
        ]},
        {"name": "on host2", "hosts": "host2", "gather_facts": False, "tasks": [
            {"name": "look for its socket", "ansible.builtin.stat": {"path": sock}},
        ]},
    ]
    try:
        records, proc = ansible.playbook(json.dumps(play), args=["-i", two_hosts.inventory])
        assert [r["status"] for r in records] == ["ok", "ok", "ok"], proc.stdout + proc.stderr
        info, stat = records[1]["result"], records[2]["result"]
        assert info["status"] == "prelaunch" and info["running"] is False
        assert info["version"]["major"] == qemu_major(qemu_binary())
        assert stat["stat"]["exists"] is False
        assert len(two_hosts.host1.qemu_pids()) == 1 and two_hosts.host2.qemu_pids() == []
        assert os.path.exists(os.path.join(two_hosts.host1.run_dir_outside, name + ".qmp"))
        assert not os.path.exists(os.path.join(two_hosts.host2.run_dir_outside, name + ".qmp"))
    finally:
        two_hosts.host1.run(["sh", "-c", 'test ! -e "$0" || kill "$(cat "$0")"', pidfile], check=False)
    wait_for(lambda: two_hosts.host1.qemu_pids() == [])


def test_stop_terminates_every_qemu_then_ends_the_hosts(pair_factory, kept_folder):
    # A folder under /tmp stays visible inside the hosts at its own path, as a checkout under /tmp does.
    visible = short_tmpdir("qmpxv")
    try:
        with open(os.path.join(visible, "probe"), "w", encoding="utf-8") as handle:
            handle.write("seen")
        hosts = pair_factory(shared=kept_folder, visible=default_visible() + [visible])
        hosts.start()
        assert hosts.host2.run(["cat", visible + "/probe"]).stdout == "seen"
    finally:
        shutil.rmtree(visible)
    start_logged_qemu(hosts.host1, "one")
    start_logged_qemu(hosts.host2, "two")
    qemus = hosts.host1.qemu_pids() + hosts.host2.qemu_pids()
    assert len(qemus) == 2
    inits = [host.init_pid for host in hosts]
    unshares = [host.process.pid for host in hosts]
    ports = [(host.address, host.port) for host in hosts]

    hosts.stop()
    assert sorted(pid for pid, argv in hosts.stopped_qemus) == sorted(qemus)
    for name in ("one", "two"):
        with open(os.path.join(kept_folder, name + ".err"), encoding="utf-8") as handle:
            assert "terminating on signal 15" in handle.read()
    assert not any(alive(pid) for pid in qemus + inits + unshares)
    assert not os.path.exists(hosts.base)
    assert [entry for entry in find_hosts() if entry.get("base") == hosts.base] == []
    for address, port in ports:
        assert "%s:%d" % (address, port) not in listening(port)
    hosts.stop()  # again: nothing to do


def test_stop_after_a_failed_start_leaves_nothing(pair_factory):
    never = pair_factory()
    never.stop()
    assert not os.path.exists(never.base)
    hosts = pair_factory(sshd="/bin/false")
    with pytest.raises(RuntimeError, match="host1 did not start"):
        hosts.start()
    assert not os.path.exists(hosts.base)
    assert [entry for entry in find_hosts() if entry.get("base") == hosts.base] == []
    hosts.stop()


def test_a_port_taken_meanwhile_is_replaced(pair_factory, monkeypatch):
    module = sys.modules[TwoHosts.__module__]
    address = worker_addresses()[0]
    with socket.socket() as taken:
        taken.bind((address, 0))
        taken.listen()
        port = taken.getsockname()[1]
        picked, real = [], module.free_port

        def free_port(where):
            picked.append(where)
            return port if len(picked) == 1 else real(where)

        monkeypatch.setattr(module, "free_port", free_port)
        hosts = pair_factory()
        hosts.start()
        assert picked == [address, worker_addresses()[1], address]
        assert hosts.host1.port != port and hosts.host1.ssh(["hostname"]).stdout == "host1\n"


CHILD = """
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from two_hosts import TwoHosts
hosts = TwoHosts(sys.argv[3], shared=sys.argv[4], die_with_owner=sys.argv[5] == "yes")
hosts.start()
print(hosts.host1.init_pid, hosts.host2.init_pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("die_with_owner", [True, False], ids=["die-with-owner", "left-running"])
def test_hosts_of_a_killed_test_run_do_not_outlive_it(die_with_owner, kept_folder):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = short_tmpdir("qmpxl")
    child = subprocess.Popen([sys.executable, "-c", CHILD, HERE, COLLECTIONS, base, kept_folder, "yes" if die_with_owner else "no"],
                             stdout=subprocess.PIPE, text=True)
    try:
        inits = [int(pid) for pid in child.stdout.readline().split()]
        assert len(inits) == 2, "the hosts did not start"
        hosts = TwoHosts(base, shared=kept_folder)  # the same pair, as this process sees it
        subprocess.run(["nsenter", "--target", str(inits[0]), "--mount", "--pid", "--", "setsid", "-f", "/bin/sh", "-c",
                        'exec "$0" "$@" </dev/null >/dev/null 2>%s/left.err' % SHARED_DIR] + qemu_argv("left", RUN_DIR + "/left.qmp"), check=True)
        wait_for(lambda: answers_qmp(os.path.join(hosts.host1.run_dir_outside, "left.qmp")))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()

    def ours():
        return [entry for entry in find_hosts() if entry.get("base") == base]

    if die_with_owner:
        # The hosts die with the process that started them, their QEMUs with them (SIGKILL).
        wait_for(lambda: ours() == [] and not any(alive(pid) for pid in inits), timeout=5)
        shutil.rmtree(base)
    else:
        assert len(ours()) == 2
        ended = kill_leftovers()
        assert sorted(entry["host"] for entry in ended if entry.get("base") == base) == ["host1", "host2"]
        assert ours() == [] and not any(alive(pid) for pid in inits)
        with open(os.path.join(kept_folder, "left.err"), encoding="utf-8") as handle:
            assert "terminating on signal 15" in handle.read()
        assert not os.path.exists(base)
