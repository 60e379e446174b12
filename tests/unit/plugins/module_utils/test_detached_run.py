# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of detached_run: work in a detached process, its status folder, the poll script, the heartbeat.

start() forks a daemon that runs `work` and ends with os._exit; the fixture
kills any worker a failed test leaves behind.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils import detached_run
from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import (
    POLL_SCRIPT,
    RUNS_DIR_ENV,
    Abandoned,
    Reporter,
    read_status,
    start,
)


@pytest.fixture(name="runs")
def fixture_runs(tmp_path, monkeypatch):
    """The runs folder (QMP_RUNS_DIR); workers still alive at the end are killed."""
    base = str(tmp_path / "runs")
    monkeypatch.setenv(RUNS_DIR_ENV, base)
    yield base
    for run_dir in glob.glob(os.path.join(base, "*")):
        status = read_status(run_dir)
        if status["alive"] and status.get("pid"):
            try:
                os.kill(status["pid"], signal.SIGKILL)
            except OSError:
                pass


def wait_for(predicate, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s did not happen within %gs" % (what, timeout))
        time.sleep(0.02)


def poll(run_dir):
    """Run the controller's poll command; returns the status it prints."""
    answer = subprocess.run([sys.executable, "-c", POLL_SCRIPT, run_dir], capture_output=True, text=True,
                            timeout=30, check=True)
    lines = [line for line in answer.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, answer.stdout
    return json.loads(lines[0])


def started_pid(run_dir):
    """The worker's pid, once it wrote it."""
    return wait_for(lambda: read_status(run_dir).get("pid"), what="the worker's pid in its status")


def slow(seconds, result=None):
    def work(reporter):
        end = time.monotonic() + seconds
        step = 0
        while time.monotonic() < end:
            step += 1
            reporter.progress("step %d" % step)
            time.sleep(0.05)
        return result if result is not None else {"changed": True, "steps": step}
    return work


# -- start -------------------------------------------------------------------------

def test_quick_work_returns_its_result_and_leaves_nothing(runs):
    begin = time.monotonic()
    finished, result = start(lambda reporter: {"changed": True, "x": 1}, 10, 60)
    assert (finished, result) == (True, {"changed": True, "x": 1})
    assert time.monotonic() - begin < 5  # it did not wait out `wait`
    assert os.listdir(runs) == []


def _open_files():
    """{fd: what it is} of this process (None where /proc is not there)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass  # the listing's own descriptor, closed since
    return found


def test_work_runs_detached(runs, tmp_path):
    marker = str(tmp_path / "inherited")
    with open(marker, "w") as inherited:
        assert inherited.fileno() > 2

        def work(reporter):
            reporter.phase("looking around")
            return {"pid": os.getpid(), "sid": os.getsid(0), "cwd": os.getcwd(), "state_pid": reporter.state["pid"],
                    "phase": reporter.state["phase"], "timeout": reporter.controller_timeout,
                    "files": _open_files()}

        finished, result = start(work, 10, 42)
    assert finished
    assert result["pid"] != os.getpid() and result["pid"] == result["state_pid"]
    assert result["sid"] != os.getsid(0)  # a session of its own
    assert result["cwd"] == "/"
    assert result["phase"] == "looking around"
    assert result["timeout"] == 42
    if result["files"] is not None:
        files = sorted(result["files"].values())
        assert marker not in files  # no inherited descriptors
        assert [f for f in files if f != os.devnull and not f.startswith("pipe:") and not f.endswith("/alive")] \
            == [], files
        by_fd = dict((int(fd), f) for fd, f in result["files"].items())  # JSON made the keys strings
        assert [by_fd.get(fd) for fd in (0, 1, 2)] == [os.devnull] * 3


def test_work_that_raises_gives_a_failed_result(runs):
    def work(reporter):
        raise ValueError("boom at 42")

    finished, result = start(work, 10, 60)
    assert finished
    assert result["failed"] is True
    assert result["msg"] == "ValueError: boom at 42"
    assert "Traceback" in result["exception"] and "boom at 42" in result["exception"]
    assert os.listdir(runs) == []


def test_work_that_dies_gives_a_failed_result(runs):
    def work(reporter):
        os.kill(os.getpid(), signal.SIGKILL)

    finished, result = start(work, 10, 60)
    if finished:
        assert result == {"failed": True, "run_ended": "killed", "msg": "the detached run ended without a result: starting"}
    else:
        # The pipe's end can reach start() before the kernel drops the dead worker's lock on `alive`: start() then
        # hands the run to the controller, whose poll tells it is dead.
        run_dir = result["run"]["dir"]
        wait_for(lambda: read_status(run_dir)["alive"] is False, what="the dead worker's lock to go")
        polled = poll(run_dir)
        assert (polled["alive"], polled["state"], polled["phase"]) == (False, "running", "starting")
    assert os.listdir(runs) == []


def test_slow_work_is_followed_by_polls(runs):
    finished, status = start(slow(2.0), 1.0, 60)
    assert not finished
    run = status["run"]
    run_dir = run["dir"]
    assert os.path.dirname(run_dir) == runs
    assert run["id"] == os.path.basename(run_dir)
    assert run["python"] == sys.executable
    assert status["alive"] is True
    assert stat_mode(runs) == 0o700 and stat_mode(run_dir) == 0o700

    now = read_status(run_dir)
    assert now["alive"] is True
    assert now["state"] == "running"
    assert now["pid"] != os.getpid()

    heartbeat = os.path.join(run_dir, "heartbeat")
    os.utime(heartbeat, (1000000000, 1000000000))
    polled = poll(run_dir)
    assert polled["alive"] is True
    assert polled["state"] == "running"
    assert polled["pid"] == now["pid"]
    assert os.stat(heartbeat).st_mtime > time.time() - 60  # the poll touched it
    assert os.path.isdir(run_dir)  # a running run's folder stays

    wait_for(lambda: read_status(run_dir)["state"] == "done", what="the end of the work")
    done = poll(run_dir)
    assert done["state"] == "done"
    assert done["result"]["changed"] is True and done["result"]["steps"] > 10
    assert not os.path.exists(run_dir)  # the result was read: the folder goes


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


def test_poll_of_a_missing_run(tmp_path):
    polled = poll(str(tmp_path / "nope"))
    assert polled["state"] == "unknown"
    assert polled["alive"] is False
    assert "No such file" in polled["error"]


def test_read_status_of_a_missing_run(tmp_path):
    status = read_status(str(tmp_path / "nope"))
    assert status["state"] == "unknown" and status["alive"] is False and "error" in status


def test_read_status_tells_a_locked_alive_file(tmp_path):
    (tmp_path / "status.json").write_text('{"state": "running"}')
    assert read_status(str(tmp_path)) == {"state": "running", "alive": False}  # no `alive` file
    fd = os.open(str(tmp_path / "alive"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert read_status(str(tmp_path))["alive"] is False  # nobody holds it
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert read_status(str(tmp_path))["alive"] is True
        assert poll(str(tmp_path))["alive"] is True
    finally:
        os.close(fd)
    assert read_status(str(tmp_path))["alive"] is False


def test_killed_worker_is_not_alive(runs):
    finished, status = start(slow(30), 1.0, 60)
    assert not finished
    run_dir = status["run"]["dir"]
    pid = started_pid(run_dir)
    assert read_status(run_dir)["alive"] is True
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: read_status(run_dir)["alive"] is False, what="the killed worker's lock to go")
    status = read_status(run_dir)
    assert status["state"] == "running"  # it never wrote a result
    polled = poll(run_dir)
    assert polled["alive"] is False and polled["state"] == "running"
    assert not os.path.exists(run_dir)  # a dead worker's folder goes with the poll that saw it


def test_sigterm_stops_the_work(runs):
    finished, status = start(slow(10), 1.0, 60)
    assert not finished
    run_dir = status["run"]["dir"]
    begin = time.monotonic()
    os.kill(started_pid(run_dir), signal.SIGTERM)
    done = wait_for(lambda: done_status(run_dir), what="the end of the stopped work")
    assert time.monotonic() - begin < 5
    assert done["result"]["failed"] is True
    assert done["result"]["msg"] == "Abandoned: the run was asked to stop (SIGTERM)"


# -- the controller timeout ------------------------------------------------------------

def test_work_stops_when_nobody_follows(runs):
    begin = time.monotonic()
    finished, result = start(slow(10), 8, 1)
    took = time.monotonic() - begin
    assert finished
    assert result["failed"] is True
    assert result["msg"].startswith("Abandoned: its controller stopped following it 1 seconds ago")
    assert 1.0 <= took < 5


def test_work_goes_on_while_its_heartbeat_is_touched(runs):
    stop = threading.Event()

    def touch():
        while not stop.wait(0.2):
            for heartbeat in glob.glob(os.path.join(runs, "*", "heartbeat")):
                try:
                    os.utime(heartbeat)
                except OSError:
                    pass

    toucher = threading.Thread(target=touch, daemon=True)
    toucher.start()
    try:
        finished, result = start(slow(2.5), 10, 1)
    finally:
        stop.set()
        toucher.join()
    assert finished
    assert result.get("failed") is None, result
    assert result["changed"] is True and result["steps"] > 20


# -- Reporter, in this process ---------------------------------------------------------------

@pytest.fixture(name="run_dir")
def fixture_run_dir(tmp_path):
    (tmp_path / "heartbeat").write_text("")
    return str(tmp_path)


def _stale(run_dir):
    """Make the heartbeat change once (as seen by check()), then go quiet."""
    os.utime(os.path.join(run_dir, "heartbeat"), ns=(1, 1))


def test_reporter_check_raises_when_the_heartbeat_is_quiet(run_dir):
    reporter = Reporter(run_dir, 0.1)
    reporter.check()  # sees the heartbeat for the first time
    time.sleep(0.15)
    with pytest.raises(Abandoned, match="its controller stopped following it 0 seconds ago"):
        reporter.check()
    os.utime(os.path.join(run_dir, "heartbeat"), ns=(2, 2))  # a poll
    reporter.check()


def test_reporter_check_with_a_beating_heart(run_dir):
    reporter = Reporter(run_dir, 0.1)
    for index in range(8):
        os.utime(os.path.join(run_dir, "heartbeat"), ns=(index + 10, index + 10))
        reporter.check()
        time.sleep(0.03)


def test_reporter_cannot_abandon_never_raises(run_dir):
    reporter = Reporter(run_dir, 0.01)
    _stale(run_dir)
    reporter.check()  # the last beat it sees
    reporter.can_abandon = False
    reporter.stop(signal.SIGTERM, None)
    time.sleep(0.05)
    reporter.check()
    reporter.progress("still going")
    reporter.phase("committing")
    time.sleep(0.05)
    reporter.check()
    # where it can again, both reasons to stop show
    reporter.can_abandon = True
    with pytest.raises(Abandoned, match="asked to stop"):
        reporter.check()
    reporter._stop = False
    with pytest.raises(Abandoned, match="controller stopped following"):
        reporter.check()


@pytest.mark.parametrize("timeout", [None, 0])
def test_reporter_without_a_controller_timeout_never_times_out(run_dir, timeout):
    reporter = Reporter(run_dir, timeout)
    reporter.check()
    time.sleep(0.05)
    reporter.check()


def test_reporter_without_a_heartbeat_file_never_times_out(tmp_path):
    reporter = Reporter(str(tmp_path), 0.01)
    reporter.check()
    time.sleep(0.05)
    reporter.check()


def test_reporter_without_a_folder_writes_nothing_but_stops_on_sigterm():
    reporter = Reporter()
    reporter.phase("x")
    reporter.progress("y")
    reporter.finish({"changed": False})
    assert reporter.state["state"] == "done"
    reporter.stop()
    with pytest.raises(Abandoned):
        reporter.check()


def _status(run_dir):
    with open(os.path.join(run_dir, "status.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_reporter_writes_progress_at_most_every_min_interval(run_dir):
    reporter = Reporter(run_dir)
    reporter.phase("copying")
    assert _status(run_dir)["line"] == "copying"
    reporter.progress("10%")  # too soon after the phase: kept, not written
    assert reporter.state["line"] == "10%"
    assert _status(run_dir)["line"] == "copying"
    reporter._written -= Reporter.MIN_INTERVAL
    reporter.progress("20%")
    status = _status(run_dir)
    assert (status["phase"], status["line"], status["state"]) == ("copying", "20%", "running")
    assert abs(status["updated"] - time.time()) < 60
    reporter.phase("checking")  # a new step is written at once
    assert _status(run_dir)["line"] == "checking"
    reporter.finish({"changed": True})
    assert _status(run_dir)["state"] == "done" and _status(run_dir)["result"] == {"changed": True}
    assert sorted(os.listdir(run_dir)) == ["heartbeat", "status.json"]  # no temporary files left


# -- old runs ------------------------------------------------------------------------

def test_start_sweeps_old_dead_runs(runs):
    os.makedirs(runs)
    old, fresh, held = (os.path.join(runs, name) for name in ("old", "fresh", "held"))
    for path in (old, fresh, held):
        os.mkdir(path)
        open(os.path.join(path, "alive"), "w").close()
    fd = os.open(os.path.join(held, "alive"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        day_ago = time.time() - 86400 - 60
        os.utime(old, (day_ago, day_ago))
        os.utime(held, (day_ago, day_ago))
        assert start(lambda reporter: {"changed": False}, 10, 60) == (True, {"changed": False})
    finally:
        os.close(fd)
    assert sorted(os.listdir(runs)) == ["fresh", "held"]


def test_runs_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv(RUNS_DIR_ENV, raising=False)
    monkeypatch.setattr(detached_run.tempfile, "gettempdir", lambda: str(tmp_path))
    assert detached_run.runs_dir() == os.path.join(str(tmp_path), "qemu-qmp-runs-%d" % os.getuid())
    assert stat_mode(detached_run.runs_dir()) == 0o700


def test_a_slow_starting_worker_is_not_taken_for_a_dead_one(runs, monkeypatch):
    real_chdir = os.chdir

    def slow_chdir(path):
        if path == "/":  # only the daemon does this, just before it locks `alive`: a loaded host
            time.sleep(1.0)
        return real_chdir(path)

    monkeypatch.setattr(detached_run.os, "chdir", slow_chdir)
    finished, result = start(lambda reporter: {"changed": True}, 0.2, 60)
    if not finished:  # followed like any slow run
        run_dir = result["run"]["dir"]
        result = wait_for(lambda: done_status(run_dir))["result"]
    assert result == {"changed": True}


# -- write_json ----------------------------------------------------------------------

def test_write_json_compact_and_private(tmp_path):
    path = str(tmp_path / "status.json")
    detached_run.write_json(path, {"b": 1, "a": [1, 2]})
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == '{"b":1,"a":[1,2]}'
    assert stat_mode(path) == 0o600
    assert os.listdir(str(tmp_path)) == ["status.json"]


def test_write_json_indented_durable_replaces_the_file(tmp_path):
    path = str(tmp_path / "0000-full.json")
    with open(path, "w") as handle:
        handle.write("old")
    data = {"b": {"y": 1, "x": None}, "a": "é", "when": time}  # `time` has no JSON form: written as str()
    detached_run.write_json(path, data, durable=True, mode=0o640, indent=2)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert text == json.dumps(dict(data, when=str(time)), indent=2, sort_keys=True, separators=(",", ": ")) + "\n"
    assert stat_mode(path) == 0o640
    assert os.listdir(str(tmp_path)) == ["0000-full.json"]


def test_write_json_that_fails_keeps_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "status.json")
    with open(path, "w") as handle:
        handle.write('{"state": "running"}')
    loop = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        detached_run.write_json(path, loop)
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == '{"state": "running"}'
    assert os.listdir(str(tmp_path)) == ["status.json"]


def test_write_json_temporary_is_what_the_catalog_calls_a_temporary_manifest(tmp_path, monkeypatch):
    from ansible_collections.qemu.qmp.plugins.module_utils.backup_catalog import MANIFEST_TEMP

    made = []
    real_mkstemp = detached_run.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(detached_run.tempfile, "mkstemp", mkstemp)
    detached_run.write_json(str(tmp_path / "0012-differential.json"), {}, durable=True)
    (temp,) = made
    assert os.path.dirname(temp) == str(tmp_path)
    assert MANIFEST_TEMP.match(os.path.basename(temp)), temp


def done_status(run_dir):
    """The run's status once it is done, else None."""
    status = read_status(run_dir)
    return status if status["state"] == "done" else None


def test_runs_dir_in_the_shared_temporary_folder_must_be_private(monkeypatch, tmp_path):
    monkeypatch.delenv(RUNS_DIR_ENV, raising=False)
    monkeypatch.setattr(detached_run.tempfile, "gettempdir", lambda: str(tmp_path))
    base = os.path.join(str(tmp_path), "qemu-qmp-runs-%d" % os.getuid())
    os.mkdir(base)
    os.chmod(base, 0o755)  # another user could read it, or have made it
    with pytest.raises(detached_run.QMPError, match="is not a private folder of this user"):
        detached_run.runs_dir()
    os.rmdir(base)
    os.symlink(str(tmp_path), base)  # a symlink planted in /tmp
    with pytest.raises(detached_run.QMPError, match="is not a private folder of this user"):
        detached_run.runs_dir()
