# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The QEMU process of a VM defined for the qemu.qmp.vm role, on its host: find it, prove it is
the VM's, start it, stop it, and give a migration's destination the VM's own file names.

A pid in a pidfile can belong to any process by now: a process counts as the VM's QEMU only when
its command line carries the VM's name and its start time (/proc/PID/stat) is the one saved when
it was started. Nothing else is ever signalled. A QEMU that answers on the VM's QMP socket under
the VM's name may be asked to quit over QMP. A socket that still accepts connections is never
removed. Standard library only.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import stat
import subprocess
import time

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import (
    QMPClient, QMPConnectError, QMPConnectionClosed, QMPError, QMPTimeoutError)
from ansible_collections.qemu.qmp.plugins.module_utils.vm_command_line import vm_command_line

FILE_MODE = 0o640
RUN_DIR_MODE = 0o750
PROBE_TIMEOUT = 5
# After quit or SIGTERM, how long the process has to exit before SIGKILL (wait_timeout, when unset).
EXIT_TIMEOUT = 15


class VMProcessError(Exception):
    """A failure the user must see; str() is the whole message."""


def _read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _write_json(path, data):
    """Write `data` as JSON through a temporary file, mode 0640: a reader never sees half a file."""
    temporary = "%s.tmp%d" % (path, os.getpid())
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=4, sort_keys=True) + "\n")
    os.chmod(temporary, FILE_MODE)
    os.replace(temporary, path)


def _read_json(path):
    data = _read(path)
    try:
        value = json.loads(data.decode("utf-8")) if data is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def process_started(pid):
    """Field 22 of /proc/PID/stat (the start time in clock ticks since boot), or None; the fields are
    counted after the command name, which may hold spaces and parentheses."""
    data = _read("/proc/%d/stat" % pid)
    if not data:
        return None
    fields = data.decode("utf-8", "replace").rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def process_cmdline(pid):
    data = _read("/proc/%d/cmdline" % pid)
    return data.decode("utf-8", "replace") if data else ""


def process_gone(pid):
    data = _read("/proc/%d/stat" % pid)
    return not data or data.decode("utf-8", "replace").rsplit(")", 1)[-1].split()[:1] == ["Z"]


class CommandLog(list):
    """The QMP commands sent, for the result's qmp_commands: a command sent again and again to the
    same socket (a wait) is listed once, with `repeated` giving the count."""

    def execute(self, client, command, arguments=None):
        entry = {"execute": command, "socket": client.address}
        if arguments:
            entry["arguments"] = arguments
        last = self[-1] if self else None
        if last is not None and dict((k, v) for k, v in last.items() if k != "repeated") == entry:
            last["repeated"] = last.get("repeated", 1) + 1
        else:
            self.append(entry)
        return client.execute(command, arguments)


def probe(socket_path, log, timeout):
    """What answers on a QMP socket: {state: answers|busy|none|error, name, status, version, msg}.
    busy: it accepts connections but sends no greeting (another client holds it); none: no socket,
    or nothing listens on it. The queries go into `log` (a CommandLog)."""
    seen = {"state": "error", "name": None, "status": None, "version": None, "msg": ""}
    try:
        with QMPClient(socket_path=socket_path, timeout=timeout) as client:
            seen.update(state="answers", status=log.execute(client, "query-status")["status"],
                        version=log.execute(client, "query-version")["qemu"],
                        name=log.execute(client, "query-name").get("name"))
    except QMPConnectError as exc:
        seen["msg"] = str(exc)
        seen["state"] = {"busy": "busy", "missing": "none", "refused": "none"}.get(exc.reason, "error")
    except (QMPError, OSError) as exc:
        seen["msg"] = str(exc)
    return seen


