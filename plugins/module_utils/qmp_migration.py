# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Live migration: capabilities, parameters, listening, migrating, following.

Parameter names follow the running QEMU: `migrate-set-parameters` where it
has the parameter, the older single-purpose commands where only they exist
(`migrate_set_speed` in bytes/s, `migrate_set_downtime` in seconds).
"""

from __future__ import annotations

import time

from ansible.module_utils.parsing.convert_bool import boolean

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPError, QMPTimeoutError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_state import read_status

# Statuses after which nothing more happens by itself.
FINAL = frozenset(["completed", "failed", "cancelled"])
# Statuses of a migration under way (QEMU refuses a new `migrate` then).
ACTIVE = frozenset(["setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
                    "pre-switchover", "device", "wait-unplug", "cancelling", "colo"])
MIGRATION_EVENTS = ("MIGRATION", "MIGRATION_PASS")

# Parameter -> (legacy command, conversion from the parameter's unit), for QEMUs without it.
_LEGACY = {
    "max-bandwidth": ("migrate_set_speed", int),
    "downtime-limit": ("migrate_set_downtime", lambda v: float(v) / 1000.0),  # ms -> seconds
    "xbzrle-cache-size": ("migrate-set-cache-size", int),
}


class MigrationError(QMPError):
    """A migration step failed; `details` (QEMU's migration info among them) go into the failed result."""

    def __init__(self, message, info=None, **details):
        super().__init__(message)
        self.info = info
        self.details = dict(details, **({"info": info} if info is not None else {}))


def read_info(qm):
    """query-migrate, with `status` none when no migration was started."""
    info = qm.query("query-migrate")
    info.setdefault("status", "none")
    return info


def read_capabilities(qm):
    return dict((c["capability"], c["state"]) for c in qm.query("query-migrate-capabilities"))


def read_parameters(qm):
    if qm.schema.has_command("query-migrate-parameters"):
        return qm.query("query-migrate-parameters")
    return {}


def as_boolean(what, value):
    """`value` as Ansible reads a boolean ("no", "off", "false" and "0" are false), or a MigrationError."""
    try:
        return boolean(value, strict=True)
    except TypeError:
        raise MigrationError("%s must be true or false (yes/no, on/off, 1/0), not %r" % (what, value))


def _same(wanted, reported):
    if wanted is None:
        return reported in (None, "")
    if isinstance(reported, bool) or isinstance(wanted, bool):
        return bool(wanted) == bool(reported)
    if isinstance(reported, (int, float)) and not isinstance(wanted, bool):
        try:
            return float(wanted) == float(reported)
        except (TypeError, ValueError):
            return False
    return wanted == reported


def configure(qm, capabilities, parameters):
    """Set the capabilities and parameters that differ; returns (before, after, changed keys)."""
    known = qm.schema.feature("migration_capabilities") or []
    current_caps = read_capabilities(qm)
    unknown = [name for name in capabilities if known and name not in known]
    if unknown:
        raise MigrationError("this QEMU has no migration capability %s (it has: %s)"
                             % (", ".join(sorted(unknown)), ", ".join(known)))
    capabilities = dict((name, as_boolean("capability " + name, state)) for name, state in capabilities.items())
    caps = [{"capability": name, "state": state} for name, state in sorted(capabilities.items())
            if bool(current_caps.get(name)) != state]
    current_params = read_parameters(qm)
    params, legacy = {}, []
    parameters = dict(parameters)
    for name, value in sorted(parameters.items()):
        if isinstance(current_params.get(name), bool):
            value = parameters[name] = as_boolean("parameter " + name, value)
        if qm.schema.has_argument("migrate-set-parameters", name):
            if name not in current_params or not _same(value, current_params.get(name)):
                params[name] = value
        elif name in _LEGACY and qm.schema.has_command(_LEGACY[name][0]):
            legacy.append((name, value))  # not readable back: always set
        else:
            raise MigrationError("this QEMU has no migration parameter %s" % name)
    if caps:
        qm.change("migrate-set-capabilities", {"capabilities": caps})
    if params:
        qm.change("migrate-set-parameters", params)
    for name, value in legacy:
        command, convert = _LEGACY[name]
        qm.change(command, {"value": convert(value)})
    changed = [c["capability"] for c in caps] + sorted(params) + [n for n, dummy in legacy]
    before = {"capabilities": dict((k, bool(current_caps.get(k))) for k in capabilities),
              "parameters": dict((k, current_params.get(k)) for k in parameters)}
    after = {"capabilities": dict(capabilities),
             "parameters": dict(parameters)}
    return before, after, changed


def listening_address(info):
    """Where a destination listens, from query-migrate's socket-address (first one)."""
    addresses = info.get("socket-address") or []
    return addresses[0] if addresses else None


def uri_matches(uri, address):
    """Whether a migration URI (unix:PATH, tcp:HOST:PORT) names the address QEMU listens on."""
    if address is None:
        return False
    kind, dummy, rest = uri.partition(":")
    if kind == "unix":
        return address.get("type") == "unix" and address.get("path") == rest
    if kind == "tcp":
        host, dummy, port = rest.rpartition(":")
        host = host.strip("[]")
        return (address.get("type") == "inet" and str(address.get("port")) == port.split(",")[0]
                and (host in ("", "0.0.0.0", "::") or address.get("host") == host or port == "0"))
    return False


def progress(info):
    """Percent of RAM sent, rate and expected downtime, from query-migrate."""
    ram = info.get("ram") or {}
    total, remaining = ram.get("total") or 0, ram.get("remaining")
    out = {
        "status": info.get("status"),
        "percent": round(100.0 * (total - remaining) / total, 1) if total and remaining is not None else None,
        "transferred": ram.get("transferred"),
        "remaining": remaining,
        "total": total,
        "mbps": ram.get("mbps"),
        "passes": ram.get("dirty-sync-count"),
        "expected_downtime": info.get("expected-downtime"),
        "total_time": info.get("total-time"),
        "downtime": info.get("downtime"),
    }
    return out


class MigrationFollower:
    """Waits on a migration, following MIGRATION events with polling as the fallback."""

    def __init__(self, qm, poll_interval=0.5):
        self.qm = qm
        self.poll_interval = poll_interval
        self.events = []

    def _take_events(self, timeout):
        try:
            event = self.qm.client.wait_for_event(MIGRATION_EVENTS, timeout=timeout)
        except QMPTimeoutError:
            return
        self.events.append(event)
        while True:
            more = self.qm.client.take_event(lambda e: e.get("event") in MIGRATION_EVENTS)
            if more is None:
                return
            self.events.append(more)

    def passes(self):
        return max([e.get("data", {}).get("pass", 0) for e in self.events if e["event"] == "MIGRATION_PASS"] or [0])

    def wait(self, until, timeout, on_poll=None):
        """Poll query-migrate until `until(info)` or a final status; returns (info, reached)."""
        deadline = time.monotonic() + timeout
        while True:
            info = read_info(self.qm)
            if on_poll is not None:
                on_poll(info)
            if info["status"] in FINAL or until(info):
                return info, True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return info, False
            self._take_events(min(self.poll_interval, remaining))

    def settled(self, info):
        """QEMU 7.2 can report `completed` before it filled in its times: ask again briefly."""
        deadline = time.monotonic() + 3
        while info.get("status") == "completed" and not info.get("total-time") and time.monotonic() < deadline:
            time.sleep(0.05)
            info = read_info(self.qm)
        return info


def ensure_incoming(qm, uri):
    """Make a destination started with -incoming defer listen on `uri`; returns (info, address)."""
    info = read_info(qm)
    address = listening_address(info)
    if address is not None:
        if not uri_matches(uri, address):
            qm.fail("the destination already listens on %s, not %s; a destination listens once"
                    % (address, uri), listening=address)
        return info, address
    status = read_status(qm.query)["status"]
    if status != "inmigrate":
        qm.fail("QEMU is not waiting for an incoming migration (status %s): start it with -incoming defer"
                % status)
    qm.change("migrate-incoming", {"uri": uri})
    if qm.check_mode:
        return info, None
    info = read_info(qm)
    return info, listening_address(info)


def cancel(qm, info):
    """Cancel the migration under way, if any, and wait until it ended; returns the newest info."""
    if info["status"] in ACTIVE and info["status"] != "cancelling":
        qm.change("migrate_cancel")
        if not qm.check_mode:
            info, dummy = MigrationFollower(qm).wait(lambda i: False, qm.wait_timeout)
    return info


class Migration:
    """Start, follow and finish the outgoing migration of the VM behind the socket."""

    def __init__(self, qm, uri, postcopy=False, postcopy_after_passes=1):
        self.qm = qm
        self.uri = uri
        self.postcopy = postcopy
        self.postcopy_after_passes = postcopy_after_passes
        self.follower = MigrationFollower(qm)
        self.was_running = None
        self.postcopy_started = False

    def start_or_continue(self, info, switch_over):
        """Start a migration unless one is under way; continue one paused before switch-over if asked."""
        status = info["status"]
        if status == "pre-switchover":
            if switch_over:
                self.qm.change("migrate-continue", {"state": "pre-switchover"})
            return
        if status in ACTIVE:
            return
        run_state = read_status(self.qm.query)
        if status == "completed" and run_state["status"] == "postmigrate":
            return  # done: the VM already runs on the destination
        # Any other `completed` is stale: this QEMU received the VM itself, or resumed after sending it.
        if not self.uri:
            self.qm.fail("uri is required to start a migration")
        if self.postcopy and not self._capability("postcopy-ram"):
            self.qm.fail("postcopy needs the postcopy-ram capability on both sides (state=configured)")
        self.was_running = run_state["running"]
        self.qm.change("migrate", {"uri": self.uri})

    def _capability(self, name):
        return any(c["capability"] == name and c["state"] for c in self.qm.query("query-migrate-capabilities"))

    def _maybe_postcopy(self, info):
        if (self.postcopy and not self.postcopy_started and info["status"] == "active"
                and (self.follower.passes() >= self.postcopy_after_passes + 1
                     or (info.get("ram") or {}).get("dirty-sync-count", 0) > self.postcopy_after_passes)):
            self.qm.change("migrate-start-postcopy")
            self.postcopy_started = True

    def follow(self, timeout, stop_at_switchover):
        def until(info):
            return stop_at_switchover and info["status"] == "pre-switchover"
        info, reached = self.follower.wait(until, timeout, on_poll=self._maybe_postcopy)
        return self.follower.settled(info), reached

    def fail_with(self, info, reason):
        """Fail, leaving the source running as it was before the migration."""
        status = read_status(self.qm.query)
        if self.was_running and not status["running"] and status["status"] not in ("postmigrate", "shutdown"):
            self.qm.change("cont")
            status = read_status(self.qm.query)
        self.qm.fail(reason, info=info, source_status=status["status"], events=self.follower.events,
                     progress=progress(info))
