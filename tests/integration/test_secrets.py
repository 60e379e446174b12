# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Secrets given to QEMU stay on the host: no result shows them, nor anything ansible-playbook -vvv
prints, whether the command runs, only is checked (check mode) or fails."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid

from harness import FakeGuestAgent, schema_of

PROBE_OBJECTS = [["qom-list", {"path": "/objects"}]]
# VNC password authentication on, with no listening socket: set_password then succeeds.
VNC_WITH_PASSWORD = ["-vnc", "none,password=on"]
REDACTED = "********"


def new_secret(what):
    return "%s-%s" % (what, uuid.uuid4().hex)


def qmp_command(name, socket, command, arguments, check=False, **options):
    task = {"name": name, "check_mode": check,
            "qemu.qmp.qmp_command": dict({"socket": socket, "command": command, "arguments": arguments}, **options)}
    return task


def run(ansible, vm, tasks, secrets, probe=None, validate=True):
    """Run `tasks` in one playbook with -vvv (errors ignored); none of `secrets` may show anywhere."""
    play = [{"name": "secrets", "hosts": "localhost", "gather_facts": False,
             "tasks": [dict(task, ignore_errors=True) for task in tasks]}]
    records, proc = ansible.playbook(json.dumps(play), vm=vm, probe=probe, validate=validate, args=["-vvv"])
    output = proc.stdout + proc.stderr
    assert len(records) == len(tasks), output
    # -vvv prints each whole result, the module's arguments (invocation) included.
    assert output.count('"module_args"') >= len(tasks), output
    assert_hidden(secrets, output, json.dumps(records))
    return records


def assert_hidden(secrets, *texts):
    for secret in secrets:
        for text in texts:
            assert secret not in text, "%r shows in:\n%s" % (secret, text)


def statuses(records):
    return [r["result"]["_status"] for r in records]


def sent(record, command):
    """The entries of `command` in a result's qmp_commands."""
    return [c for c in record["result"]["qmp_commands"] if c["execute"] == command]


def objects(record):
    return dict((p["name"], p["type"][len("child<"):-1]) for p in record["probe"][0] if p["type"].startswith("child<"))


def qom_get(vm, object_id, prop):
    return vm.qmp("qom-get", {"path": "/objects/" + object_id, "property": prop})


def test_object_add_secret_through_qmp_command(vm, ansible):
    secret, nested = new_secret("data"), new_secret("props")
    number = 10 ** 15 + uuid.uuid4().int % 10 ** 15
    add = {"qom-type": "secret", "id": "sec0", "data": secret}
    records = run(ansible, vm, [
        qmp_command("check", vm.socket, "object-add", add, check=True),
        qmp_command("add", vm.socket, "object-add", add),
        qmp_command("add again", vm.socket, "object-add", add),
        qmp_command("nested, check", vm.socket, "object-add",
                    {"qom-type": "secret", "id": "sec1", "props": {"data": nested}}, check=True),
        qmp_command("nested", vm.socket, "object-add", {"qom-type": "secret", "id": "sec1", "props": {"data": nested}}),
        qmp_command("number, check", vm.socket, "object-add",
                    {"qom-type": "secret", "id": "sec2", "data": number}, check=True),
        qmp_command("number", vm.socket, "object-add", {"qom-type": "secret", "id": "sec2", "data": number}),
    ], [secret, nested, str(number)], probe=PROBE_OBJECTS, validate=False)
    assert statuses(records) == ["ok", "ok", "failed", "failed", "failed", "failed", "failed"]
    assert [objects(r).get("sec0") for r in records[:3]] == [None, "secret", "secret"]
    assert qom_get(vm, "sec0", "data") == secret  # QEMU got it as it is
    shown = {"execute": "object-add", "arguments": {"qom-type": "secret", "id": "sec0", "data": REDACTED}}
    assert [sent(r, "object-add") for r in records[:3]] == [[shown]] * 3
    assert records[0]["result"]["changed"] is True and records[0]["result"]["result"] is None
    assert records[1]["result"]["changed"] is True and records[1]["result"]["result"] == {}
    # A second object with the id: QEMU's refusal comes back.
    assert records[2]["result"]["qmp_error"]["class"] == "GenericError"
    assert "sec0" in records[2]["result"]["qmp_error"]["desc"]
    # The form QEMU before 6.0 takes: check mode and QEMU refuse it here, the secret hidden all the same.
    assert "unknown argument props" in records[3]["result"]["msg"], records[3]["result"]["msg"]
    assert "'props' is unexpected" in records[4]["result"]["msg"], records[4]["result"]["msg"]
    assert sent(records[4], "object-add") == [{"execute": "object-add", "arguments": {
        "qom-type": "secret", "id": "sec1", "props": {"data": REDACTED}}}]
    # Check mode's schema errors name the value they refuse: it shows as ********.
    assert "data: ******** is not of type 'string'" in records[5]["result"]["msg"], records[5]["result"]["msg"]
    assert records[6]["result"]["qmp_error"]["class"] == "GenericError"
    assert sent(records[6], "object-add")[0]["arguments"]["data"] == REDACTED
    assert not {"sec1", "sec2"} & set(objects(records[-1]))


