# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of the migration engine's decisions: capabilities per policy and side, addresses refused,
TLS parameters, and the convergence policy pass by pass.

The migrations themselves run against real QEMUs, on one host and across two (tests/integration).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import QMPTimeoutError
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_migration import MigrationError
from ansible_collections.qemu.qmp.plugins.module_utils.migration_engine import (
    Outgoing, capabilities_for, free_port, human_bytes, listening_tcp_ports, refuse_any_address, set_tls,
    split_tcp_uri)


class Schema:
    def __init__(self, arguments=("tls-creds", "tls-hostname", "downtime-limit")):
        self.arguments = arguments

    def has_argument(self, command, name):
        return command == "migrate-set-parameters" and name in self.arguments


class Recorder:
    """Just what Outgoing._converge touches of a QMPModule."""

    def __init__(self):
        self.sent = []
        self.schema = Schema()

    def change(self, command, arguments=None):
        self.sent.append((command, arguments))


def settings(**extra):
    base = {"copies": [], "downtime_limit": 300, "converge": "cancel", "converge_after_passes": 3,
            "downtime_ceiling": 2000, "downtime_steps": 5, "capabilities": {}, "parameters": {}, "tls_creds": None}
    base.update(extra)
    return base


def info(passes, status="active"):
    return {"status": status, "ram": {"dirty-sync-count": passes}}


def test_capabilities_follow_the_policy_and_the_side():
    caps = {"multifd": True, "events": True}
    assert capabilities_for("cancel", caps, [], "source") == caps
    wanted = {"multifd": False, "events": True, "postcopy-ram": True}
    assert capabilities_for("postcopy", caps, [], "destination") == wanted
    assert capabilities_for("auto-converge", caps, [], "source")["auto-converge"] is True
    assert "auto-converge" not in capabilities_for("auto-converge", caps, [], "destination")
    assert capabilities_for("cancel", caps, ["disk0"], "source")["pause-before-switchover"] is True
    assert "pause-before-switchover" not in capabilities_for("cancel", caps, ["disk0"], "destination")
    assert caps == {"multifd": True, "events": True}  # the caller's dict is left alone


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "[::]"])
def test_every_address_is_refused(host):
    with pytest.raises(MigrationError, match="every address"):
        refuse_any_address(host, "the migration listener")


def test_an_address_of_its_own_is_taken():
    refuse_any_address("127.0.0.3", "the migration listener")
    assert split_tcp_uri("tcp:127.0.0.3:4444") == ("127.0.0.3", "4444")
    assert split_tcp_uri("tcp:[::1]:0") == ("::1", "0")
    assert split_tcp_uri("unix:/run/x.migrate") is None


