# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of backup_host, the engine's host-side helpers: formatting, the folder lock, the journal,
stopping processes, the O_DIRECT probe, running tools, and naming damaged guest data in images.

The engine's QMP work is tested against a real QEMU elsewhere (tests/integration).
"""

from __future__ import annotations

import datetime
import errno
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils import backup_host as engine
from ansible_collections.qemu.qmp.plugins.module_utils.backup_catalog import JOURNAL_FILE, LOCK_FILE, BackupChainError
from ansible_collections.qemu.qmp.plugins.module_utils.backup_digest import CHUNK_SIZE, file_digest
from ansible_collections.qemu.qmp.plugins.module_utils.backup_host import (
    DirLock,
    Journal,
    Tool,
    allocated_size,
    check_image,
    check_output,
    direct_io_works,
    duration_text,
    guest_ranges,
    human,
    iso,
    output_difference,
    progress_text,
    stop_process,
    utc_now,
)

KIB = 1024
MIB = 1024 * KIB
PYTHON = [sys.executable, "-I", "-S", "-c"]


class Stop(Exception):
    """What the fake reporter's check() raises when told to."""


class Reporter:
    """What the helpers use of the run's reporter: progress() and check()."""

    def __init__(self, stop_when=None):
        self.progressed = []
        self.checks = 0
        self.stop_when = stop_when

    def progress(self, text):
        self.progressed.append(text)

    def phase(self, text):
        pass

    def check(self):
        self.checks += 1
        if self.stop_when is not None and self.stop_when():
            raise Stop("the controller went away")


class OSProxy:
    """The os module as backup_host sees it, with some calls replaced (monkeypatch it in as engine.os)."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


# -- formatting -----------------------------------------------------------------


@pytest.mark.parametrize("size, text", [
    (None, "0 B"), (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (MIB, "1.0 MiB"), (MIB + 64 * KIB, "1.1 MiB"), (26.5 * MIB, "26.5 MiB"), (3 * 1024 * MIB, "3.0 GiB"),
    (5 * 1024 ** 4, "5.0 TiB"), (2048 * 1024 ** 4, "2048.0 TiB"), (30.1 * MIB, "30.1 MiB"),
])
def test_human(size, text):
    assert human(size) == text


@pytest.mark.parametrize("seconds, text", [
    (-5, "0s"), (0, "0s"), (0.9, "0s"), (1, "1s"), (59.99, "59s"), (60, "1m00s"), (61, "1m01s"),
    (3599, "59m59s"), (3600, "1h00m"), (7322, "2h02m"), (100 * 3600 + 59, "100h00m"),
])
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text


@pytest.mark.parametrize("current, total, elapsed, text", [
    (0, 0, None, "disk0 0.0% (0 B of 0 B)"),
    (0, 0, 0, "disk0 0.0% (0 B of 0 B)"),
    (0, 0, 5.0, "disk0 0.0% (0 B of 0 B)"),  # no rate from nothing copied, no division by zero
    (0, MIB, 5.0, "disk0 0.0% (0 B of 1.0 MiB)"),
    (512 * KIB, MIB, None, "disk0 50.0% (512.0 KiB of 1.0 MiB)"),
    (512 * KIB, MIB, 0, "disk0 50.0% (512.0 KiB of 1.0 MiB)"),
    (512 * KIB, MIB, 2.0, "disk0 50.0% (512.0 KiB of 1.0 MiB) at 256.0 KiB/s, 2s left"),
    (MIB, MIB, 2.0, "disk0 100.0% (1.0 MiB of 1.0 MiB) at 512.0 KiB/s"),
    (2 * MIB, MIB, 1.0, "disk0 200.0% (2.0 MiB of 1.0 MiB) at 2.0 MiB/s"),
    (5, 0, 1.0, "disk0 0.0% (5 B of 0 B) at 5 B/s"),
    (12 * MIB, 26.5 * MIB, 0.4, "disk0 45.3% (12.0 MiB of 26.5 MiB) at 30.0 MiB/s, 0s left"),
    (MIB, 121 * MIB, 1.0, "disk0 0.8% (1.0 MiB of 121.0 MiB) at 1.0 MiB/s, 2m00s left"),
])
def test_progress_text(current, total, elapsed, text):
    assert progress_text("disk0", current, total, elapsed) == text


def test_iso_and_utc_now():
    assert iso(datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)) == "2024-05-06T07:08:09Z"
    now = utc_now()
    assert now.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - now).total_seconds()) < 60


# -- DirLock ------------------------------------------------------------------------

STARTED = "2024-05-06T07:08:09Z"
# Another process holding the lock, as DirLock holds it (an exclusive holder writes who it is).
HOLDER = r"""
import fcntl, json, os, socket, sys, time
path, mode, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX if mode == "ex" else fcntl.LOCK_SH)
if mode == "ex":
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": %r}).encode(), 0)
sys.stdout.write("locked\n")
sys.stdout.flush()
time.sleep(hold)
""" % STARTED
# Whether another process can take the lock now: prints "free" or "busy".
PROBE = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, (fcntl.LOCK_EX if sys.argv[2] == "ex" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("busy")
"""


