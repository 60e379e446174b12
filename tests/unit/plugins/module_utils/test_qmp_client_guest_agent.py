# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of the QMP client's guest-agent protocol (qemu-ga), against the fake server.

The QEMU guest agent sends no greeting and takes no qmp_capabilities: the client syncs
with guest-sync and a fresh integer token, and skips whatever answers an earlier client
left in the channel until the agent echoes that token.
"""

from __future__ import annotations

import socket
import time

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import (
    QMPClient,
    QMPConnectError,
    QMPConnectionClosed,
)

# Long enough never to be hit by a passing test, short enough to fail fast.
TIMEOUT = 5.0
# For the tests that wait for a timeout on purpose.
SHORT = 0.3
# How late a timeout may fire on a loaded machine.
SLACK = 1.0

# Answers left in the channel by earlier clients. The token is always a positive integer, so
# none of these can pass for it; one carries the id this client gives its guest-sync.
STALE = [
    {"return": 0},
    {"return": -17},
    {"return": {}},
    {"return": [{"name": "eth0"}]},
    {"return": 0, "id": "qemu.qmp-1"},
    {"return": 3, "id": "qemu.qmp-2"},
    {"error": {"class": "GenericError", "desc": "late failure"}, "id": "qemu.qmp-2"},
]


@pytest.fixture(name="agent")
def fixture_agent(serve):
    """agent(**kwargs) starts a FakeQMPServer without greeting, as qemu-ga is; stopped after the test."""

    def start(**kwargs):
        kwargs.setdefault("greeting", None)
        return serve(**kwargs)
    return start


def echo_sync(session, message):
    """qemu-ga's guest-sync: the id argument back, with the request's id."""
    session.reply(message, message["arguments"]["id"])


def never_answer(_session, _message):
    """The host end of a virtio-serial channel when qemu-ga does not run: nobody reads."""


def send_stale(messages):
    """A greeting hook that leaves `messages` in the channel before the client says anything."""
    def greeting(session):
        for message in messages:
            session.send(message)
    return greeting


def assert_mentions(exc, *parts):
    text = str(exc)
    for part in parts:
        assert part in text, "%r not in %r" % (part, text)


def test_protocol_is_checked():
    with pytest.raises(ValueError, match="protocol is qmp or guest-agent"):
        QMPClient("/nonexistent", protocol="qga")


def test_sync_then_command(agent, sock_path):
    server = agent(commands={"guest-sync": echo_sync, "guest-fsfreeze-freeze": 1})
    client = QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent")
    with client:
        assert client.connected
        assert client.greeting is None
        assert client.execute("guest-fsfreeze-freeze") == 1
    assert not client.connected
    received = server.wait_for_messages(2)
    assert server.commands_received() == ["guest-sync", "guest-fsfreeze-freeze"]  # no qmp_capabilities
    token = received[0]["arguments"]["id"]
    assert isinstance(token, int) and not isinstance(token, bool)
    assert token > 0
    assert set(received[0]["arguments"]) == {"id"}
    assert received[0]["id"] != received[1]["id"]
    assert "arguments" not in received[1]


def test_connect_returns_no_greeting(agent, sock_path):
    agent(commands={"guest-sync": echo_sync})
    client = QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent")
    try:
        assert client.connect() is None
    finally:
        client.close()


def test_version_is_none_for_the_guest_agent(agent, sock_path):
    agent(commands={"guest-sync": echo_sync, "guest-info": {"version": "9.2.0", "supported_commands": []}})
    with QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent") as client:
        assert client.version is None
        assert client.execute("guest-info")["version"] == "9.2.0"
        assert client.version is None


def test_stale_replies_before_the_sync_are_skipped(agent, sock_path):
    server = agent(greeting=send_stale(STALE), commands={"guest-sync": echo_sync, "guest-fsfreeze-freeze": 1})
    with QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent") as client:
        # Had a stale answer been left unread, it would pass for this command's answer.
        assert client.execute("guest-fsfreeze-freeze") == 1
        assert list(client.events) == []
    assert server.commands_received() == ["guest-sync", "guest-fsfreeze-freeze"]


def test_late_answers_to_an_earlier_sync_are_skipped(agent, sock_path):
    """Answers that arrive with the sync's own id, before the one echoing this client's token."""
    def late_then_echo(session, message):
        session.send({"return": 1, "id": message["id"]})
        session.send({"return": {}, "id": message["id"]})
        session.send({"return": message["arguments"]["id"] + 1})
        echo_sync(session, message)

    server = agent(commands={"guest-sync": late_then_echo, "guest-fsfreeze-status": "thawed"})
    with QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent") as client:
        assert client.execute("guest-fsfreeze-status") == "thawed"
    assert server.commands_received() == ["guest-sync", "guest-fsfreeze-status"]


def test_each_client_syncs_again(agent, sock_path):
    server = agent(commands={"guest-sync": echo_sync, "guest-ping": {}})
    for dummy in range(2):
        with QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent") as client:
            assert client.execute("guest-ping") == {}
        server.wait_for_sessions_closed(len(server.sessions))
    assert server.commands_received() == ["guest-sync", "guest-ping"] * 2


def test_stale_error_without_id_before_the_sync_is_skipped(agent, sock_path):
    stale = [{"error": {"class": "CommandNotFound", "desc": "The command guest-bogus has not been found"}}]
    agent(greeting=send_stale(stale), commands={"guest-sync": echo_sync, "guest-ping": {}})
    with QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent") as client:
        assert client.execute("guest-ping") == {}


def test_agent_that_never_answers_is_busy(agent, sock_path):
    server = agent(commands={"guest-sync": never_answer})
    client = QMPClient(sock_path, timeout=SHORT, protocol="guest-agent")
    started = time.monotonic()
    with pytest.raises(QMPConnectError) as info:
        client.connect()
    elapsed = time.monotonic() - started
    assert SHORT * 0.9 <= elapsed < SHORT + SLACK
    assert info.value.reason == "busy"
    assert info.value.address == sock_path
    assert_mentions(info.value, "guest agent", sock_path, "qemu-ga", "no answer within 0.3s")
    assert "QMP" not in str(info.value)
    assert not client.connected
    assert server.commands_received() == ["guest-sync"]


def test_agent_that_answers_only_stale_replies_is_busy(agent, sock_path):
    def stale_only(session, message):
        session.send({"return": 0, "id": message["id"]})
        session.send({"return": 0})

    agent(commands={"guest-sync": stale_only})
    client = QMPClient(sock_path, timeout=SHORT, protocol="guest-agent")
    started = time.monotonic()
    with pytest.raises(QMPConnectError) as info:
        client.connect()
    assert time.monotonic() - started < SHORT + SLACK
    assert info.value.reason == "busy"
    assert_mentions(info.value, "guest agent", "qemu-ga")
    assert not client.connected


def test_agent_that_closes_the_channel(agent, sock_path):
    def hang_up(session, _message):
        session.close()

    agent(commands={"guest-sync": hang_up})
    client = QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent")
    with pytest.raises(QMPConnectionClosed) as info:
        client.connect()
    assert_mentions(info.value, sock_path, "guest-sync")
    assert not client.connected


def test_missing_socket_mentions_the_guest_agent(sock_path):
    client = QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent")
    with pytest.raises(QMPConnectError) as info:
        client.connect()
    assert info.value.reason == "missing"
    assert info.value.address == sock_path
    assert_mentions(info.value, "cannot connect to the guest agent at %s" % sock_path, "no such file",
                    "-chardev socket,path=%s" % sock_path)
    assert "QMP" not in str(info.value)
    assert "-qmp" not in str(info.value)


def test_other_connect_errors_mention_the_guest_agent(sock_dir, sock_path):
    with pytest.raises(QMPConnectError) as info:
        QMPClient(sock_dir, timeout=TIMEOUT, protocol="guest-agent").connect()
    assert info.value.reason == "not_socket"
    assert_mentions(info.value, "cannot connect to the guest agent at %s" % sock_dir, "not a socket")

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: QEMU was killed
    with pytest.raises(QMPConnectError) as info:
        QMPClient(sock_path, timeout=TIMEOUT, protocol="guest-agent").connect()
    assert info.value.reason == "refused"
    assert_mentions(info.value, "cannot connect to the guest agent at %s" % sock_path, "connection refused")