def test_vnc_passwords(vm_factory, ansible):
    vm = vm_factory(args=VNC_WITH_PASSWORD)
    plain = vm_factory(name="plain")  # no password authentication: QEMU refuses to set one
    secrets = [new_secret("vnc%d" % n) for n in range(7)]
    set_password = "set_password"
    tasks = [
        qmp_command("check", vm.socket, set_password, {"protocol": "vnc", "password": secrets[0]}, check=True),
        qmp_command("set", vm.socket, set_password, {"protocol": "vnc", "password": secrets[1]}),
        qmp_command("spice", vm.socket, set_password, {"protocol": "spice", "password": secrets[2]}),
        qmp_command("no password auth", plain.socket, set_password, {"protocol": "vnc", "password": secrets[3]}),
    ]
    change = schema_of(vm).has_command("change-vnc-password")
    if change:
        tasks += [
            qmp_command("change, check", vm.socket, "change-vnc-password", {"password": secrets[4]}, check=True),
            qmp_command("change", vm.socket, "change-vnc-password", {"password": secrets[5]}),
            qmp_command("change, no password auth", plain.socket, "change-vnc-password", {"password": secrets[6]}),
        ]
    records = run(ansible, vm, tasks, secrets)
    assert statuses(records) == ["ok", "ok", "failed", "failed"] + (["ok", "ok", "failed"] if change else [])
    done = [r["result"] for r in records if r["result"]["_status"] == "ok"]
    assert [(r["changed"], r["result"]) for r in done] == [(True, None), (True, {})] * (2 if change else 1)
    assert [sent(r, "set_password") for r in records[:4]] == [
        [{"execute": "set_password", "arguments": {"protocol": protocol, "password": REDACTED}}]
        for protocol in ("vnc", "vnc", "spice", "vnc")]
    # QEMU refused these, so they were sent.
    assert records[2]["result"]["qmp_error"]["desc"] == "SPICE is not in use"
    assert records[3]["result"]["qmp_error"]["desc"] == "Could not set password"
    if change:
        assert [sent(r, "change-vnc-password") for r in records[4:]] == \
            [[{"execute": "change-vnc-password", "arguments": {"password": REDACTED}}]] * 3
        assert records[6]["result"]["qmp_error"]["desc"] == "Could not set password"


def test_human_monitor_commands(vm_factory, ansible):
    vm = vm_factory(args=VNC_WITH_PASSWORD)
    plain = vm_factory(name="plain")
    secrets = [new_secret("hmp%d" % n) for n in range(8)]
    lines = [
        "set_password vnc %s" % secrets[0],
        "change vnc password %s" % secrets[1],
        "object_add secret,id=sec3,data=%s" % secrets[2],
        'object_add {"qom-type": "secret", "id": "sec4", "data": "%s"}' % secrets[3],
        "object_add secret,id=sec3,data=%s" % secrets[4],  # the id is taken
        "set_password vnc %s bogus" % secrets[5],
    ]
    hmp = "human-monitor-command"
    tasks = [qmp_command("hmp %d" % n, vm.socket, hmp, {"command-line": line}) for n, line in enumerate(lines)]
    tasks += [
        qmp_command("hmp, check", vm.socket, hmp, {"command-line": "set_password vnc %s" % secrets[6]}, check=True),
        dict(qmp_command("hmp, no password auth", plain.socket, hmp,
                         {"command-line": "set_password vnc %s" % secrets[7]}),
             register="refused", failed_when="'Error' in refused.result"),
        qmp_command("not a secret", vm.socket, hmp, {"command-line": "info status"}),
    ]
    records = run(ansible, vm, tasks, secrets, probe=PROBE_OBJECTS)
    assert statuses(records) == ["ok"] * 7 + ["failed", "ok"]
    assert [r["result"]["result"] for r in records[:4]] == [""] * 4
    assert objects(records[3])["sec3"] == objects(records[3])["sec4"] == "secret"
    assert qom_get(vm, "sec3", "data") == secrets[2] and qom_get(vm, "sec4", "data") == secrets[3]
    assert "duplicate" in records[4]["result"]["result"], records[4]["result"]["result"]
    assert "invalid parameter value: bogus" in records[5]["result"]["result"], records[5]["result"]["result"]
    assert records[6]["result"]["result"] is None
    assert "Could not set password" in records[7]["result"]["result"], records[7]["result"]["result"]
    for record in records[:8]:
        assert sent(record, hmp) == [{"execute": hmp, "arguments": {"command-line": REDACTED}}]
    # Other monitor commands show as they are.
    assert sent(records[8], hmp) == [{"execute": hmp, "arguments": {"command-line": "info status"}}]
    assert "VM status" in records[8]["result"]["result"]


