# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of the QMP client, against a fake QMP server."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import (
    QMPClient,
    QMPCommandError,
    QMPConnectError,
    QMPConnectionClosed,
    QMPError,
    QMPGreetingError,
    QMPProtocolError,
    QMPTimeoutError,
    describe_address,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_schema import QMPSchema, cache_path
from ansible_collections.qemu.qmp.tests.unit.plugins.module_utils.fake_qmp import (
    GREETING,
    FakeQMPServer,
    event_message,
)

# Long enough never to be hit by a passing test, short enough to fail fast.
TIMEOUT = 5.0
# For the tests that wait for a timeout on purpose.
SHORT = 0.3
# How late a timeout may fire on a loaded machine.
SLACK = 1.0

VERSION = {"major": 7, "minor": 2, "micro": 22, "package": "Debian 1:7.2"}


def never_answer(_session, _message):
    """A handler that swallows the command, as a hung QEMU would."""


def closing_handler(data):
    """A handler that sends `data` and then closes the connection."""
    def handler(session, _message):
        session.send_raw(data)
        session.close()
    return handler


def raw_handler(data):
    def handler(session, _message):
        session.send_raw(data)
    return handler


def assert_mentions(exc, *parts):
    text = str(exc)
    for part in parts:
        assert part in text, "%r not in %r" % (part, text)


# -- greeting, negotiation, commands -------------------------------------------

def test_connect_negotiates_and_executes(serve, sock_path):
    server = serve(commands={
        "query-status": {"status": "running", "singlestep": False, "running": True},
        "human-monitor-command": "7.2.22\r\n",
    })
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        assert client.connected
        assert client.address == sock_path
        assert client.greeting == GREETING["QMP"]
        assert client.version == VERSION
        assert client.execute("query-status") == {"status": "running", "singlestep": False, "running": True}
        assert client.execute("human-monitor-command", {"command-line": "info version"}) == "7.2.22\r\n"
        assert list(client.events) == []
    received = server.wait_for_messages(3)
    assert [m["execute"] for m in received] == ["qmp_capabilities", "query-status", "human-monitor-command"]
    assert "arguments" not in received[0] and "arguments" not in received[1]
    assert received[2]["arguments"] == {"command-line": "info version"}


def test_version_strips_package_and_tolerates_missing_fields(serve, sock_path):
    serve(greeting={"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 1}, "package": " v9.0.1 "},
                            "capabilities": []}})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        assert client.version == {"major": 9, "minor": 0, "micro": 1, "package": "v9.0.1"}


def test_ids_are_unique_and_echoed(serve, sock_path):
    def echo_id(session, message):
        session.reply(message, {"my-id": message["id"]})

    server = serve(commands={"echo": echo_id})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        answers = [client.execute("echo")["my-id"] for dummy in range(5)]
    received = server.wait_for_messages(6)
    ids = [m["id"] for m in received]
    assert len(set(ids)) == len(ids) == 6
    assert answers == ids[1:]


def test_stale_and_foreign_replies_are_skipped(serve, sock_path):
    def late_then_right(session, message):
        slow_id = server.received[1]["id"]
        session.send({"return": "late answer to slow", "id": slow_id})
        session.send({"return": "someone else's", "id": "other-client-7"})
        session.reply(message, "mine")

    server = serve(commands={"slow": never_answer, "query-name": late_then_right})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPTimeoutError):
            client.execute("slow", timeout=SHORT)
        assert client.execute("query-name") == "mine"
        assert client.connected


def test_tcp_session():
    with FakeQMPServer(tcp=True, commands={"query-status": {"status": "paused"}}) as server:
        with QMPClient(host="127.0.0.1", port=server.port, timeout=TIMEOUT) as client:
            assert client.address == "127.0.0.1:%d" % server.port
            assert client.version == VERSION
            assert client.execute("query-status") == {"status": "paused"}


