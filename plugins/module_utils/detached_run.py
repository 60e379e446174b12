# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Long work on the managed host, in one detached process that a controller follows.

A module call starts the work in a daemon process (double fork, new session,
no inherited descriptors) and waits for it up to a few seconds: short work
ends within the module call. Longer work goes on by itself; the controller
(the action plugin of the same name) then reads its status file on each
poll with a one-line Python command, not a module. Each poll touches a
heartbeat file: when polls stop for `controller_timeout` seconds (the
controller was killed, the job cancelled, the connection lost), the work is
told to stop and undo what it did.

A run's files live in a private folder of the host (RUNS_DIR/<run id>):
status.json (replaced whole, so a reader never sees half of it), heartbeat,
and `alive`, which the worker holds locked for as long as it lives, so a
poller can tell a dead worker from a slow one without trusting a pid.

The worker only uses code imported before the fork: Ansible removes the
module's payload when the module call returns.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
import uuid

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_module import error_result

RUNS_DIR_ENV = "QMP_RUNS_DIR"


class Abandoned(QMPError):
    """The controller stopped following the run, or the run was asked to stop."""


def runs_dir():
    """The private folder of this user's runs (in the shared temporary folder: checked to be ours alone)."""
    if os.environ.get(RUNS_DIR_ENV):
        os.makedirs(os.environ[RUNS_DIR_ENV], mode=0o700, exist_ok=True)
        return os.environ[RUNS_DIR_ENV]
    base = os.path.join(tempfile.gettempdir(), "qemu-qmp-runs-%d" % os.getuid())
    os.makedirs(base, mode=0o700, exist_ok=True)
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise QMPError("%s is not a private folder of this user (owner %d, mode %o): remove it, or set %s"
                       % (base, info.st_uid, stat.S_IMODE(info.st_mode), RUNS_DIR_ENV))
    return base


def unlink_quietly(path):
    """Remove a file that may already be gone (cleaning up after a failure)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json(path, data, durable=False, mode=0o600, indent=None):
    """Replace the file at `path` with `data` as JSON, whole or not at all (a reader never sees half of it).

    With `durable`, the data and the rename are on disk when it returns. The
    temporary file is `.NAME.<random>.tmp` beside it.
    """
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, separators=(",", ": ") if indent else (",", ":"), indent=indent,
                      sort_keys=bool(indent), default=str)
            if indent:
                handle.write("\n")
            os.fchmod(handle.fileno(), mode)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if durable:
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def read_status(run_dir):
    """The run's status, with `alive` telling whether its worker still lives."""
    try:
        with open(os.path.join(run_dir, "status.json"), encoding="utf-8") as handle:
            status = json.load(handle)
    except (OSError, ValueError) as exc:
        status = {"state": "unknown", "error": str(exc)}
    status["alive"] = _worker_alive(run_dir)
    return status


