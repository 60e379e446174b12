# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A hypervisor's budget of concurrent runs of one kind (backups, outgoing migrations).

The budget is held on the host itself, so it holds whatever the controller does: any
number of forks, two playbooks at once, runs started by hand. Each run takes one of N
slot files (`KIND.slot-I` in the budget folder) with an exclusive flock and keeps it
until it ends; the kernel releases a killed run's slot. A run that finds every slot
taken waits, and says which runs hold them.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPError

DEFAULT_DIR = "/run/qemu-qmp/budget"
# How often a waiting run tries the slots again.
RETRY = 0.2


class BudgetError(QMPError):
    """The run got no slot in time, or the budget folder cannot be used."""


class HostBudget:
    """`with HostBudget(folder, "backup", 2, timeout, reporter, "VM x"):` runs its body in one of 2 slots."""

    def __init__(self, folder, kind, count, timeout, reporter, holder, error=BudgetError):
        self.folder = folder or DEFAULT_DIR
        self.kind = kind
        self.count = int(count or 0)
        self.timeout = timeout
        self.reporter = reporter
        self.holder = holder
        self.error = error
        self.fd = None
        self.slot = None
        self.waited = 0.0

    def _path(self, index):
        return os.path.join(self.folder, "%s.slot-%d" % (self.kind, index))

    def holders(self):
        """Who holds the slots, as their runs wrote it (a slot free again keeps its last holder's text)."""
        found = []
        for index in range(self.count):
            try:
                with open(self._path(index), encoding="utf-8") as handle:
                    found.append(json.loads(handle.read() or "{}").get("holder") or "a run")
            except (OSError, ValueError):
                found.append("a run")
        return found

    def _try(self):
        for index in range(self.count):
            path = self._path(index)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise self.error("cannot open the budget slot %s: %s" % (path, exc.strerror or exc))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            info = json.dumps({"holder": self.holder, "pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            return fd, index
        return None, None

    def __enter__(self):
        if self.count <= 0:
            return self
        try:
            os.makedirs(self.folder, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise self.error("cannot create the budget folder %s: %s" % (self.folder, exc.strerror or exc))
        start = time.monotonic()
        announced = False
        while True:
            self.fd, self.slot = self._try()
            if self.fd is not None:
                self.waited = round(time.monotonic() - start, 3)
                return self
            waited = time.monotonic() - start
            if waited >= self.timeout:
                raise self.error(
                    "no %s slot of this host's budget (%d at once, %s) came free within %gs: held by %s"
                    % (self.kind, self.count, self.folder, self.timeout, ", ".join(self.holders())))
            line = "waiting for one of the host's %d %s slots (held by %s)" % (
                self.count, self.kind, ", ".join(self.holders()))
            if not announced:
                self.reporter.phase(line)
                announced = True
            else:
                self.reporter.progress(line)
            time.sleep(RETRY)

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return False