def test_client_needs_exactly_one_address():
    with pytest.raises(ValueError):
        QMPClient()
    with pytest.raises(ValueError):
        QMPClient(socket_path="/tmp/x.sock", host="localhost", port=4444)
    assert describe_address(host="::1", port=4444) == "[::1]:4444"
    assert describe_address(host="localhost", port=4444) == "localhost:4444"
    assert describe_address(socket_path="/run/qmp.sock") == "/run/qmp.sock"


def test_nothing_touches_the_network_before_connect(sock_path):
    client = QMPClient(sock_path, timeout=TIMEOUT)
    assert not client.connected
    client.close()
    with pytest.raises(QMPConnectionClosed) as info:
        client.execute("query-status")
    assert_mentions(info.value, "not connected to", sock_path)


def test_close_is_idempotent_and_context_manager_closes(serve, sock_path):
    server = serve(commands={"query-status": {"status": "running"}})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        assert client.connected
    assert not client.connected
    server.wait_for_sessions_closed(1)  # the server saw EOF: the socket is really closed
    client.close()
    client.close()
    assert not client.connected
    with pytest.raises(QMPConnectionClosed) as info:
        client.execute("query-status")
    assert_mentions(info.value, "not connected to", sock_path)
    with pytest.raises(QMPConnectionClosed):
        client.wait_for_event("STOP", timeout=SHORT)


def test_context_manager_closes_on_error(serve, sock_path):
    server = serve()
    with pytest.raises(KeyError):
        with QMPClient(sock_path, timeout=TIMEOUT) as client:
            raise KeyError("boom")
    assert not client.connected
    server.wait_for_sessions_closed(1)


def test_client_reconnects_after_close(serve, sock_path):
    server = serve(commands={"query-status": {"status": "running"}})
    client = QMPClient(sock_path, timeout=TIMEOUT)
    client.connect()
    client.close()
    assert client.connect() == GREETING["QMP"]
    assert client.execute("query-status") == {"status": "running"}
    client.close()
    assert server.commands_received() == ["qmp_capabilities", "qmp_capabilities", "query-status"]


# -- greeting variants ----------------------------------------------------------

def test_no_greeting_is_busy(serve, sock_path):
    serve(greeting=None)
    client = QMPClient(sock_path, timeout=SHORT)
    start = time.monotonic()
    with pytest.raises(QMPConnectError) as info:
        client.connect()
    elapsed = time.monotonic() - start
    assert SHORT * 0.9 <= elapsed < SHORT + SLACK
    assert info.value.reason == "busy"
    assert info.value.address == sock_path
    assert_mentions(info.value, sock_path, "no greeting within 0.3s")
    assert not client.connected


def test_garbage_without_newline_then_silence(serve, sock_path):
    serve(greeting=b"\x00\x01garbage")
    client = QMPClient(sock_path, timeout=SHORT)
    with pytest.raises(QMPGreetingError) as info:
        client.connect()
    assert_mentions(info.value, sock_path, "is not a QMP socket", repr(b"\x00\x01garbage"))
    assert not client.connected


