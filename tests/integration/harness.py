# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Real QEMU processes and real Ansible runs for the integration tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPClient
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_schema import QMPSchema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(ROOT, "build", "collections")
CALLBACKS = os.path.join(ROOT, "tests", "integration", "callback")
GUEST_DIR = os.environ.get("QMP_TEST_GUEST", os.path.join(ROOT, ".cache", "guest"))


def qemu_binary():
    return os.environ.get("QEMU_BINARY") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


class VM:
    """One QEMU process with two QMP sockets: `socket` for the modules under
    test and `probe_socket` for the test's own queries (a QMP socket serves one
    client at a time)."""

    def __init__(self, workdir, name="vm", binary=None, guest=False, paused=True, args=(),
                 qmp_socket=True, append=""):
        self.workdir = workdir
        self.name = name
        self.binary = binary or qemu_binary()
        self.guest = guest
        self.append = append
        self.paused = paused
        self.args = list(args)
        self.socket = os.path.join(workdir, name + ".qmp") if qmp_socket else None
        self.probe_socket = os.path.join(workdir, name + ".probe")
        self.serial_log = os.path.join(workdir, name + ".serial")
        self.stderr_log = os.path.join(workdir, name + ".stderr")
        self.process = None

    def command_line(self):
        cmd = [self.binary, "-name", self.name, "-machine", "q35", "-accel", "tcg",
               "-m", "256", "-display", "none", "-nodefaults", "-no-user-config",
               "-qmp", "unix:%s,server=on,wait=off" % self.probe_socket]
        if self.socket:
            cmd += ["-qmp", "unix:%s,server=on,wait=off" % self.socket]
        if self.paused:
            cmd.append("-S")
        if self.guest:
            cmd += ["-kernel", os.path.join(GUEST_DIR, "vmlinuz"),
                    "-initrd", os.path.join(GUEST_DIR, "initrd.gz"),
                    "-append", ("console=ttyS0 panic=-1 quiet " + self.append).strip(),
                    "-chardev", "file,id=serial0,path=%s" % self.serial_log,
                    "-serial", "chardev:serial0"]
        return cmd + self.args

    def start(self, timeout=20):
        with open(self.stderr_log, "wb") as err:
            self.process = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                            stdout=err, stderr=err)
        deadline = time.monotonic() + timeout
        wanted = [p for p in (self.socket, self.probe_socket) if p]
        while not all(os.path.exists(p) for p in wanted):
            if self.process.poll() is not None:
                raise RuntimeError("QEMU exited with %s: %s" % (self.process.returncode, self.stderr()))
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not create its QMP sockets: %s" % self.stderr())
            time.sleep(0.02)
        schema_of(self)  # while QEMU runs: a test may make it exit
        return self

    def stderr(self):
        try:
            with open(self.stderr_log, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def serial(self):
        try:
            with open(self.serial_log, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def wait_serial(self, text, timeout=60):
        deadline = time.monotonic() + timeout
        while text not in self.serial():
            if self.process.poll() is not None:
                raise RuntimeError("QEMU exited while waiting for %r: %s" % (text, self.stderr()))
            if time.monotonic() > deadline:
                raise RuntimeError("guest did not print %r within %ss; serial: %s"
                                   % (text, timeout, self.serial()[-2000:]))
            time.sleep(0.1)

    def client(self, timeout=10):
        return QMPClient(socket_path=self.probe_socket, timeout=timeout)

    def qmp(self, command, arguments=None):
        """Run one command on the probe socket: the test's own view of QEMU."""
        with self.client() as client:
            return client.execute(command, arguments)

    def status(self):
        return self.qmp("query-status")["status"]

    def hmp(self, command_line):
        return self.qmp("human-monitor-command", {"command-line": command_line})

    def guest_write(self, device, offset, length, pattern=0xab):
        """Write through the virtio-blk device with qdev id `device`, as a guest would."""
        out = self.hmp('qemu-io -d %s/virtio-backend "write -P 0x%02x %d %d"' % (device, pattern, offset, length))
        assert "error" not in out.lower(), out
        out = self.hmp('qemu-io -d %s/virtio-backend "flush"' % device)
        assert "error" not in out.lower(), out

    def bitmaps(self):
        """{(node, name): BlockDirtyInfo} as QEMU reports them, named bitmaps only."""
        return dict(((n["node-name"], b["name"]), b) for n in self.qmp("query-named-block-nodes")
                    for b in n.get("dirty-bitmaps", []) if b.get("name"))

    def nodes(self):
        return dict((n["node-name"], n) for n in self.qmp("query-named-block-nodes"))

    def jobs(self):
        return dict((j["id"], j) for j in self.qmp("query-jobs"))

    def wait_job(self, job_id, status, timeout=30):
        deadline = time.monotonic() + timeout
        while self.jobs().get(job_id, {}).get("status") != status:
            if time.monotonic() > deadline:
                raise RuntimeError("job %s did not reach %s: %s" % (job_id, status, self.jobs()))
            time.sleep(0.05)

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout=10):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.alive():
            self.process.kill()
            self.process.wait(10)


_SCHEMAS = {}


def schema_of(vm):
    """The QMPSchema of the QEMU binary under test (fetched once per binary)."""
    if vm.binary not in _SCHEMAS:
        with vm.client() as client:
            _SCHEMAS[vm.binary] = QMPSchema(client.execute("query-qmp-schema"))
    return _SCHEMAS[vm.binary]


class AnsibleRunner:
    """Runs modules through real Ansible and returns the task results.

    Every QMP command a module reports in `qmp_commands` is validated against
    the schema of the QEMU under test: a module that would send something the
    running QEMU does not accept fails the test even where QEMU happened to
    be lenient.
    """

    def __init__(self, workdir):
        self.workdir = workdir
        self.schema_cache = os.path.join(workdir, "schema-cache")
        self.count = 0

    def env(self, results, probe_vm=None, probe=None):
        env = dict(os.environ)
        env.update({
            # Results carry the module's arguments (`invocation`), as ansible-core 2.19 gives them and newer
            # ones do when asked: the tests read them, and check that secrets are hidden there.
            "ANSIBLE_INJECT_INVOCATION": "true",
            "ANSIBLE_COLLECTIONS_PATH": COLLECTIONS,
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
            "ANSIBLE_LOCALHOST_WARNING": "false",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
            "ANSIBLE_CALLBACK_PLUGINS": CALLBACKS,
            "ANSIBLE_CALLBACKS_ENABLED": "qmp_test_results",
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "true",
            "ANSIBLE_NOCOLOR": "true",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "QMP_SCHEMA_CACHE": self.schema_cache,
            "QMP_TEST_RESULTS": results,
        })
        env.pop("QMP_SOCKET", None)
        if probe_vm is not None:
            env["QMP_TEST_PROBE_SOCKET"] = probe_vm.probe_socket
            env["QMP_TEST_PROBE"] = json.dumps(probe or [["query-status", None]])
        return env

    def _results_file(self):
        self.count += 1
        return os.path.join(self.workdir, "results-%03d.jsonl" % self.count)

    @staticmethod
    def _read(path):
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def run(self, module, args, check=False, diff=False, vm=None, validate=True, env=None, timeout=300,
            interpreter=None):
        """One module through `ansible localhost -m`; returns its result dict."""
        results = self._results_file()
        cmd = ["ansible", "localhost", "-m", "qemu.qmp." + module, "-a", json.dumps(args)]
        if interpreter:
            cmd += ["-e", json.dumps({"ansible_python_interpreter": interpreter})]
        if check:
            cmd.append("--check")
        if diff:
            cmd.append("--diff")
        run_env = self.env(results)
        run_env.update(env or {})
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout, check=False)
        records = self._read(results)
        assert len(records) == 1, "ansible printed:\n%s\n%s" % (proc.stdout, proc.stderr)
        result = records[0]["result"]
        result["_status"] = records[0]["status"]
        check_result(result)
        if validate and vm is not None:
            assert_commands_valid(vm, result)
        return result

    def playbook(self, text, vm=None, probe=None, validate=True, extra_vars=None, timeout=600, env=None,
                 args=None):
        """Run a playbook (YAML text); returns (records, process) with one record per task result."""
        results = self._results_file()
        path = results.replace(".jsonl", ".yml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        cmd = ["ansible-playbook", "-i", "localhost,", "-c", "local", path] + list(args or [])
        for key, value in (extra_vars or {}).items():
            cmd += ["-e", json.dumps({key: value})]
        run_env = self.env(results, probe_vm=vm, probe=probe)
        run_env.update(env or {})
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=ROOT)
        records = self._read(results)
        for record in records:
            record["result"]["_status"] = record["status"]
            if not record.get("action", "").startswith("qemu.qmp."):
                continue
            check_result(record["result"])
            if validate and vm is not None:
                assert_commands_valid(vm, record["result"])
        return records, proc

    def four_ways(self, module, args, vm, probe=None, validate=True):
        """The four-step pattern: check mode, real, check mode again, real again.

        Returns four records {result, probe}: each module result and QEMU's
        state (the `probe` queries on the test's own socket) right after it.
        """
        tasks = []
        for name, check in (("check", True), ("real", False), ("check again", True), ("real again", False)):
            tasks.append({
                "name": name,
                "qemu.qmp." + module: args,
                "check_mode": check,
                "diff": True,
                "ignore_errors": True,
            })
        play = [{"name": module, "hosts": "localhost", "gather_facts": False, "tasks": tasks}]
        records, proc = self.playbook(json.dumps(play), vm=vm, probe=probe, validate=validate)
        assert len(records) == 4, "ansible-playbook printed:\n%s\n%s" % (proc.stdout, proc.stderr)
        return records


