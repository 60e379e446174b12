# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the backup engine does on the host outside QEMU: the VM's lock, the run's journal, processes it
started, the tools it runs (qemu-img and friends), checks of images against their manifests, and the
words and numbers of its messages."""

from __future__ import annotations

import datetime
import fcntl
import json
import mmap
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import time

from ansible_collections.qemu.qmp.plugins.module_utils.backup_catalog import (
    FILE_MODE,
    JOURNAL_FILE,
    LOCK_FILE,
    BackupChainError,
)
from ansible_collections.qemu.qmp.plugins.module_utils.backup_digest import digest_mismatches
from ansible_collections.qemu.qmp.plugins.module_utils.detached_run import unlink_quietly, write_json


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def human(size):
    """Bytes in binary units, as qemu-img prints them."""
    value = float(size or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if round(value, 1) < 1024 or unit == "TiB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024
    return "%d B" % size


def duration_text(seconds):
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    if seconds >= 60:
        return "%dm%02ds" % (seconds // 60, seconds % 60)
    return "%ds" % seconds


def fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(what, exc):
    return BackupChainError("%s: %s" % (what, exc.strerror or exc), errno=exc.errno)


def allocated_size(path):
    """Bytes the file takes on its file system (what `qemu-img info` calls its disk size): a sparse image's
    holes and unallocated clusters take none."""
    return os.stat(path).st_blocks * 512


def existing_output(path):
    """The lstat of a regular file at `path`, or None when nothing is there. Anything else there is refused: a
    restore never writes through a symlink nor replaces one, nor a directory, a device or a socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error("cannot check the output %s" % path, exc)
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        if stat.S_ISLNK(info.st_mode):
            try:
                kind = "a symlink (to %s)" % os.readlink(path)
            except OSError:
                kind = "a symlink"
        raise BackupChainError("the output %s is %s: a restore replaces only a regular file, "
                               "even with force; remove it or choose another output" % (path, kind), output=path)
    return info


def check_output(path, force):
    """Refuse to restore into `path` when something is there that a restore must not replace: anything but a
    regular file (even with force), or any file without force."""
    if existing_output(path) is not None and not force:
        raise BackupChainError("%s exists; set force to overwrite it" % path, output=path)


def output_difference(tool, qemu_img, output, image, virtual_size, progress=None):
    """Why the image at `output` is not what restoring `image` (with its backing chain) would give, or None when
    it is: a standalone qcow2 of the same virtual size that qemu-img check finds sound, and whose guest-visible
    data qemu-img compare finds equal (unallocated and zero clusters count as equal, as the guest sees them).

    The manifests' checksums are of the backup files, not of the guest's data, so they cannot judge another
    file; qemu-img compare reads only what either side holds, and compares every byte of it."""
    rc, out, err = tool.call([qemu_img, "info", "--output=json", output], "reading %s" % output)
    if rc != 0:
        return "qemu-img cannot open it (%s)" % _first_line(err or out)
    try:
        info = json.loads(out)
    except ValueError:
        return "qemu-img info gave no JSON about it"
    if info.get("format") != "qcow2":
        return "it is a %s image, a restore writes qcow2" % info.get("format")
    if info.get("backing-filename"):
        return "it is backed by %s, a restore writes a standalone image" % info["backing-filename"]
    data_file = ((info.get("format-specific") or {}).get("data") or {}).get("data-file")
    if data_file:
        return "its data is in another file (%s), a restore writes a standalone image" % data_file
    size = info.get("virtual-size")
    if size != virtual_size:
        return "its virtual size is %s (%s bytes), the disk's is %s (%d bytes)" % (
            human(size or 0), size, human(virtual_size), virtual_size)
    rc, out, err = tool.call([qemu_img, "check", "-q", "-f", "qcow2", output], "checking %s" % output)
    if rc not in (0, 3):  # 3: leaked clusters only, which cost space and never change the data
        return "qemu-img check finds it damaged (%s)" % _first_line(err or out or "exit code %d" % rc)
    rc, out, err = tool.call([qemu_img, "compare", "-p", "-f", "qcow2", "-F", "qcow2", output, image],
                             "comparing %s with %s" % (output, image), progress)
    if rc == 0:
        return None
    if rc == 1:
        found = re.search(r"Content mismatch at offset (\d+)", out)
        if found:
            return "its data differs from the backup's at guest offset %s (byte %s)" % (
                human(int(found.group(1))), found.group(1))
        return "its data differs from the backup's"
    return "qemu-img compare failed (%s)" % _first_line(err or out or "exit code %d" % rc)


def _first_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else "no message"