def test_http_like_line_is_not_a_greeting(serve, sock_path):
    serve(greeting=b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(QMPGreetingError) as info:
        QMPClient(sock_path, timeout=TIMEOUT).connect()
    assert_mentions(info.value, sock_path, "is not a QMP socket", "not JSON", "HTTP/1.1 400")


@pytest.mark.parametrize("greeting, detail", [
    ({"hello": "world"}, '{"hello": "world"}'),
    ({"QMP": {"capabilities": []}}, "is not a QMP greeting"),
    ({"QMP": "7.2"}, "is not a QMP greeting"),
    ({"return": {}}, "is not a QMP greeting"),
])
def test_json_that_is_not_a_greeting(serve, sock_path, greeting, detail):
    serve(greeting=greeting)
    client = QMPClient(sock_path, timeout=TIMEOUT)
    with pytest.raises(QMPGreetingError) as info:
        client.connect()
    assert_mentions(info.value, sock_path, "its first message is not a QMP greeting", detail)
    assert not client.connected


def test_json_array_is_not_a_greeting(serve, sock_path):
    serve(greeting=b'["QMP"]\r\n')
    with pytest.raises(QMPGreetingError) as info:
        QMPClient(sock_path, timeout=TIMEOUT).connect()
    assert_mentions(info.value, sock_path, "not an object")


def test_connection_closed_before_greeting(serve, sock_path):
    serve(greeting=lambda session: session.close())
    client = QMPClient(sock_path, timeout=TIMEOUT)
    with pytest.raises(QMPGreetingError) as info:
        client.connect()
    assert_mentions(info.value, sock_path, "closed the connection without a QMP greeting")
    assert not client.connected


def test_negotiation_refused(serve, sock_path):
    def refuse(session, message):
        session.error(message, "Capabilities negotiation is already complete, command ignored",
                      "CommandNotFound")

    serve(commands={"qmp_capabilities": refuse})
    client = QMPClient(sock_path, timeout=TIMEOUT)
    with pytest.raises(QMPCommandError) as info:
        client.connect()
    assert info.value.command == "qmp_capabilities"
    assert info.value.error_class == "CommandNotFound"
    assert not client.connected


def test_negotiation_never_answered(serve, sock_path):
    serve(commands={"qmp_capabilities": never_answer})
    client = QMPClient(sock_path, timeout=SHORT)
    start = time.monotonic()
    with pytest.raises(QMPTimeoutError) as info:
        client.connect()
    assert time.monotonic() - start < SHORT + SLACK
    assert_mentions(info.value, sock_path, "did not answer qmp_capabilities")
    assert not client.connected


# -- events ---------------------------------------------------------------------

def test_events_before_and_after_a_reply_are_buffered(serve, sock_path):
    def stop(session, message):
        session.event("STOP")
        session.reply(message)
        session.event("RTC_CHANGE", {"offset": 1, "qom-path": "/machine/unattached/device[10]"})

    serve(commands={"stop": stop, "query-status": {"status": "paused"}})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        assert client.execute("stop") == {}
        assert list(client.events) == [event_message("STOP")]
        assert client.execute("query-status") == {"status": "paused"}
        assert list(client.events) == [
            event_message("STOP"),
            event_message("RTC_CHANGE", {"offset": 1, "qom-path": "/machine/unattached/device[10]"}),
        ]


def test_wait_for_event_searches_the_buffer_first(serve, sock_path):
    def stop(session, message):
        session.event("STOP", {"seq": 1})
        session.reply(message)

    server = serve(commands={"stop": stop})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        client.execute("stop")
        server.push(event_message("STOP", {"seq": 2}))
        assert client.wait_for_event("STOP", timeout=SHORT) == event_message("STOP", {"seq": 1})
        assert list(client.events) == []
        assert client.wait_for_event("STOP", timeout=SHORT) == event_message("STOP", {"seq": 2})
        assert list(client.events) == []


def test_wait_for_event_match_dict_leaves_others_buffered(serve, sock_path):
    job0 = event_message("BLOCK_JOB_COMPLETED", {"device": "job0", "len": 10, "offset": 10, "speed": 0, "type": "backup"})
    job1 = event_message("BLOCK_JOB_COMPLETED", {"device": "job1", "len": 10, "offset": 10, "speed": 0, "type": "backup"})
    job2 = event_message("BLOCK_JOB_ERROR", {"device": "job2", "operation": "write", "action": "report"})
    job3 = event_message("BLOCK_JOB_COMPLETED", {"device": "job3", "len": 5, "offset": 5, "speed": 0, "type": "backup"})

    def two_events(session, message):
        session.send(job0)
        session.send(job1)
        session.reply(message)

    server = serve(commands={"transaction": two_events})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        client.execute("transaction", {"actions": []})
        names = ["BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"]
        assert client.wait_for_event(names, match={"device": "job1"}, timeout=SHORT) == job1
        assert list(client.events) == [job0]
        server.push(job2)
        server.push(job3)
        assert client.wait_for_event(names, match={"device": "job3", "len": 5}, timeout=TIMEOUT) == job3
        assert list(client.events) == [job0, job2]
        assert client.wait_for_event(names, match={"device": "job2"}, timeout=SHORT) == job2
        assert list(client.events) == [job0]


def test_wait_for_event_match_callable(serve, sock_path):
    partial = event_message("BLOCK_JOB_CANCELLED", {"device": "j", "len": 100, "offset": 40})
    complete = event_message("BLOCK_JOB_COMPLETED", {"device": "j", "len": 100, "offset": 100})
    server = serve()
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        server.push(partial)
        server.push(complete)
        found = client.wait_for_event(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"),
                                      match=lambda e: e["data"]["offset"] == e["data"]["len"],
                                      timeout=TIMEOUT)
        assert found == complete
        assert list(client.events) == [partial]


def test_event_before_the_return_of_its_command(serve, sock_path):
    """BLOCK_JOB_COMPLETED can come before blockdev-backup's return; it must not be lost."""
    statuses = [event_message("JOB_STATUS_CHANGE", {"id": "job0", "status": s})
                for s in ("created", "running", "waiting", "pending", "concluded")]
    completed = event_message("BLOCK_JOB_COMPLETED", {"device": "job0", "len": 0, "offset": 0, "speed": 0, "type": "backup"})

    def backup(session, message):
        for event in statuses[:3]:
            session.send(event)
        session.send(completed)
        for event in statuses[3:]:
            session.send(event)
        session.reply(message)

    serve(commands={"blockdev-backup": backup})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        args = {"job-id": "job0", "device": "drive0", "target": "tgt0", "sync": "full"}
        assert client.execute("blockdev-backup", args) == {}
        start = time.monotonic()
        assert client.wait_for_event("BLOCK_JOB_COMPLETED", match={"device": "job0"}, timeout=SHORT) == completed
        assert time.monotonic() - start < SHORT  # found in the buffer, no waiting
        assert list(client.events) == statuses


def test_wait_for_event_timeout_keeps_other_events(serve, sock_path):
    server = serve()
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        server.push(event_message("STOP"))
        start = time.monotonic()
        with pytest.raises(QMPTimeoutError) as info:
            client.wait_for_event("SHUTDOWN", timeout=SHORT)
        assert SHORT * 0.9 <= time.monotonic() - start < SHORT + SLACK
        assert_mentions(info.value, sock_path)
        assert list(client.events) == [event_message("STOP")]
        assert client.connected


def test_wait_for_event_skips_non_event_messages(serve, sock_path):
    server = serve()
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        server.push({"return": {}, "id": "late-1"})
        server.push(event_message("RESUME"))
        assert client.wait_for_event("RESUME", timeout=TIMEOUT) == event_message("RESUME")
        assert list(client.events) == []


def test_poll_events_reads_within_timeout(serve, sock_path):
    server = serve()
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        server.push(event_message("STOP"))
        server.push(event_message("RESUME"))
        assert client.poll_events(SHORT) == [event_message("STOP"), event_message("RESUME")]
        assert client.take_event(lambda e: e["event"] == "RESUME") == event_message("RESUME")
        assert client.take_event(lambda e: e["event"] == "RESUME") is None
        assert list(client.events) == [event_message("STOP")]


def test_poll_events_default_reads_pending_events(serve, sock_path):
    server = serve()
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        server.push(event_message("STOP"))  # in the client's receive queue once sendall returns
        assert client.poll_events() == [event_message("STOP")]


def test_wait_for_event_zero_timeout_reads_pending_event(serve, sock_path):
    server = serve()
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        server.push(event_message("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}))
        assert client.wait_for_event("SHUTDOWN", timeout=0)["event"] == "SHUTDOWN"


def test_quit_reply_event_then_eof(serve, sock_path):
    def quit_(session, message):
        session.reply(message)
        session.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        session.close()

    serve(commands={"quit": quit_})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        assert client.execute("quit") == {}
        assert client.wait_for_event("SHUTDOWN", timeout=TIMEOUT)["data"]["reason"] == "host-qmp-quit"
        with pytest.raises(QMPConnectionClosed) as info:
            client.wait_for_event((), timeout=TIMEOUT)
        assert str(info.value) == "%s closed the connection" % sock_path
        assert not client.connected


# -- command errors and protocol errors ------------------------------------------

def test_command_error(serve, sock_path):
    def device_del(session, message):
        session.error(message, "Device 'disk9' not found", "DeviceNotFound")

    serve(commands={"device_del": device_del})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPCommandError) as info:
            client.execute("device_del", {"id": "disk9"})
        assert info.value.command == "device_del"
        assert info.value.arguments == {"id": "disk9"}
        assert info.value.error_class == "DeviceNotFound"
        assert info.value.desc == "Device 'disk9' not found"
        assert str(info.value) == "QEMU refused device_del: Device 'disk9' not found"
        assert isinstance(info.value, QMPError)
        assert client.connected


def test_unknown_command_and_malformed_error(serve, sock_path):
    def odd_error(session, message):
        session.send({"error": "just a string", "id": message["id"]})

    serve(commands={"odd": odd_error})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPCommandError) as info:
            client.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.arguments is None
        with pytest.raises(QMPCommandError) as info:
            client.execute("odd")
        assert info.value.error_class == "GenericError"
        assert info.value.desc == '"just a string"'


def test_answer_with_neither_return_nor_error(serve, sock_path):
    def weird(session, message):
        session.send({"id": message["id"], "result": 1})

    serve(commands={"weird": weird})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPProtocolError) as info:
            client.execute("weird")
        assert_mentions(info.value, "answer to weird has neither return nor error", '"result": 1')