class VMProcess:
    """One VM's QEMU on this host. `params` are the qmp_vm_process module's options; `check_mode`
    changes nothing; `warn` takes a warning for the user."""

    def __init__(self, params, check_mode=False, warn=None):
        self.params = params
        self.check_mode = check_mode
        self.warn = warn or (lambda message: None)
        self.changed = False
        self.commands = CommandLog()
        self.name = params["name"]
        self.definition = dict(params["definition"] or {})
        self.instance = params["instance"] or ""
        self.run_dir = params["run_dir"]
        self._validate()
        self.definition["name"] = self.name
        self.qmp_socket = params.get("socket") or self.definition.get("qmp_socket") or self._run_file(".qmp")
        self.definition["qmp_socket"] = self.qmp_socket
        self.extra_qmp_socket = self.definition.get("extra_qmp_socket") or ""
        serial = self.definition.get("serial") or None
        self.serial = serial
        self.serial_log = serial["path"] if serial and serial.get("type", "file") == "file" else None
        self.pidfile = self._run_file(".pid")
        self.state_file = self._run_file(".json")
        # The marker belongs to the VM, not to one of its QEMUs: it has no instance.
        self.moved_marker = os.path.join(self.run_dir, self.name + ".moved")
        self.unit = "qemu-qmp-%s%s" % (self.name, self.instance)
        self.probe_timeout = params.get("timeout") or PROBE_TIMEOUT
        self.exit_timeout = params.get("wait_timeout") or EXIT_TIMEOUT
        self.supervisor = params["supervisor"]
        if self.supervisor == "auto":
            self.supervisor = "systemd" if os.path.isdir("/run/systemd/system") else "daemon"
        self.pid = 0
        self.alive = False
        self.status = None
        self.qmp = {"state": "none", "name": None, "status": None, "version": None, "msg": ""}
        self.saved = {}
        self.moved = None

    # -- description ---------------------------------------------------------------

    def _validate(self):
        name, instance = self.name, self.instance
        # The VM's files are named after it in run_dir: a "/" or ".." would put them elsewhere.
        if not isinstance(name, str) or not re.match(r"^[^/\x00]+$", name) or name in (".", ".."):
            raise VMProcessError('vm_name %s must be a plain name (no "/", not "." or ".."): it names the VM\'s '
                                 "files in vm_run_dir (%s)" % (json.dumps(name), self.run_dir))
        if not isinstance(instance, str) or not re.match(r"^[^/\x00]*$", instance) or name + instance == "..":
            raise VMProcessError('vm_instance %s must be a plain suffix (no "/")' % json.dumps(instance))
        serial = self.definition.get("serial")
        if not (serial is None or serial == {} or (
                isinstance(serial, dict) and serial.get("type", "file") in ("file", "socket")
                and isinstance(serial.get("path", ""), str) and serial.get("path"))):
            raise VMProcessError("vm_serial must be null (no serial port) or {type: file or socket, path: ...}, "
                                 "not %s" % json.dumps(serial))

    def _run_file(self, suffix, instance=None):
        return os.path.join(self.run_dir, self.name + (self.instance if instance is None else instance) + suffix)

    def files(self):
        """Every file name the VM has, as the role's vm_result reports them."""
        return {"run_dir": self.run_dir, "qmp_socket": self.qmp_socket,
                "extra_qmp_socket": self.extra_qmp_socket or None, "pidfile": self.pidfile,
                "definition_file": self.state_file, "serial_log": self.serial_log,
                "moved_marker": self.moved_marker}

    def runtime_files(self):
        files = [self.qmp_socket, self.extra_qmp_socket, self.pidfile, self.state_file]
        if self.serial and self.serial.get("type", "file") == "socket":
            files.append(self.serial["path"])
        return [f for f in files if f]

    def command_line(self):
        return vm_command_line(self.definition)

    def saved_definition(self):
        """The definition with where its files are: what a restore needs to start the VM again."""
        return dict(self.definition, run_dir=self.run_dir, instance=self.instance, supervisor=self.params["supervisor"])

    # -- what runs -------------------------------------------------------------------

    def _found_pid(self):
        if self.supervisor == "daemon":
            text = (_read(self.pidfile) or b"").decode("utf-8", "replace").strip()
            return int(text) if re.match(r"^[0-9]{1,9}$", text) else 0
        shown = self._run(["systemctl", "show", "--property=MainPID", "--property=ActiveState", self.unit])
        if not re.search(r"ActiveState=(active|activating|reloading)", shown.stdout):
            return 0
        found = re.search(r"MainPID=(\d+)", shown.stdout)
        return int(found.group(1)) if found else 0

    def inspect(self):
        """Find this VM's QEMU and what answers on its QMP socket; warn about a pidfile that names
        another process."""
        self.saved = _read_json(self.state_file) or {}
        found = self._found_pid()
        cmdline = process_cmdline(found) if found > 0 else ""
        started = process_started(found) if cmdline else None
        name_arg = "\x00-name\x00%s\x00" % self.name.replace(",", ",,")
        this_vm = bool(cmdline) and ("\x00" + cmdline).find(name_arg) >= 0 \
            and str(self.saved.get("started", "")) in ("", started)
        self.alive = this_vm
        self.pid = found if this_vm else 0
        self.qmp = probe(self.qmp_socket, self.commands, self.probe_timeout)
        self.status = self.qmp["status"] if self.alive else None
        if cmdline and not this_vm:
            command = " ".join(a for a in cmdline.split("\x00") if a)
            self.warn("%s names process %d, which is not VM %s's QEMU (%s): that process is left alone."
                      % (self.pidfile if self.supervisor == "daemon" else self.unit, found, self.name,
                         command if len(command) <= 200 else command[:197] + "..."))
        self.moved = self.read_moved()

    def read_moved(self):
        """The moved marker as {to, at}, or None. A marker that cannot be read still says that the VM moved."""
        data = _read(self.moved_marker)
        if data is None:
            return None
        text = data.decode("utf-8", "replace").strip()
        try:
            marker = json.loads(text) if text.startswith("{") and text.endswith("}") else {}
        except ValueError:
            marker = {}
        if not isinstance(marker, dict):
            marker = {}
        return {"to": marker.get("moved_to") or "an unknown host", "at": marker.get("moved_at") or "an unknown time"}

    # -- states ----------------------------------------------------------------------

    def running(self):
        command_line = self.command_line()
        saved_command_line = self.saved.get("command_line") if self.alive else None
        definition_changed = bool(self.alive and saved_command_line is not None
                                  and saved_command_line != command_line)
        was_alive = self.alive
        restart = self.params["restart_on_change"]
        incoming = bool(self.definition.get("incoming"))
        if self.alive and (self.qmp["state"] != "answers" or self.qmp["status"] == "postmigrate"):
            self._refuse_unaskable()
        if not was_alive and self.moved and not incoming and not self.params["start_moved"]:
            raise VMProcessError("VM %s moved to %s at %s (marker %s): it runs there now. Set vm_start_moved: true "
                                 "to start it here anyway" % (self.name, self.moved["to"], self.moved["at"],
                                                              self.moved_marker))
        if was_alive and self.moved:
            self.warn("VM %s runs on this host, but %s says that it moved to %s at %s: if it runs there too, stop "
                      "one of them. The marker is left as it is." % (self.name, self.moved_marker, self.moved["to"],
                                                                     self.moved["at"]))
        if definition_changed and restart:
            self.stop(self.params["shutdown_timeout"])
        if not self.alive:
            self.start(command_line)
        if not was_alive and self.moved and self.params["start_moved"] and not incoming:
            self._remove(self.moved_marker)
            self.moved = None
        result = self.result("running")
        result.update(unit=self.unit if self.supervisor == "systemd" else "", command_line=command_line,
                      definition_changed=definition_changed and not restart)
        if definition_changed and not restart:
            result["running_command_line"] = saved_command_line
        return result

    def _refuse_unaskable(self):
        """A QEMU of this VM that handed the VM over by migration (postmigrate) no longer runs it, and one
        that cannot be asked is not started again beside: either would run the guest twice."""
        if self.qmp["state"] == "answers":
            incoming = [path for path in (self._run_file(".qmp", ".incoming"), self._run_file(".qmp", ".incoming2"))
                        if os.path.exists(path)]
            here = (" (on this host: %s, a destination not yet made the VM's own: run the migration again to "
                    "finish it)" % ", ".join(incoming)) if incoming else ""
            raise VMProcessError(
                "VM %s's QEMU (pid %d, %s) is postmigrate: it handed the VM over by a migration and no longer runs "
                "it. The VM runs where it migrated to%s. Stop this QEMU with vm_state=absent once the VM runs there."
                % (self.name, self.pid, self.qmp_socket, here))
        if self.qmp["state"] == "busy":
            raise VMProcessError(
                "VM %s's QEMU (pid %d) runs, but another client holds its QMP socket %s (a QMP socket serves one "
                "client at a time), so the role cannot ask QEMU for its state. Close that client (give tools "
                "vm_extra_qmp_socket), then run again." % (self.name, self.pid, self.qmp_socket))
        raise VMProcessError(
            "VM %s's QEMU (pid %d) runs, but it cannot be asked for its state on %s: %s. It is not started a second "
            "time; stop it with vm_state=absent." % (self.name, self.pid, self.qmp_socket, self.qmp["msg"]))

    def absent(self):
        leftovers = [f for f in self.runtime_files() if os.path.lexists(f)]
        # A busy socket may be this VM's QEMU, started some other way: the role cannot tell.
        if not self.alive and self.qmp["state"] == "busy":
            raise VMProcessError(
                "%s is in use: it accepts connections but sends no QMP greeting (another client holds it), and no "
                "QEMU this role started as VM %s runs (%s). The role cannot tell whether VM %s runs there, so it "
                "leaves it alone: close that client, then run again."
                % (self.qmp_socket, self.name, self.pidfile, self.name))
        if self.alive or (self.qmp["state"] == "answers" and self.qmp["name"] == self.name) or leftovers:
            self.stop(self.params["shutdown_timeout"])
        moved_to = self.params["moved_to"] or ""
        # The VM runs on moved_to now: the marker keeps vm_state=running from starting it here again.
        # The same marker again is unchanged, with its first time.
        if moved_to and (self.moved is None or self.moved["to"] != moved_to):
            self.moved = {"to": moved_to,
                          "at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            self.make_run_dir()
            self.changed = True
            if not self.check_mode:
                _write_json(self.moved_marker, {"vm": self.name, "moved_to": moved_to, "moved_at": self.moved["at"],
                                                "from": self.params["this_host"]})
        return self.result("absent")

    def adopt(self):
        """Make the QEMU that runs this VM under the instance name adopt_instance (a migration's destination)
        the VM's own: its files take the VM's names and its saved command line becomes the definition's, so
        the VM is found again unchanged. The old QEMU's serial log is kept as <log>.previous. The VM runs on
        this host again, so its moved marker goes."""
        adopted = self.params["adopt_instance"] or ""
        self.moved = self.read_moved()
        if adopted and self.serial_log and os.path.exists(self.serial_log + adopted):
            self.keep_serial_log()
        if adopted:
            renames = [(self._run_file(".qmp", adopted), self.qmp_socket),
                       (self._run_file(".pid", adopted), self.pidfile),
                       (self._run_file(".json", adopted), self.state_file)]
            if self.serial:
                renames.append((self.serial["path"] + adopted, self.serial["path"]))
            if self.extra_qmp_socket:
                renames.append((self.extra_qmp_socket + adopted, self.extra_qmp_socket))
            for old, new in renames:
                if os.path.lexists(old):
                    self.changed = True
                    if not self.check_mode:
                        os.replace(old, new)
        # In check mode the files keep the names the QEMU was started with.
        where = adopted if self.check_mode else ""
        saved = _read_json(self._run_file(".json", where)) or {}
        command_line = self.command_line()
        # The process's pid and start time stay: they prove which process is the VM's QEMU.
        if saved.get("command_line") != command_line:
            self.changed = True
            if not self.check_mode:
                _write_json(self.state_file, dict(saved, command_line=command_line, definition=self.saved_definition()))
        if self.moved is not None:
            self._remove(self.moved_marker)
            self.moved = None
        text = (_read(self._run_file(".pid", where)) or b"").decode("utf-8", "replace").strip()
        self.pid = int(text) if text.isdigit() else 0
        self.status = probe(self._run_file(".qmp", where), self.commands, self.probe_timeout)["status"]
        result = self.result("running")
        del result["supervisor"]
        result.update(definition_changed=False, command_line=command_line)
        return result

    def result(self, state):
        return dict(self.files(), name=self.name, state=state, pid=self.pid, status=self.status,
                    supervisor=self.supervisor, serial=self.serial, moved=self.moved, changed=self.changed,
                    qmp_commands=self.commands)

    # -- actions ---------------------------------------------------------------------

    def _run(self, argv):
        # Standard library only, like the rest of the engine (it does not hold an AnsibleModule).
        return subprocess.run(argv, capture_output=True, text=True, check=False)  # pylint: disable=ansible-bad-function

    def _remove(self, path):
        if os.path.lexists(path):
            self.changed = True
            if not self.check_mode:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def make_run_dir(self):
        """A new run folder is private (0750). An existing one is used as it is, never chmodded: it may be
        shared (/run/..., or a folder with the sticky bit, like /tmp). One every user can write to without
        the sticky bit is refused: anyone could replace the VM's socket or pidfile there."""
        try:
            mode = os.stat(self.run_dir).st_mode
        except FileNotFoundError:
            self.changed = True
            if not self.check_mode:
                os.makedirs(self.run_dir, RUN_DIR_MODE, exist_ok=True)
                os.chmod(self.run_dir, RUN_DIR_MODE)
            return
        if not stat.S_ISDIR(mode):
            raise VMProcessError("vm_run_dir %s is not a folder" % self.run_dir)
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise VMProcessError(
                "vm_run_dir %s (mode %04o) is writable by every user and has no sticky bit: anyone could replace "
                "VM %s's QMP socket or pidfile there. Use a folder of its own (the role makes it, mode 0750), or "
                "set the sticky bit (chmod +t)" % (self.run_dir, stat.S_IMODE(mode), self.name))

    def keep_serial_log(self):
        """A new QEMU's serial log is about to take the log's name: the log there, of the QEMU before, is kept
        as <log>.previous (replacing an older one), so the guest's earlier output is not overwritten."""
        if os.path.exists(self.serial_log):
            self.changed = True
            if not self.check_mode:
                os.replace(self.serial_log, self.serial_log + ".previous")

    def start(self, command_line):
        self.make_run_dir()
        # Whatever answers on the QMP socket is not this VM's QEMU (that one would be alive): QEMU would
        # take the socket over from it, so the role never starts beside it.
        if self.qmp["state"] == "answers":
            raise VMProcessError(
                "%s is in use by another QEMU (QEMU %d.%d%s), which this role did not start as VM %s; QEMU would "
                "take the socket over from it. Stop that QEMU or choose another vm_qmp_socket."
                % (self.qmp_socket, self.qmp["version"]["major"], self.qmp["version"]["minor"],
                   ", named " + self.qmp["name"] if self.qmp["name"] else "", self.name))
        if self.qmp["state"] == "busy":
            raise VMProcessError(
                "%s is in use: it accepts connections but sends no QMP greeting, so a QEMU that this role did not "
                "start as VM %s probably runs there with another client holding its QMP socket. The VM is not "
                "started beside it: stop that QEMU (or close that client), or choose another vm_qmp_socket."
                % (self.qmp_socket, self.name))
        if self.qmp["state"] != "none":
            raise VMProcessError("VM %s is not started: its QMP socket %s cannot be used: %s"
                                 % (self.name, self.qmp_socket, self.qmp["msg"]))
        # Runtime files left behind by a VM that did not stop cleanly.
        self.stop(0)
        if self.serial_log:
            self.keep_serial_log()
        self.changed = True
        if self.check_mode:
            return
        # From the moment QEMU runs it is this VM's: a failure below stops it again.
        try:
            self._launch(command_line)
            self._wait_until_it_answers()
        except VMProcessError as exc:
            journal = ""
            if self.supervisor == "systemd":
                journal = self._run(["journalctl", "--unit", self.unit, "--lines", "20", "--no-pager",
                                     "--output", "cat"]).stdout.strip()
            if not self.alive:
                self._wait_until_sockets_refuse(5)
            self.stop(0)
            raise VMProcessError(("VM %s did not start: %s %s" % (self.name, exc, journal)).strip())

    def _wait_until_sockets_refuse(self, timeout):
        """A QEMU that failed to start may still be exiting, its QMP sockets accepting for a moment: wait
        until they refuse (nothing else can be there: the start was refused on a socket in use), so that
        stop() removes them."""
        deadline = time.monotonic() + timeout
        for path in (self.qmp_socket, self.extra_qmp_socket):
            while path and time.monotonic() < deadline and probe(path, self.commands, 1)["state"] != "none":
                time.sleep(0.1)

    def _launch(self, command_line):
        if self.supervisor == "daemon":
            launched = self._run(command_line + ["-daemonize", "-pidfile", self.pidfile])
        else:
            launched = self._run(["systemd-run", "--unit", self.unit, "--collect", "--quiet", "--description",
                                  "QEMU VM " + self.name, "--property", "KillMode=mixed", "--"] + command_line)
        if launched.returncode != 0:
            raise VMProcessError(launched.stderr.strip() or "%s exited with %d" % (command_line[0], launched.returncode))
        pid = self._found_pid() if self.supervisor == "daemon" else int(
            self._run(["systemctl", "show", "--property=MainPID", "--value", self.unit]).stdout.strip() or 0)
        started = process_started(pid) if pid > 0 else None
        if started is None:
            raise VMProcessError("QEMU exited at once (pid %s)" % (pid or "unknown"))
        self.pid, self.alive = pid, True
        # The start time tells this QEMU from a later process that reuses its pid.
        # The definition too: a backup keeps it in its manifest, so a restore can start the VM again.
        self.saved = {"command_line": command_line, "pid": pid, "started": started,
                      "definition": self.saved_definition()}
        _write_json(self.state_file, self.saved)

    def _wait_until_it_answers(self):
        deadline = time.monotonic() + max(1, int(self.params["start_timeout"]))
        while True:
            seen = probe(self.qmp_socket, self.commands, self.probe_timeout)
            if seen["state"] == "answers":
                self.qmp, self.status = seen, seen["status"]
                return
            if process_gone(self.pid) or time.monotonic() >= deadline:
                raise VMProcessError("QEMU (pid %d) did not answer on %s within %ss: %s"
                                     % (self.pid, self.qmp_socket, self.params["start_timeout"], seen["msg"]))
            time.sleep(0.05)

    def stop(self, shutdown_timeout):
        """Stop this VM's QEMU: gracefully if the guest answers, by force if it does not. Then the VM's
        runtime files go, except a socket something still answers on."""
        quit_over_qmp = self.qmp["state"] == "answers" and (self.alive or self.qmp["name"] == self.name)
        if quit_over_qmp:
            self.changed = True
            if not self.check_mode:
                self._quit(shutdown_timeout)
        elif self.alive and self.supervisor == "daemon":
            # QEMU ends cleanly on SIGTERM too (its QMP socket may be held by another client).
            self.changed = True
            if not self.check_mode:
                self._signal(signal.SIGTERM)
        if self.alive and not self.check_mode:
            if self.supervisor == "systemd":
                self._run(["systemctl", "stop", self.unit])
            if not self._wait_gone(self.exit_timeout) and self.supervisor == "daemon":
                self._signal(signal.SIGKILL)
                self._wait_gone(5)
        # A socket that accepts a connection belongs to a live QEMU (or another client holds it): it
        # stays. One that refuses is a dead QEMU's leftover.
        live = [path for path in (self.qmp_socket, self.extra_qmp_socket)
                if path and probe(path, self.commands, min(2, self.probe_timeout))["state"] not in ("none",)]
        for path in self.runtime_files():
            if path not in live:
                self._remove(path)
        self.alive, self.pid, self.status = False, 0, None
        self.qmp = {"state": "none", "name": None, "status": None, "version": None, "msg": ""}

    def _quit(self, shutdown_timeout):
        try:
            with QMPClient(socket_path=self.qmp_socket, timeout=max(10, self.probe_timeout)) as client:
                if shutdown_timeout > 0 and self.commands.execute(client, "query-status").get("running"):
                    self.commands.execute(client, "system_powerdown")
                    try:
                        client.wait_for_event(("SHUTDOWN",), timeout=shutdown_timeout)
                    except QMPTimeoutError:
                        pass  # the guest ignored the power button: quit below
                self.commands.execute(client, "quit")
                client.wait_closed(self.exit_timeout)
        except (QMPConnectionClosed, QMPTimeoutError):
            pass  # QEMU closed the connection: it exited
        except QMPError:
            pass  # it went away while being asked, or never answered: the process checks below decide

    def _signal(self, number):
        if self.pid > 0 and process_started(self.pid) == str(self.saved.get("started") or process_started(self.pid)):
            try:
                os.kill(self.pid, number)
            except OSError:
                pass

    def _wait_gone(self, timeout):
        deadline = time.monotonic() + timeout
        while not process_gone(self.pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