def _worker_alive(run_dir):
    try:
        fd = os.open(os.path.join(run_dir, "alive"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# What the controller runs on each poll, with the interpreter that ran the module:
# touch the heartbeat, print the status, and whether the worker lives. When the
# run is done, its folder goes: the result has been read.
POLL_SCRIPT = (
    "import fcntl,json,os,shutil,sys\n"
    "d=sys.argv[1]\n"
    "try:\n os.utime(os.path.join(d,'heartbeat'))\nexcept OSError:\n pass\n"
    "try:\n s=json.load(open(os.path.join(d,'status.json')))\nexcept (OSError,ValueError) as e:\n"
    " s={'state':'unknown','error':str(e)}\n"
    "a=False\n"
    "try:\n f=os.open(os.path.join(d,'alive'),os.O_RDONLY)\n"
    " try:\n  fcntl.flock(f,fcntl.LOCK_SH|fcntl.LOCK_NB)\n except OSError:\n  a=True\n"
    " os.close(f)\nexcept OSError:\n pass\n"
    "s['alive']=a\n"
    "print(json.dumps(s))\n"
    "if s.get('state')=='done' or (not a and s.get('state')!='unknown'):\n shutil.rmtree(d,True)\n"
)


class Reporter:
    """What a worker tells its controller: the current step and its progress."""

    # Progress lines are written at most this often; a new step is written at once.
    MIN_INTERVAL = 0.25

    def __init__(self, run_dir=None, controller_timeout=None):
        self.run_dir = run_dir
        self.controller_timeout = controller_timeout
        self.state = {"state": "running", "phase": "", "line": ""}
        self._written = 0.0
        self._stop = False
        self.can_abandon = True
        # The heartbeat's last mtime and when (monotonic) it was seen to change: wall clocks jump.
        self._beat = (None, time.monotonic())

    def stop(self, *dummy):
        self._stop = True

    def _write(self):
        if self.run_dir is None:
            return
        self.state["updated"] = time.time()
        write_json(os.path.join(self.run_dir, "status.json"), self.state)
        self._written = time.monotonic()

    def phase(self, text):
        self.state["phase"] = text
        self.state["line"] = text
        self._write()
        self.check()

    def progress(self, line):
        self.state["line"] = line
        if time.monotonic() - self._written >= self.MIN_INTERVAL:
            self._write()
        self.check()

    def check(self):
        """Raise Abandoned when the run must stop (only where it still can)."""
        if not self.can_abandon:
            return
        if self._stop:
            raise Abandoned("the run was asked to stop (SIGTERM)")
        if self.run_dir is None or not self.controller_timeout:
            return
        try:
            mtime = os.stat(os.path.join(self.run_dir, "heartbeat")).st_mtime_ns
        except OSError:
            return
        now = time.monotonic()
        if mtime != self._beat[0]:
            self._beat = (mtime, now)
        quiet = now - self._beat[1]
        if quiet > self.controller_timeout:
            raise Abandoned("its controller stopped following it %d seconds ago (killed, cancelled, or its "
                            "connection lost)" % quiet)

    def finish(self, result):
        self.state.update({"state": "done", "result": result})
        self._write()


def _sweep(base):
    """Remove the folders of runs whose worker is gone and whose result nobody read within a day."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            if time.time() - os.stat(path).st_mtime > 86400 and not _worker_alive(path):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def start(work, wait, controller_timeout):
    """Run `work(reporter)` in a detached process; wait up to `wait` seconds for its result.

    `work` returns the module result (a dict); an exception becomes a failed
    result. Returns (finished, status): the result when it finished within
    `wait`, else the status with `run` = {id, dir, python} for the controller.
    """
    base = runs_dir()
    _sweep(base)
    run_id = uuid.uuid4().hex[:16]
    run_dir = os.path.join(base, run_id)
    os.mkdir(run_dir, 0o700)
    open(os.path.join(run_dir, "heartbeat"), "a").close()
    write_json(os.path.join(run_dir, "status.json"), {"state": "starting", "phase": "starting", "line": ""})
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        _child(work, run_dir, read_end, write_end, controller_timeout)
    os.close(write_end)
    os.waitpid(pid, 0)
    info = {"id": run_id, "dir": run_dir, "python": sys.executable}
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        # First until the worker is up (it holds `alive`, or it ended): a loaded host may take a while.
        said = b""
        while b"started" not in said:
            ready, dummy, dummy = select.select([pipe], [], [], 60)
            chunk = pipe.read(4096) if ready else b""
            if not chunk:
                break
            said += chunk
        deadline = time.monotonic() + max(0.0, wait)
        while b"done" not in said and chunk:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, dummy, dummy = select.select([pipe], [], [], remaining)
            if ready:
                chunk = pipe.read(4096)
                said += chunk
    status = read_status(run_dir)
    settle = time.monotonic() + 2
    while status.get("state") != "done" and status["alive"] and (not chunk or b"done" in said) \
            and time.monotonic() < settle:
        # The worker closed its end: its lock goes a moment later.
        time.sleep(0.01)
        status = read_status(run_dir)
    if status.get("state") == "done":
        shutil.rmtree(run_dir, ignore_errors=True)
        return True, status["result"]
    if not status["alive"]:
        shutil.rmtree(run_dir, ignore_errors=True)
        return True, {"failed": True, "run_ended": "killed", "msg": "the detached run ended without a result: %s"
                      % (status.get("error") or status.get("phase") or "unknown")}
    status["run"] = info
    return False, status


def _child(work, run_dir, read_end, write_end, controller_timeout):  # pragma: no cover - runs in the child
    code = 0
    try:
        os.close(read_end)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        keep = sorted({write_end})
        os.closerange(3, keep[0])
        os.closerange(keep[-1] + 1, _max_fd())
        os.chdir("/")
        alive = os.open(os.path.join(run_dir, "alive"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(alive, fcntl.LOCK_EX)
        os.write(write_end, b"started\n")
        reporter = Reporter(run_dir, controller_timeout)
        signal.signal(signal.SIGTERM, reporter.stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        reporter.state["pid"] = os.getpid()
        reporter.state["host"] = socket.gethostname()
        reporter.phase("starting")
        try:
            result = work(reporter)
        except Exception as exc:  # pylint: disable=broad-except
            # The module would show a traceback; a detached run reports one as a plain failure.
            result = {"failed": True, "msg": "%s: %s" % (type(exc).__name__, exc),
                      "exception": traceback.format_exc()}
        reporter.finish(result)
        try:
            os.write(write_end, b"done\n")
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
    except BaseException as exc:  # pylint: disable=broad-except
        code = 1
        try:
            write_json(os.path.join(run_dir, "status.json"), {
                "state": "done", "result": {"failed": True, "msg": "the detached run failed to start: %s: %s"
                                            % (type(exc).__name__, exc), "exception": traceback.format_exc()}})
        except BaseException:  # pylint: disable=broad-except
            pass
    finally:
        os._exit(code)


def _max_fd():
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 1 << 20)
    except (ValueError, OSError):
        return 4096


# -- the module's side ---------------------------------------------------------


def failure(exc, extra=None):
    """A QMP or engine error as a failed module result (the one conversion the detached runs use)."""
    msg, fields = error_result(exc)
    fields.update(extra or {})
    fields.update(failed=True, msg=msg)
    return fields


def finish(qm, result):
    """Exit with a result of an engine: its warnings shown as Ansible warnings, and kept as `messages`."""
    warnings = result.pop("warnings", None) or []
    result.setdefault("messages", list(warnings))
    result.setdefault("qmp_commands", qm.commands)
    for warning in warnings:
        qm.module.warn(warning)
    if result.get("failed"):
        qm.module.fail_json(**result)
    qm.module.exit_json(**result)


def run_or_follow(qm, run, poll_interval, controller_timeout):
    """Run `run(reporter)` detached; exit with its result, or with what the action plugin needs to follow it."""
    # Never shorter than a few polls: a slow poll must not look like a controller gone.
    controller_timeout = max(controller_timeout, 3 * poll_interval + 5)
    try:
        finished, status = start(run, poll_interval, controller_timeout)
    except QMPError as exc:
        finish(qm, failure(exc))
    except OSError as exc:
        finish(qm, {"failed": True, "msg": "cannot start the run: %s (%s)" % (exc.strerror or exc, exc.filename)})
    if not finished:
        qm.module.exit_json(changed=True, running=True, run=status["run"], line=status.get("line", ""),
                            poll_interval=poll_interval, controller_timeout=controller_timeout)
    finish(qm, status)