def test_bad_json_mid_session(serve, sock_path):
    serve(commands={"query-status": raw_handler(b'{"return": {"status": running}}\r\n')})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPProtocolError) as info:
            client.execute("query-status")
        assert not isinstance(info.value, QMPConnectionClosed)
        assert_mentions(info.value, sock_path, "sent something that is not JSON", "running}}")


def test_invalid_utf8_mid_session(serve, sock_path):
    serve(commands={"query-status": raw_handler(b'{"return": "\xff\xfe"}\r\n')})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPProtocolError) as info:
            client.execute("query-status")
        assert_mentions(info.value, sock_path, "not JSON")


@pytest.mark.parametrize("line", [b"[1, 2]", b'"ok"', b"42", b"null"])
def test_json_that_is_not_an_object(serve, sock_path, line):
    serve(commands={"query-status": raw_handler(line + b"\r\n")})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPProtocolError) as info:
            client.execute("query-status")
        assert_mentions(info.value, sock_path, "a JSON value that is not an object", repr(line)[2:-1])


def test_eof_in_the_middle_of_a_reply(serve, sock_path):
    serve(commands={"query-block": closing_handler(b'{"return": [{"device": "drive0", "inserted": ')})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPConnectionClosed) as info:
            client.execute("query-block")
        assert isinstance(info.value, QMPProtocolError)
        assert str(info.value) == ("%s closed the connection in the middle of a message while waiting "
                                   "for the answer to query-block" % sock_path)
        assert not client.connected