def check_result(result):
    """What every module result must honour, whatever the outcome."""
    text = json.dumps(result)
    assert "Traceback (most recent call last)" not in text, text
    assert "module_stderr" not in result, text
    assert "qmp_commands" in result or result.get("_status") == "skipped" or "msg" in result, text
    if result.get("_status") == "failed":
        assert result.get("msg"), text


def assert_commands_valid(vm, result):
    if result.get("invocation", {}).get("module_args", {}).get("guest_agent"):
        return  # the guest agent's commands are not QEMU's
    schema = schema_of(vm)
    for command in result.get("qmp_commands", []):
        errors = schema.validate(command["execute"], command.get("arguments"))
        assert not errors, "module sent a command QEMU's schema rejects: %s" % errors


def disk_args(image, node="disk0", device="vdisk0", fmt="qcow2"):
    """QEMU arguments for an image opened as node `node` behind virtio-blk device `device`."""
    return ["-blockdev", "driver=file,filename=%s,node-name=%s-file" % (image, node),
            "-blockdev", "driver=%s,file=%s-file,node-name=%s" % (fmt, node, node),
            "-device", "virtio-blk-pci,drive=%s,id=%s" % (node, device)]


def make_image(path, size="64M", fmt="qcow2", *extra):
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *extra, path, size], check=True)
    return path


def changed_flags(records):
    return [r["result"].get("changed") for r in records]


def short_tmpdir(prefix="qmp"):
    """Unix socket paths are limited to 107 bytes: keep test folders short."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


class FakeGuestAgent(threading.Thread):
    """Stands in for qemu-ga, which the tiny test guest does not have: answers guest-sync and
    the file system freeze commands the way the agent does."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(path)
        self.server.listen(4)
        self.commands = []
        self.times = []

    def run(self):
        while True:
            try:
                conn, dummy = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                for line in stream:
                    request = json.loads(line.replace(b"\xff", b""))
                    self.commands.append(request["execute"])
                    self.times.append(time.monotonic())
                    answer = {"guest-sync": request.get("arguments", {}).get("id"),
                              "guest-fsfreeze-freeze": 1, "guest-fsfreeze-thaw": 1}.get(request["execute"], {})
                    reply = {"return": answer}
                    if "id" in request:
                        reply["id"] = request["id"]
                    stream.write(json.dumps(reply).encode() + b"\n")
                    stream.flush()