def test_a_free_port_is_free_on_that_address():
    port = free_port("127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_tls_on_off_and_unavailable():
    assert set_tls({"x": 1}, Schema(), "tls0", "host2") == {"x": 1, "tls-creds": "tls0", "tls-hostname": "host2"}
    assert set_tls({}, Schema(), None) == {"tls-creds": ""}  # off, even after an earlier TLS migration
    assert set_tls({}, Schema(arguments=()), None) == {}
    with pytest.raises(MigrationError, match="cannot encrypt"):
        set_tls({}, Schema(arguments=()), "tls0")


def test_downtime_policy_raises_the_limit_once_per_pass_up_to_the_ceiling():
    qm = Recorder()
    run = Outgoing(qm, settings(converge="downtime", downtime_steps=4, downtime_ceiling=1500), reporter=None)
    for passes in (1, 2, 3, 3):
        run._converge(info(passes))
    assert qm.sent == []  # not before the passes allowed
    for passes in (4, 4, 5, 6, 7, 8, 9):
        run._converge(info(passes))
    limits = [arguments["downtime-limit"] for dummy, arguments in qm.sent]
    assert limits == [600, 900, 1200, 1500]
    assert [s["pass"] for s in run.policy_steps] == [4, 5, 6, 7] and run.downtime_limit == 1500


def test_postcopy_policy_switches_once():
    qm = Recorder()
    run = Outgoing(qm, settings(converge="postcopy", converge_after_passes=1), reporter=None)
    for passes in (1, 2, 3):
        run._converge(info(passes))
    run._converge(info(4, status="postcopy-active"))
    assert qm.sent == [("migrate-start-postcopy", None)] and run.postcopy_started


@pytest.mark.parametrize("policy", ["cancel", "auto-converge"])
def test_other_policies_send_nothing_while_it_runs(policy):
    qm = Recorder()
    run = Outgoing(qm, settings(converge=policy), reporter=None)
    for passes in range(1, 20):
        run._converge(info(passes))
    assert qm.sent == [] and run.policy_steps == []


class Lines:
    can_abandon = True

    def __init__(self):
        self.lines = []

    def progress(self, line):
        self.lines.append(line)


class Migrating(Recorder):
    """A source whose query-migrate answers from a script: QEMU leaves pre-switchover a moment after
    migrate-continue, so the first answers after it may still say pre-switchover."""

    def __init__(self, statuses):
        super().__init__()
        self.statuses = list(statuses)
        self.client = self

    def wait_for_event(self, names, timeout):
        raise QMPTimeoutError("no event")

    def query(self, command, arguments=None):
        assert command == "query-migrate"
        return {"status": self.statuses.pop(0), "total-time": 1}


def test_the_switch_over_happens_once_though_qemu_is_slow_to_leave_pre_switchover():
    qm = Migrating(["pre-switchover", "pre-switchover", "pre-switchover", "device", "completed"])
    run = Outgoing(qm, settings(copies=[{"node": "disk0", "export": "e"}], timeout=60, poll_interval=0.01),
                   reporter=Lines())
    finished = []
    run._finish_copies = lambda: finished.append(True)
    run.started = time.monotonic()
    assert run._follow()["status"] == "completed"
    assert finished == [True] and qm.sent == [("migrate-continue", {"state": "pre-switchover"})]


def test_human_bytes():
    assert human_bytes(0) == "0 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(3 * 1024 ** 3) == "3.0 GiB"


def test_listening_ports_of_a_process_are_read_from_proc():
    with socket.socket() as four, socket.socket(socket.AF_INET6) as six, socket.socket() as idle:
        four.bind(("127.0.0.1", 0))
        four.listen()
        six.bind(("::1", 0))
        six.listen()
        idle.bind(("127.0.0.1", 0))  # bound, not listening
        found = listening_tcp_ports(os.getpid())
        assert ("127.0.0.1", four.getsockname()[1]) in found and ("::1", six.getsockname()[1]) in found
        assert ("127.0.0.1", idle.getsockname()[1]) not in found
    assert listening_tcp_ports(2 ** 22 + 1) == set()  # no such process


@pytest.mark.parametrize("passes, expected, ending", [
    (1, None, ", downtime limit 300 ms"),
    (1, 300, ", downtime limit 300 ms"),  # during the first pass QEMU reports the limit as its estimate
    (2, None, ", downtime limit 300 ms"),
    (2, 2506, ", expected downtime 2506 ms (limit 300 ms)"),
])
def test_the_progress_line_shows_an_expected_downtime_only_once_qemu_estimates_one(passes, expected, ending):
    run = Outgoing(Recorder(), settings(), reporter=None)
    migration = {"status": "active", "ram": {"total": 4 << 20, "remaining": 1 << 20, "transferred": 3 << 20,
                                             "dirty-sync-count": passes, "mbps": 8.0}}
    if expected is not None:
        migration["expected-downtime"] = expected
    line = run._line(migration)
    assert line.startswith("active: 75%% of RAM sent (3.0 MiB transferred, 1.0 MiB left, pass %d) at " % passes), line
    assert line.endswith(ending) and "?" not in line and " MB" not in line, line