def test_clean_eof_instead_of_a_reply(serve, sock_path):
    serve(commands={"quit": closing_handler(b"")})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        with pytest.raises(QMPConnectionClosed) as info:
            client.execute("quit")
        assert str(info.value) == "%s closed the connection while waiting for the answer to quit" % sock_path
        assert not client.connected
        with pytest.raises(QMPConnectionClosed) as info:
            client.execute("query-status")
        assert_mentions(info.value, "not connected to", sock_path)


@pytest.mark.parametrize("per_call", [False, True])
def test_command_never_answered_times_out(serve, sock_path, per_call):
    serve(commands={"query-status": never_answer})
    with QMPClient(sock_path, timeout=SHORT if not per_call else TIMEOUT) as client:
        start = time.monotonic()
        with pytest.raises(QMPTimeoutError) as info:
            client.execute("query-status", timeout=SHORT if per_call else None)
        elapsed = time.monotonic() - start
        assert SHORT * 0.9 <= elapsed < SHORT + SLACK
        assert str(info.value) == "QEMU at %s did not answer query-status within the timeout" % sock_path
        assert client.connected


# -- large replies --------------------------------------------------------------

BIG = "0123456789abcdef" * (5 * 1024 * 1024 // 16)  # 5 MiB


def big_reply(session, message):
    session.reply(message, {"data": BIG})


def test_huge_reply_within_default_limit(serve, sock_path):
    serve(commands={"query-qmp-schema": big_reply, "query-status": {"status": "running"}})
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        answer = client.execute("query-qmp-schema")
        assert answer["data"] == BIG
        assert client.execute("query-status") == {"status": "running"}


def test_huge_reply_over_the_limit(serve, sock_path):
    serve(commands={"query-qmp-schema": big_reply})
    with QMPClient(sock_path, timeout=TIMEOUT, max_reply_size=1024 * 1024) as client:
        with pytest.raises(QMPProtocolError) as info:
            client.execute("query-qmp-schema")
        assert not isinstance(info.value, QMPConnectionClosed)
        assert_mentions(info.value, sock_path, "larger than the 1048576 byte limit")


def test_reply_over_a_small_limit_in_one_read(serve, sock_path):
    serve(commands={"query-status": {"status": "running", "pad": "x" * 300}})
    with QMPClient(sock_path, timeout=TIMEOUT, max_reply_size=200) as client:
        with pytest.raises(QMPProtocolError):
            client.execute("query-status")


# -- connect errors ---------------------------------------------------------------

def test_connect_missing_path(sock_path):
    with pytest.raises(QMPConnectError) as info:
        QMPClient(sock_path, timeout=TIMEOUT).connect()
    assert info.value.reason == "missing"
    assert_mentions(info.value, "cannot connect to QMP at %s" % sock_path, "no such file")


def test_connect_regular_file(sock_path):
    with open(sock_path, "w", encoding="utf-8") as handle:
        handle.write("not a socket\n")
    with pytest.raises(QMPConnectError) as info:
        QMPClient(sock_path, timeout=TIMEOUT).connect()
    assert info.value.reason == "not_socket"
    assert_mentions(info.value, sock_path, "not a socket")


def test_connect_directory(sock_dir):
    with pytest.raises(QMPConnectError) as info:
        QMPClient(sock_dir, timeout=TIMEOUT).connect()
    assert info.value.reason == "not_socket"
    assert_mentions(info.value, sock_dir, "not a socket")


def test_connect_stale_socket(sock_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: QEMU was killed
    assert os.path.exists(sock_path)
    with pytest.raises(QMPConnectError) as info:
        QMPClient(sock_path, timeout=TIMEOUT).connect()
    assert info.value.reason == "refused"
    assert_mentions(info.value, sock_path, "connection refused")


needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")


@needs_non_root
def test_connect_directory_without_permission(serve, sock_dir, sock_path):
    serve()
    os.chmod(sock_dir, 0)
    try:
        with pytest.raises(QMPConnectError) as info:
            QMPClient(sock_path, timeout=TIMEOUT).connect()
    finally:
        os.chmod(sock_dir, 0o700)
    assert info.value.reason == "permission"
    assert_mentions(info.value, sock_path, "permission denied")


@needs_non_root
def test_connect_socket_without_permission(serve, sock_path):
    serve()
    os.chmod(sock_path, 0)
    with pytest.raises(QMPConnectError) as info:
        QMPClient(sock_path, timeout=TIMEOUT).connect()
    assert info.value.reason == "permission"
    assert_mentions(info.value, sock_path, "permission denied")


def test_connect_os_errors_are_classified(sock_path, monkeypatch):
    """Errno mapping for the cases a test cannot provoke for real (running as root, no network)."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    cases = [(errno.EACCES, "permission"), (errno.EPERM, "permission"), (errno.EAGAIN, "busy"),
             (errno.ENOENT, "refused"), (errno.EHOSTUNREACH, "unreachable")]
    for code, reason in cases:
        def fail(self, address, code=code):
            raise OSError(code, os.strerror(code), address)

        monkeypatch.setattr(socket.socket, "connect", fail)
        with pytest.raises(QMPConnectError) as info:
            QMPClient(sock_path, timeout=TIMEOUT).connect()
        assert info.value.reason == reason, code
        assert_mentions(info.value, sock_path)

    def no_stat(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "stat", no_stat)
    with pytest.raises(QMPConnectError) as info:
        QMPClient(sock_path, timeout=TIMEOUT).connect()
    assert info.value.reason == "permission"


def test_connect_tcp_timeout_is_unreachable(monkeypatch):
    def no_answer(address, timeout):
        raise socket.timeout("timed out %s %s" % (address, timeout))

    monkeypatch.setattr(socket, "create_connection", no_answer)
    with pytest.raises(QMPConnectError) as info:
        QMPClient(host="192.0.2.1", port=4444, timeout=SHORT).connect()
    assert info.value.reason == "unreachable"
    assert_mentions(info.value, "192.0.2.1:4444", "no answer within 0.3s")


def test_connect_tcp_refused():
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # bound but never listening: the port is closed
    with pytest.raises(QMPConnectError) as info:
        QMPClient(host="127.0.0.1", port=port, timeout=TIMEOUT).connect()
    assert info.value.reason == "refused"
    assert info.value.address == "127.0.0.1:%d" % port
    assert_mentions(info.value, "127.0.0.1:%d" % port, "connection refused")


def test_busy_socket_serves_one_client_at_a_time(serve, sock_path):
    server = serve(commands={"query-status": {"status": "running"}})
    with QMPClient(sock_path, timeout=TIMEOUT) as first:
        second = QMPClient(sock_path, timeout=SHORT)
        start = time.monotonic()
        with pytest.raises(QMPConnectError) as info:
            second.connect()
        assert time.monotonic() - start < SHORT + SLACK
        assert info.value.reason == "busy"
        assert_mentions(info.value, sock_path, "one client at a time")
        assert not second.connected
        assert first.execute("query-status") == {"status": "running"}
    # The first client left: the server now takes the next one.
    server.wait_for_sessions_closed(1)
    with QMPClient(sock_path, timeout=TIMEOUT) as third:
        assert third.execute("query-status") == {"status": "running"}


def test_busy_socket_with_full_backlog(sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(0)  # never accepts; room for one waiting connection
    try:
        with pytest.raises(QMPConnectError) as info:
            QMPClient(sock_path, timeout=SHORT).connect()  # waits in the backlog, no greeting
        assert info.value.reason == "busy"
        with pytest.raises(QMPConnectError) as info:
            QMPClient(sock_path, timeout=SHORT).connect()
        assert info.value.reason == "busy"
        assert_mentions(info.value, sock_path, "backlog is full")
    finally:
        listener.close()


# -- the schema, through the client --------------------------------------------------

# Just enough of a schema for the client to fetch and cache (qmp_schema's own tests use a fuller one).
SCHEMA = [
    {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
    {"name": "0", "meta-type": "object", "members": []},
]


def test_client_schema_fetches_once_and_uses_the_disk_cache(serve, sock_path, tmp_path):
    server = serve(commands={"query-qmp-schema": SCHEMA})
    cache = str(tmp_path / "cache")
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        schema = client.schema(cache_dir=cache)
        assert isinstance(schema, QMPSchema)
        assert schema.has_command("query-status")
        assert client.schema(cache_dir=cache) is schema
    assert os.path.exists(cache_path(cache, VERSION))
    server.wait_for_sessions_closed(1)
    with QMPClient(sock_path, timeout=TIMEOUT) as client:
        assert client.schema(cache_dir=cache).has_command("query-status")
    assert server.commands_received() == ["qmp_capabilities", "query-qmp-schema", "qmp_capabilities"]


def test_events_nobody_waits_for_keep_only_the_newest(monkeypatch, sock_path):
    from ansible_collections.qemu.qmp.plugins.module_utils import qmp_client  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(qmp_client, "MAX_BUFFERED_EVENTS", 3)
    client = QMPClient(socket_path=sock_path)
    for number in range(5):
        client.events.append({"event": "E", "data": {"n": number}})
    assert [e["data"]["n"] for e in client.events] == [2, 3, 4]