def test_guest_set_user_password(vm_factory, workdir, ansible):
    secret = new_secret("guest")
    encoded = base64.b64encode(secret.encode()).decode()  # the agent takes it in base64
    arguments = {"username": "root", "password": encoded, "crypted": False}
    agent = FakeGuestAgent(os.path.join(workdir, "fake.qga"))
    agent.start()
    # A real agent channel with no agent behind it (the test VM has no guest): nothing answers.
    silent = os.path.join(workdir, "vm.qga")
    vm = vm_factory(args=["-device", "virtio-serial", "-chardev", "socket,id=qga0,path=%s,server=on,wait=off" % silent,
                          "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
    command = "guest-set-user-password"
    options = {"guest_agent": True, "timeout": 3}
    records = run(ansible, vm, [
        qmp_command("check", agent.server.getsockname(), command, arguments, check=True, **options),
        qmp_command("set", agent.server.getsockname(), command, arguments, **options),
        qmp_command("no agent, check", silent, command, arguments, check=True, **options),
        qmp_command("no agent", silent, command, arguments, **options),
    ], [encoded, secret])
    assert statuses(records) == ["ok", "ok", "failed", "failed"]
    shown = [{"execute": command, "arguments": {"username": "root", "password": REDACTED, "crypted": False}}]
    assert [sent(r, command) for r in records[:2]] == [shown, shown]
    assert records[1]["result"]["result"] == {}
    assert agent.commands.count(command) == 1  # the real run only
    for record in records[2:]:
        assert "no answer within 3s" in record["result"]["msg"], record["result"]["msg"]


def test_qmp_object_secret(vm, ansible):
    secret, other, bad = new_secret("obj"), new_secret("other"), new_secret("%%not-base64")

    def task(name, data, check=False, object_id="sec0", **props):
        return {"name": name, "check_mode": check, "qemu.qmp.qmp_object": {
            "socket": vm.socket, "id": object_id, "qom_type": "secret", "props": dict(props, data=data)}}

    records = run(ansible, vm, [
        task("check", secret, check=True),
        task("add", secret),
        task("again", secret),
        task("other data", other),
        task("other data, check", other, check=True),
        task("not base64", bad, object_id="sec1", format="base64"),
    ], [secret, other, bad], probe=PROBE_OBJECTS)
    assert statuses(records) == ["ok", "ok", "ok", "failed", "failed", "failed"]
    assert [r["result"]["changed"] for r in records[:3]] == [True, True, False]
    assert [objects(r).get("sec0") for r in records[:2]] == [None, "secret"]
    assert qom_get(vm, "sec0", "data") == secret
    assert [c["arguments"]["data"] for c in sent(records[1], "object-add")] == [REDACTED]
    assert records[3]["result"]["differences"] == {"data": {"wanted": REDACTED, "qemu": REDACTED}}
    assert "base64" in records[5]["result"]["qmp_error"]["desc"].lower()
    assert "sec1" not in objects(records[-1])


def test_ad_hoc_command(vm, workdir, ansible):
    """ansible -m qemu.qmp.qmp_command -a '{...}' -vvv, as one tries a command by hand."""
    secret = new_secret("adhoc")
    args = {"socket": vm.socket, "command": "object-add", "arguments": {"qom-type": "secret", "id": "sec5",
                                                                        "data": secret}}
    env = ansible.env(os.path.join(workdir, "adhoc.jsonl"))
    for check in ([], ["--check"]):
        proc = subprocess.run(["ansible", "localhost", "-m", "qemu.qmp.qmp_command", "-a", json.dumps(args), "-vvv"]
                              + check, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert '"module_args"' in proc.stdout and '"data": "********"' in proc.stdout, proc.stdout
        assert_hidden([secret], proc.stdout + proc.stderr)
    assert qom_get(vm, "sec5", "data") == secret