@pytest.fixture(name="children")
def fixture_children():
    """children(argv, **popen_kwargs): a child process, killed and reaped after the test if it still runs."""
    procs = []

    def start(argv, **kwargs):
        proc = subprocess.Popen(argv, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(name="holder")
def fixture_holder(children):
    """holder(lock path, "ex" or "sh", seconds): another process holding the lock (once this returns)."""
    def start(path, mode, hold=30.0):
        proc = children(PYTHON + [HOLDER, str(path), mode, str(hold)], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"locked\n"
        return proc

    return start


def _probe(path, mode):
    out = subprocess.run(PYTHON + [PROBE, str(path), mode], check=True, stdout=subprocess.PIPE, timeout=10).stdout
    return out.decode().strip()


def _backup_text(pid, started=STARTED):
    return "a backup (pid %d on %s, since %s)" % (pid, socket.gethostname(), started)


@pytest.mark.parametrize("exclusive, what", [(True, "a backup"), (False, "a restore")])
def test_a_backup_in_another_process_blocks_the_lock(tmp_path, holder, exclusive, what):
    lock_path = tmp_path / LOCK_FILE
    other = holder(lock_path, "ex")
    reporter = Reporter()
    lock = DirLock(str(tmp_path), exclusive, 0, reporter, what)
    fds = _open_fds()
    with pytest.raises(BackupChainError) as info:
        with lock:
            raise AssertionError("the lock was taken")
    text = str(info.value)
    assert text == "%s of %s cannot start: %s holds its lock %s (set a lock timeout to wait for it)" % (
        what, tmp_path, _backup_text(other.pid), lock_path)
    assert info.value.details == {"lock": str(lock_path)}
    assert reporter.progressed == []
    assert lock.fd is None and _open_fds() == fds
    assert other.poll() is None


def test_a_restore_in_another_process_blocks_a_backup(tmp_path, holder):
    holder(tmp_path / LOCK_FILE, "sh")
    with pytest.raises(BackupChainError) as info:
        with DirLock(str(tmp_path), True, 0, Reporter(), "a backup"):
            raise AssertionError("the lock was taken")
    assert "a restore or a verify holds its lock %s" % (tmp_path / LOCK_FILE) in str(info.value)


def test_shared_locks_go_together(tmp_path, holder):
    holder(tmp_path / LOCK_FILE, "sh")
    reporter = Reporter()
    with DirLock(str(tmp_path), False, 0, reporter, "a verify") as lock:
        assert lock.fd is not None
        assert _probe(tmp_path / LOCK_FILE, "sh") == "free"
        assert _probe(tmp_path / LOCK_FILE, "ex") == "busy"
        assert (tmp_path / LOCK_FILE).read_text() == ""  # a shared holder does not say who it is
    assert reporter.progressed == []


def test_the_lock_waits_for_its_holder_to_end(tmp_path, holder):
    other = holder(tmp_path / LOCK_FILE, "ex", 0.6)
    reporter = Reporter()
    start = time.monotonic()
    with DirLock(str(tmp_path), True, 10, reporter, "a backup"):
        waited = time.monotonic() - start
        assert other.wait(5) == 0
    assert 0.3 < waited < 5
    assert reporter.progressed
    assert set(reporter.progressed) == {"waiting for %s to end (it holds %s)" % (
        _backup_text(other.pid), tmp_path / LOCK_FILE)}


def test_the_lock_gives_up_after_its_timeout(tmp_path, holder):
    other = holder(tmp_path / LOCK_FILE, "ex")
    reporter = Reporter()
    lock = DirLock(str(tmp_path), True, 0.5, reporter, "a backup")
    fds = _open_fds()
    start = time.monotonic()
    with pytest.raises(BackupChainError) as info:
        lock.__enter__()
    assert 0.5 <= time.monotonic() - start < 5
    assert str(info.value) == "a backup of %s cannot start: %s holds its lock %s" % (
        tmp_path, _backup_text(other.pid), tmp_path / LOCK_FILE)
    assert 1 <= len(reporter.progressed) <= 5
    assert lock.fd is None and _open_fds() == fds


def test_a_backup_says_who_holds_the_lock_and_clears_it(tmp_path):
    lock_path = tmp_path / LOCK_FILE
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    with DirLock(str(tmp_path), True, 0, Reporter(), "a backup"):
        info = json.loads(lock_path.read_text())
        assert _probe(lock_path, "sh") == "busy"
        # A second holder in this process (another open file) is refused too, and named.
        with pytest.raises(BackupChainError) as refused:
            with DirLock(str(tmp_path), False, 0, Reporter(), "a verify"):
                pass
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    started = datetime.datetime.strptime(info["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert before <= started <= datetime.datetime.now(datetime.timezone.utc)
    assert _backup_text(os.getpid(), info["started"]) in str(refused.value)
    assert lock_path.read_text() == ""
    assert _probe(lock_path, "ex") == "free"


def test_a_restore_after_a_backup_finds_the_lock_free(tmp_path):
    with DirLock(str(tmp_path), True, 0, Reporter(), "a backup"):
        pass
    with DirLock(str(tmp_path), False, 0, Reporter(), "a restore") as lock:
        assert lock.fd is not None
    assert os.stat(tmp_path / LOCK_FILE).st_mode & 0o777 == 0o640 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(name="read_only_dir")
def fixture_read_only_dir(tmp_path, monkeypatch):
    """A folder where no file can be created: mode 0555, and for root (who ignores it) os.open refusing it."""
    folder = tmp_path / "store"
    folder.mkdir()
    folder.chmod(0o555)

    def refusing_open(path, flags, mode=0o777, **kwargs):
        if (os.path.dirname(os.path.abspath(path)) == str(folder) and flags & os.O_CREAT
                and not os.path.exists(path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return os.open(path, flags, mode, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(engine, "os", OSProxy(open=refusing_open))
    yield folder
    folder.chmod(0o755)


def test_a_read_only_folder_without_a_lock_file_is_read_without_a_lock(read_only_dir):
    with DirLock(str(read_only_dir), False, 0, Reporter(), "a verify") as lock:
        assert lock.fd is None
    assert os.listdir(read_only_dir) == []


def test_a_read_only_folder_without_a_lock_file_cannot_be_backed_up(read_only_dir):
    with pytest.raises(BackupChainError) as info:
        with DirLock(str(read_only_dir), True, 0, Reporter(), "a backup"):
            raise AssertionError("the lock was taken")
    assert str(info.value) == "cannot open the lock file %s: %s" % (
        read_only_dir / LOCK_FILE, os.strerror(errno.EACCES))
    assert info.value.details == {"errno": errno.EACCES}


def test_a_restore_is_not_taken_for_a_killed_backup(tmp_path, holder):
    lock_path = tmp_path / LOCK_FILE
    killed = holder(lock_path, "ex")
    killed.kill()
    killed.wait(5)
    holder(lock_path, "sh")
    with pytest.raises(BackupChainError) as info:
        with DirLock(str(tmp_path), True, 0, Reporter(), "a backup"):
            raise AssertionError("the lock was taken")
    assert "(pid %d " % killed.pid not in str(info.value)


# -- Journal --------------------------------------------------------------------------


def test_journal_record_merges_and_persists(tmp_path):
    journal = Journal(str(tmp_path))
    journal.record(nbd_server=True)
    journal.record(qemu_nbd=[{"pid": 12, "socket": "/run/x.sock"}], socket_dir="/run/x")
    journal.record(nbd_server=False)
    expected = {"nbd_server": False, "qemu_nbd": [{"pid": 12, "socket": "/run/x.sock"}], "socket_dir": "/run/x"}
    assert json.loads((tmp_path / JOURNAL_FILE).read_text()) == expected
    assert Journal(str(tmp_path)).load() == expected
    assert sorted(os.listdir(tmp_path)) == [JOURNAL_FILE]  # no temporary file left


@pytest.mark.parametrize("content", [None, b"", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_journal_load_of_nothing_useful(tmp_path, content):
    if content is not None:
        (tmp_path / JOURNAL_FILE).write_bytes(content)
    assert Journal(str(tmp_path)).load() == {}


def test_journal_clear(tmp_path):
    journal = Journal(str(tmp_path))
    journal.record(nbd_server=True)
    journal.clear()
    assert not (tmp_path / JOURNAL_FILE).exists()
    assert journal.data == {} and journal.load() == {}
    journal.clear()  # already gone
    journal.record(socket_dir="/run/y")
    assert Journal(str(tmp_path)).load() == {"socket_dir": "/run/y"}


# -- stop_process ---------------------------------------------------------------------------


def _sleeper(children, tmp_path):
    """`sleep 30` under a name holding a socket path (as qemu-nbd's command line does); (process, marker)."""
    marker = str(tmp_path / "backup-target-disk0.sock")
    proc = children(["qemu-nbd-test:" + marker, "30"], executable=shutil.which("sleep"))
    # Popen returns once the child's exec has begun: its command line may still be empty for a moment.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open("/proc/%d/cmdline" % proc.pid, "rb") as handle:
            if marker.encode() in handle.read():
                break
        time.sleep(0.002)
    return proc, marker


def test_stop_process_stops_a_process_naming_the_marker(tmp_path, children):
    proc, marker = _sleeper(children, tmp_path)
    start = time.monotonic()
    assert stop_process(proc.pid, marker) is True
    assert proc.wait(5) == -signal.SIGTERM
    assert time.monotonic() - start < 5


def test_stop_process_takes_the_pid_as_text(tmp_path, children):
    proc, marker = _sleeper(children, tmp_path)
    assert stop_process(str(proc.pid), marker) is True
    assert proc.wait(5) == -signal.SIGTERM


def test_stop_process_leaves_a_process_with_another_command_line(tmp_path, children):
    proc, marker = _sleeper(children, tmp_path)
    assert stop_process(proc.pid, str(tmp_path / "backup-target-disk1.sock")) is False
    time.sleep(0.05)
    assert proc.poll() is None
    assert engine._running(proc.pid)


def test_stop_process_of_a_process_that_does_not_exist():
    with open("/proc/sys/kernel/pid_max", encoding="utf-8") as handle:
        beyond = int(handle.read()) + 1
    assert stop_process(beyond, "qemu-nbd") is False
    assert stop_process("not a pid", "qemu-nbd") is False
    assert not engine._running(beyond)


def test_a_zombie_does_not_run(children):
    proc = children(["true"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # it has exited, and is not reaped yet
    with open("/proc/%d/stat" % proc.pid, encoding="utf-8") as handle:
        assert handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    assert not engine._running(proc.pid)
    assert stop_process(proc.pid, "") is False
    assert engine._running(os.getpid())


class _FastClock:
    """backup_host's `time` with a clock running a second per reading: its 10 s waits pass at once."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        self.now += 1.0
        return self.now

    @staticmethod
    def sleep(seconds):
        time.sleep(0.001)


def test_stop_process_does_not_claim_a_process_that_survives(tmp_path, children, monkeypatch):
    marker = str(tmp_path / "stubborn.sock")
    proc = children(PYTHON + ["import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "print('ready', flush=True); time.sleep(30)", marker], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    monkeypatch.setattr(engine, "time", _FastClock())
    stopped = stop_process(proc.pid, marker)
    assert not (stopped and engine._running(proc.pid)), "stop_process says it stopped a process that still runs"


# -- direct_io_works ------------------------------------------------------------------------


def _kernel_takes_o_direct(folder):
    """Whether an O_DIRECT write of one aligned block works in the folder (probed here, independently)."""
    path = os.path.join(folder, "o-direct-test")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            with mmap.mmap(-1, 4096) as block:
                os.write(fd, block)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_direct_io_works_on_disk(tmp_path):
    (tmp_path / "disk0.qcow2").write_bytes(b"keep")
    if not _kernel_takes_o_direct(str(tmp_path)):
        pytest.skip("O_DIRECT does not work in %s" % tmp_path)
    assert direct_io_works(str(tmp_path)) is True
    assert os.listdir(tmp_path) == ["disk0.qcow2"]


@pytest.fixture(name="tmpfs_dir")
def fixture_tmpfs_dir():
    with open("/proc/mounts", encoding="utf-8") as handle:
        if not any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in handle):
            pytest.skip("/dev/shm is not a tmpfs")
    folder = tempfile.mkdtemp(prefix="direct-io", dir="/dev/shm")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_direct_io_works_on_a_tmpfs_as_the_kernel_says(tmpfs_dir):
    """False where tmpfs refuses O_DIRECT (Linux before 6.6); newer kernels take it, and so must the probe."""
    assert direct_io_works(tmpfs_dir) is _kernel_takes_o_direct(tmpfs_dir)
    assert os.listdir(tmpfs_dir) == []


@pytest.mark.parametrize("failing", ["open", "write"])
def test_direct_io_does_not_work_where_o_direct_is_refused(tmp_path, monkeypatch, failing):
    """A file system refusing O_DIRECT (EINVAL at open, or at the first write, as tmpfs did): False, no probe left."""
    def refusing_open(path, flags, mode=0o777, **kwargs):
        if flags & os.O_DIRECT and failing == "open":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return os.open(path, flags, mode, **kwargs)

    def refusing_write(fd, data):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    replaced = {"open": refusing_open}
    if failing == "write":
        replaced["write"] = refusing_write
    fds = _open_fds()
    monkeypatch.setattr(engine, "os", OSProxy(**replaced))
    assert direct_io_works(str(tmp_path)) is False
    assert os.listdir(tmp_path) == []
    assert _open_fds() == fds


def test_direct_io_does_not_work_in_a_missing_folder(tmp_path):
    assert direct_io_works(str(tmp_path / "missing")) is False


# -- Tool.run -------------------------------------------------------------------------------------


def test_tool_returns_stdout(tmp_path):
    reporter = Reporter()
    out = Tool(reporter).run(PYTHON + ["import sys; sys.stdout.write('line 1\\nline 2\\n'); "
                                       "sys.stderr.write('noise on stderr')"], "listing")
    assert out == "line 1\nline 2\n"
    assert reporter.checks >= 1


def test_tool_returns_a_long_stdout_whole():
    out = Tool(Reporter()).run(PYTHON + ["import sys; sys.stdout.write('x' * 300000)"], "writing")
    assert out == "x" * 300000


@pytest.mark.parametrize("script, text", [
    ("import sys; sys.stdout.write('partial'); sys.stderr.write(\"qemu-img: Could not open 'x.qcow2'\\n\"); "
     "sys.exit(1)", "qemu-img: Could not open 'x.qcow2'"),
    ("import sys; sys.stdout.write('only on stdout\\n'); sys.exit(1)", "only on stdout"),
    ("import sys; sys.exit(3)", "exit code 3"),
])
def test_tool_failure_raises_with_stderr(script, text):
    argv = PYTHON + [script]
    with pytest.raises(BackupChainError) as info:
        Tool(Reporter()).run(argv, "checking image x.qcow2 of disk disk0")
    assert str(info.value) == "checking image x.qcow2 of disk disk0: %s failed: %s" % (
        os.path.basename(sys.executable), text)
    details = info.value.details
    assert details["rc"] == (3 if text == "exit code 3" else 1)
    assert details["stderr"].strip() == (text if text.startswith("qemu-img") else "")


def test_tool_missing_program_raises_backup_chain_error(tmp_path):
    missing = str(tmp_path / "bin" / "qemu-img")
    with pytest.raises(BackupChainError) as info:
        Tool(Reporter()).run([missing, "info", "x"], "reading x")
    assert not isinstance(info.value, OSError)
    assert str(info.value) == "reading x: cannot run %s: %s" % (missing, os.strerror(errno.ENOENT))
    assert info.value.details == {"errno": errno.ENOENT}


# qemu-img -p style progress. After each full line the script waits until the test has seen that value (the
# test's callback writes it to a file), so no two lines reach the reader together; "(87.50/100%)" comes in two
# writes, and must be read once both halves are in.
PROGRESS = r"""
import os, sys, time
seen = sys.argv[1]
def write(text, value=None):
    sys.stdout.write(text)
    sys.stdout.flush()
    deadline = time.monotonic() + 5
    while value is not None and time.monotonic() < deadline:
        if os.path.exists(seen) and open(seen).read() == repr(value):
            return
        time.sleep(0.005)
write("    (0.00/100%)\r", 0.0)
write("    (12.50/100%)\r", 12.5)
write("    (50.00/100%)\r", 50.0)
write("    (87.5")
time.sleep(0.05)
write("0/100%)\r", 87.5)
write("    (100.00/100%)\r", 100.0)
write("\n")
"""


def test_tool_reports_qemu_img_progress(tmp_path):
    seen = tmp_path / "seen"
    got = []

    def progress(value):
        got.append(value)
        seen.write_text(repr(value))

    start = time.monotonic()
    Tool(Reporter()).run(PYTHON + [PROGRESS, str(seen)], "converting", progress=progress)
    assert time.monotonic() - start < 5
    assert all(isinstance(value, float) for value in got)
    # The same value may be told twice (a chunk that adds nothing new), never a wrong one.
    assert [value for index, value in enumerate(got) if index == 0 or value != got[index - 1]] == [
        0.0, 12.5, 50.0, 87.5, 100.0]


def test_tool_stops_the_command_when_the_run_is_stopped(tmp_path):
    pid_file = tmp_path / "child.pid"
    reporter = Reporter(stop_when=pid_file.exists)
    script = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
              "print('started', flush=True); time.sleep(30)")
    start = time.monotonic()
    with pytest.raises(Stop):
        Tool(reporter).run(PYTHON + [script, str(pid_file)], "converting")
    assert time.monotonic() - start < 5
    pid = int(pid_file.read_text())
    assert not engine._running(pid)  # killed and reaped


# -- guest_ranges and check_image with real images ----------------------------------------------------


@pytest.fixture(name="image")
def fixture_image(tmp_path):
    """A qcow2 image of 4 MiB with 64 KiB of 0xab at guest offset 1 MiB; (path, host offset of that data)."""
    if not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        pytest.skip("qemu-img and qemu-io are needed")
    path = str(tmp_path / "disk0.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "4M"], check=True, timeout=30)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 64k", path], check=True,
                   stdout=subprocess.DEVNULL, timeout=30)
    return path, _host_offset(path, MIB)


def _host_offset(path, guest):
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", path], check=True,
                         stdout=subprocess.PIPE, timeout=30).stdout
    for extent in json.loads(out):
        if extent["start"] <= guest < extent["start"] + extent["length"] and "offset" in extent:
            return extent["offset"] + guest - extent["start"]
    raise AssertionError("guest offset %d is not mapped in %s" % (guest, path))


def _flip(path, offset):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xff]))


def test_the_image_fixture_holds_the_data(image):
    path, host = image
    with open(path, "rb") as handle:
        handle.seek(host)
        assert handle.read(64 * KIB) == b"\xab" * (64 * KIB)


def test_guest_ranges_maps_file_offsets_to_guest_offsets(image):
    path, host = image
    tool = Tool(Reporter())
    assert guest_ranges(tool, "qemu-img", path, host, host + 64 * KIB) == [(MIB, MIB + 64 * KIB)]
    assert guest_ranges(tool, "qemu-img", path, host + 4096, host + 8192) == [(MIB + 4096, MIB + 8192)]
    assert guest_ranges(tool, "qemu-img", path, 0, host + 1) == [(MIB, MIB + 1)]
    assert guest_ranges(tool, "qemu-img", path, 0, 512) == []  # the header holds no guest data


def test_guest_ranges_of_what_qemu_img_cannot_map(tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img is needed")
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"not an image" * 100)
    assert guest_ranges(Tool(Reporter()), "qemu-img", str(garbage), 0, 1200) is None
    assert guest_ranges(Tool(Reporter()), str(tmp_path / "no-qemu-img"), str(garbage), 0, 1200) is None


def test_check_image_of_an_intact_image(image):
    path, host = image
    recorded = file_digest(path)
    done = []
    assert check_image(Tool(Reporter()), "qemu-img", path, recorded, "disk0", done.append) == []
    assert done and done[-1] == os.path.getsize(path)


@pytest.mark.parametrize("chunk_size", [64 * KIB, CHUNK_SIZE])
def test_check_image_names_the_damaged_guest_data(image, chunk_size):
    path, host = image
    recorded = file_digest(path, chunk_size)
    _flip(path, host + 100)
    problems = check_image(Tool(Reporter()), "qemu-img", path, recorded, "disk0", None)
    size = os.path.getsize(path)
    start = host // chunk_size * chunk_size
    guest = "%s-%s" % (human(MIB), human(MIB + 64 * KIB))
    assert guest == "1.0 MiB-1.1 MiB"
    assert problems == ["image %s: its checksum differs from the manifest's: bytes %d to %d of the file "
                        "(guest data of disk disk0 at %s)" % (path, start, min(size, start + chunk_size), guest)]


def test_check_image_lists_at_most_four_guest_ranges(image):
    path, host = image
    args = []
    for guest in ("0", "3M", "2M", "1536k", "2560k"):  # 1M holds data already; each write allocates a cluster
        args += ["-c", "write -P 0x77 %s 4k" % guest]
    subprocess.run(["qemu-io", "-f", "qcow2"] + args + [path], check=True, stdout=subprocess.DEVNULL, timeout=30)
    recorded = file_digest(path)
    _flip(path, host + 100)
    problems = check_image(Tool(Reporter()), "qemu-img", path, recorded, "disk0", None)
    assert len(problems) == 1
    ranges = problems[0].split("(guest data of disk disk0 at ", 1)[1]
    assert ranges.endswith(", ...)")
    assert len(ranges.split(", ")) == 5  # four ranges and the ellipsis
    assert ranges == "0 B-64.0 KiB, 1.0 MiB-1.1 MiB, 1.5 MiB-1.6 MiB, 2.0 MiB-2.1 MiB, ...)"


@pytest.mark.parametrize("change, word", [(-64 * KIB, "truncated"), (4096, "grown")])
def test_check_image_reports_the_sizes(image, change, word):
    path, host = image
    recorded = file_digest(path)
    size = recorded["size"] + change
    os.truncate(path, size)
    problems = check_image(Tool(Reporter()), "qemu-img", path, recorded, "disk0", None)
    assert len(problems) == 1
    assert problems[0].startswith("image %s: the file is %d bytes, the manifest says %d (%s): bytes %d to %d of "
                                  "the file" % (path, size, recorded["size"], word, min(size, recorded["size"]),
                                                max(size, recorded["size"])))


def test_check_image_of_a_missing_image(tmp_path):
    path = str(tmp_path / "disk0.qcow2")
    recorded = {"algorithm": "sha256", "chunk_size": 65536, "size": 65536, "chunks": ["0" * 64]}
    assert check_image(Tool(Reporter()), "qemu-img", path, recorded, "disk0", None) == [
        "image %s of disk disk0 cannot be read: %s" % (path, os.strerror(errno.ENOENT))]


def test_check_image_without_a_record(tmp_path):
    assert check_image(Tool(Reporter()), "qemu-img", str(tmp_path / "missing.qcow2"), None, "disk0", None) == []


def test_tool_call_gives_the_exit_code_as_an_answer():
    script = "import sys; sys.stdout.write('Content mismatch at offset 0!\\n'); sys.stderr.write('note'); sys.exit(1)"
    assert Tool(Reporter()).call(PYTHON + [script], "comparing") == (1, "Content mismatch at offset 0!\n", "note")


def test_allocated_size_counts_what_the_file_takes(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as handle:
        handle.truncate(64 * MIB)
        handle.seek(MIB)
        handle.write(b"x" * (256 * KIB))
        os.fsync(handle.fileno())
    assert allocated_size(str(path)) == os.stat(path).st_blocks * 512
    assert 256 * KIB <= allocated_size(str(path)) < 64 * MIB


# -- what a restore finds at its output ------------------------------------------------------------------


def test_check_output_of_nothing_and_of_a_file(tmp_path):
    output = tmp_path / "out.qcow2"
    check_output(str(output), False)
    output.write_bytes(b"an old image\n")
    check_output(str(output), True)
    with pytest.raises(BackupChainError, match="^%s exists; set force to overwrite it$" % output):
        check_output(str(output), False)


@pytest.mark.parametrize("force", [False, True])
def test_check_output_refuses_what_is_not_a_regular_file_even_with_force(tmp_path, force):
    (tmp_path / "folder").mkdir()
    os.symlink(str(tmp_path / "elsewhere"), str(tmp_path / "link"))
    with pytest.raises(BackupChainError, match="is a directory: a restore replaces only a regular file"):
        check_output(str(tmp_path / "folder"), force)
    with pytest.raises(BackupChainError, match="is a symlink \\(to %s\\)" % (tmp_path / "elsewhere")):
        check_output(str(tmp_path / "link"), force)


def _qemu_img(*args):
    subprocess.run(["qemu-img"] + list(args), check=True, stdout=subprocess.DEVNULL, timeout=30)


def _difference(image, output, size=4 * MIB):
    progress = []
    why = output_difference(Tool(Reporter()), "qemu-img", output, image, size, progress.append)
    return why, progress


def test_an_image_with_the_same_guest_data_holds_the_point(image, tmp_path):
    path, dummy = image
    output = str(tmp_path / "out.qcow2")
    _qemu_img("convert", "-O", "qcow2", path, output)
    why, progress = _difference(path, output)
    assert why is None and progress and progress[-1] == 100.0
    # Zeros written where the point has none are the same to the guest; so is another cluster size.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 2M 64k", "-c", "write -P 0 3M 64k", output],
                   check=True, stdout=subprocess.DEVNULL, timeout=30)
    assert _difference(path, output)[0] is None
    _qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4096", path, output)
    assert _difference(path, output)[0] is None


def test_an_image_with_other_data_is_named_where_it_differs(image, tmp_path):
    path, dummy = image
    output = str(tmp_path / "out.qcow2")
    _qemu_img("convert", "-O", "qcow2", path, output)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 3M 4k", output], check=True,
                   stdout=subprocess.DEVNULL, timeout=30)
    assert _difference(path, output)[0] == "its data differs from the backup's at guest offset 3.0 MiB (byte 3145728)"


def test_an_image_of_another_size_format_or_layout_does_not_hold_the_point(image, tmp_path):
    path, dummy = image
    output = str(tmp_path / "out.img")
    _qemu_img("convert", "-O", "raw", path, output)
    assert _difference(path, output)[0] == "it is a raw image, a restore writes qcow2"
    _qemu_img("convert", "-O", "qcow2", path, output)
    _qemu_img("resize", "-q", "-f", "qcow2", output, "8M")
    assert _difference(path, output)[0] == ("its virtual size is 8.0 MiB (8388608 bytes), the disk's is 4.0 MiB "
                                            "(4194304 bytes)")
    os.unlink(output)
    _qemu_img("create", "-q", "-f", "qcow2", "-b", path, "-F", "qcow2", output)
    assert _difference(path, output)[0] == "it is backed by %s, a restore writes a standalone image" % path
    os.unlink(output)
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=%s.data" % output, output, "4M")
    assert _difference(path, output)[0].startswith("its data is in another file (%s.data)" % output)


def test_what_qemu_img_cannot_open_does_not_hold_the_point(image, tmp_path):
    path, dummy = image
    output = tmp_path / "out.qcow2"
    with open(path, "rb") as handle:
        output.write_bytes(handle.read(512))  # a qcow2 header whose tables are cut off
    why = _difference(path, str(output))[0]
    assert why.startswith("qemu-img ") and "(" in why, why
    assert _difference(path, str(tmp_path / "missing.qcow2"))[0].startswith("qemu-img cannot open it (")


def test_a_damaged_image_does_not_hold_the_point(image, tmp_path):
    path, dummy = image
    output = str(tmp_path / "out.qcow2")
    _qemu_img("convert", "-O", "qcow2", path, output)
    host = _host_offset(output, MIB)
    # The refcount of the data cluster, set to 0: qemu-img check finds an error, reads still give the data.
    refcount_table = int.from_bytes(open(output, "rb").read()[48:56], "big")
    with open(output, "rb") as handle:
        handle.seek(refcount_table)
        block = int.from_bytes(handle.read(8), "big")
    with open(output, "r+b") as handle:
        handle.seek(block + 2 * (host // 65536))
        handle.write(b"\0\0")
    why = _difference(path, output)[0]
    assert why.startswith("qemu-img check finds it damaged ("), why