class DirLock:
    """The VM's backup lock: exclusive for a backup, shared for a restore or a verify."""

    def __init__(self, root, exclusive, timeout, reporter, what):
        self.path = os.path.join(root, LOCK_FILE)
        self.exclusive = exclusive
        self.timeout = timeout
        self.reporter = reporter
        self.what = what
        self.fd = None

    def holder(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                info = json.loads(handle.read() or "{}")
        except (OSError, ValueError):
            return "another run"
        if not info or (info.get("host") == socket.gethostname() and not _running(info.get("pid") or 0)):
            # No backup holds it (the info is a killed backup's): shared holders leave none.
            return "a restore or a verify"
        return "a backup (pid %s on %s, since %s)" % (info.get("pid"), info.get("host"), info.get("started"))

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            if self.exclusive:
                raise os_error("cannot open the lock file %s" % self.path, exc)
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                return self  # a read-only backup store without a lock file: nothing to lock
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.holder()
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise BackupChainError(
                        "%s of %s cannot start: %s holds its lock %s%s" % (
                            self.what, os.path.dirname(self.path), holder, self.path,
                            "" if self.timeout else " (set a lock timeout to wait for it)"),
                        lock=self.path)
                self.reporter.progress("waiting for %s to end (it holds %s)" % (holder, self.path))
                time.sleep(0.2)
        if self.exclusive:
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": iso(utc_now())})
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, info.encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            if self.exclusive:
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
        return False


class Journal:
    """What a run started outside its backup folder, so a later run can stop it."""

    def __init__(self, root):
        self.path = os.path.join(root, JOURNAL_FILE)
        self.data = {}

    def load(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def record(self, **items):
        self.data.update(items)
        write_json(self.path, self.data, durable=True)

    def clear(self):
        self.data = {}
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _running(pid):
    """Whether a process runs (a zombie does not: it only waits for its parent to reap it)."""
    try:
        with open("/proc/%d/stat" % int(pid), encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError, ValueError, TypeError):
        return False


def stop_process(pid, marker):
    """Stop a process we started, if it still runs and its command line names `marker` (pids get reused)."""
    try:
        pid = int(pid)
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except (OSError, ValueError, TypeError):
        return False
    if marker not in cmdline or not _running(pid):
        return False
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except OSError:
            return not _running(pid)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.01)
        if not _running(pid):
            return True
    return False


def direct_io_works(folder):
    """Whether the folder's file system takes O_DIRECT writes (some do not: tmpfs before Linux 6.6, some FUSE)."""
    path = os.path.join(folder, ".direct-probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
        try:
            with mmap.mmap(-1, 4096) as block:
                os.write(fd, block)
        finally:
            os.close(fd)
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        unlink_quietly(path)


class Tool:
    """Runs qemu-img and friends, telling the reporter while they run, with their stderr in errors."""

    def __init__(self, reporter):
        self.reporter = reporter

    def run(self, argv, what, progress=None):
        """Run argv; `progress(percent)` gets qemu-img's -p output. Returns stdout; fails unless it exits 0."""
        returncode, out, err = self.call(argv, what, progress)
        if returncode != 0:
            text = err.strip() or out.strip() or "exit code %d" % returncode
            raise BackupChainError("%s: %s failed: %s" % (what, os.path.basename(argv[0]), text),
                                   stderr=err, rc=returncode)
        return out

    def call(self, argv, what, progress=None):
        """Run argv, for tools whose exit code is an answer (qemu-img compare): (exit code, stdout, stderr)."""
        try:
            # A detached engine run has no AnsibleModule (no run_command); it reads the tool's progress as it goes.
            proc = subprocess.Popen(  # pylint: disable=ansible-bad-function
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise os_error("%s: cannot run %s" % (what, argv[0]), exc)
        out, err = bytearray(), bytearray()
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        try:
            while streams:
                ready, dummy, dummy = select.select(list(streams), [], [], 1.0)
                for fd in ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        del streams[fd]
                        continue
                    streams[fd].extend(chunk)
                    if progress is not None and streams[fd] is out:
                        found = re.findall(rb"\(([0-9.]+)/100%\)", bytes(out[-200:]))
                        if found:
                            progress(float(found[-1]))
                            del out[:-200]
                self.reporter.check()
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
            proc.stderr.close()
        return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def guest_ranges(tool, qemu_img, image, start, end):
    """Which guest bytes of a disk an image holds between file offsets start and end (for messages)."""
    try:
        out = tool.run([qemu_img, "map", "--output=json", "-f", "qcow2", image], "mapping %s" % image)
        extents = json.loads(out)
    except (BackupChainError, ValueError):
        return None
    ranges = []
    for extent in extents:
        if extent.get("depth", 0) != 0 or "offset" not in extent:
            continue
        lo = max(start, extent["offset"])
        hi = min(end, extent["offset"] + extent["length"])
        if lo < hi:
            guest = extent["start"] + lo - extent["offset"]
            ranges.append((guest, guest + hi - lo))
    return ranges


def check_image(tool, qemu_img, image, recorded, node, progress):
    """Problems of one backup image against its manifest entry: size, checksum (where it differs)."""
    if recorded is None:
        return []
    try:
        mismatches = digest_mismatches(image, recorded, progress)
    except OSError as exc:
        return ["image %s of disk %s cannot be read: %s" % (image, node, exc.strerror or exc)]
    problems = []
    for start, end, what in mismatches:
        where = "bytes %d to %d of the file" % (start, end)
        ranges = guest_ranges(tool, qemu_img, image, start, end)
        if ranges:
            where += " (guest data of disk %s at %s)" % (node, ", ".join(
                "%s-%s" % (human(lo), human(hi)) for lo, hi in ranges[:4]) + (", ..." if len(ranges) > 4 else ""))
        problems.append("image %s: %s: %s" % (image, what, where))
    return problems


def remove_tree(path):
    if os.path.isdir(path):
        shutil.rmtree(path)


def progress_text(node, current, total, elapsed):
    """disk0 45.2% (12.0 MiB of 26.5 MiB) at 30.1 MiB/s, 1s left."""
    text = "%s %.1f%% (%s of %s)" % (node, 100.0 * current / total if total else 0.0, human(current), human(total))
    if elapsed and current:
        rate = current / elapsed
        text += " at %s/s" % human(rate)
        if total > current:
            text += ", %s left" % duration_text((total - current) / rate)
    return text
