# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qmp_object against a real QEMU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

from harness import changed_flags

PROBE_OBJECTS = [["qom-list", {"path": "/objects"}]]

# A CA, and a server and a client certificate it signs, with the extensions QEMU's sanity check wants.
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
"""


def objects(record):
    """{id: type} of QEMU's objects, from the probe taken after a task."""
    return dict((p["name"], p["type"][len("child<"):-1]) for p in record["probe"][0] if p["type"].startswith("child<"))


def vm_objects(vm):
    return objects({"probe": [vm.qmp("qom-list", {"path": "/objects"})]})


def qom_get(vm, object_id, prop):
    return vm.qmp("qom-get", {"path": "/objects/" + object_id, "property": prop})


def assert_hidden(secret, *results):
    for result in results:
        text = json.dumps(result)
        assert secret not in text, text


def openssl(folder, *args):
    subprocess.run(["openssl"] + list(args), cwd=folder, check=True, capture_output=True)


def make_pki(workdir):
    """Folders for tls-creds-x509: `server` and `client` (each with the CA), `anonymous` (the CA alone)."""
    ca = os.path.join(workdir, "ca")
    os.mkdir(ca)
    with open(os.path.join(ca, "openssl.cnf"), "w", encoding="utf-8") as handle:
        handle.write(OPENSSL_CONFIG)
    openssl(ca, "req", "-x509", "-config", "openssl.cnf", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=test-ca", "-extensions", "ca_ext", "-keyout", "ca-key.pem", "-out", "ca-cert.pem")
    folders = {}
    for who in ("server", "client", "anonymous"):
        folder = folders[who] = os.path.join(workdir, who)
        os.mkdir(folder)
        shutil.copy(os.path.join(ca, "ca-cert.pem"), folder)
        if who == "anonymous":
            continue
        openssl(ca, "req", "-config", "openssl.cnf", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                "-keyout", os.path.join(folder, who + "-key.pem"), "-out", who + ".csr")
        openssl(ca, "x509", "-req", "-in", who + ".csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-days", "2", "-extfile", "openssl.cnf", "-extensions", who + "_ext",
                "-out", os.path.join(folder, who + "-cert.pem"))
    return folders


def qemu_img(vm):
    beside = os.path.join(os.path.dirname(vm.binary), "qemu-img")
    return beside if os.path.exists(beside) else "qemu-img"


def nbd_tls_info(vm, nbd_socket, client_dir):
    """qemu-img info over NBD with TLS, as a client with the credentials in `client_dir`."""
    return subprocess.run(
        [qemu_img(vm), "info", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir=%s" % client_dir,
         "--image-opts", "driver=nbd,server.type=unix,server.path=%s,export=null0,tls-creds=tls0,"
         "tls-hostname=localhost" % nbd_socket],
        capture_output=True, text=True, timeout=60, check=False)


def test_secret_data_is_never_shown(vm, ansible):
    secret = "s3cr3t-%s" % uuid.uuid4().hex
    args = {"socket": vm.socket, "id": "sec0", "qom_type": "secret", "props": {"data": secret, "format": "raw"}}
    records = ansible.four_ways("qmp_object", args, vm=vm, probe=PROBE_OBJECTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [objects(r).get("sec0") for r in records] == [None, "secret", "secret", "secret"]
    assert_hidden(secret, *records)
    assert qom_get(vm, "sec0", "data") == secret  # QEMU got it as it is
    added = [c for c in records[1]["result"]["qmp_commands"] if c["execute"] == "object-add"]
    assert added == [{"execute": "object-add",
                      "arguments": {"qom-type": "secret", "id": "sec0", "data": "********", "format": "raw"}}]
    assert records[1]["result"]["diff"]["after"]["props"] == {"data": "********", "format": "raw"}
    assert records[1]["result"]["object"]["props"] == {"data": "********", "format": "raw"}
    # QEMU reads data back, so it is compared, and only it is hidden.
    assert records[3]["result"]["not_compared"] == []
    assert records[3]["result"]["invocation"]["module_args"]["props"]["format"] == "raw"

    other = "0th3r-%s" % uuid.uuid4().hex
    wanted = dict(args, props={"data": other, "format": "raw"})
    refused = ansible.run("qmp_object", wanted, vm=vm, diff=True)
    assert refused["_status"] == "failed"
    assert "data is '********', wanted '********'" in refused["msg"] and "recreate=true" in refused["msg"]
    assert refused["differences"] == {"data": {"wanted": "********", "qemu": "********"}}
    checked = ansible.run("qmp_object", dict(wanted, recreate=True), vm=vm, check=True, diff=True)
    assert checked["changed"] is True
    assert qom_get(vm, "sec0", "data") == secret
    replaced = ansible.run("qmp_object", dict(wanted, recreate=True), vm=vm, diff=True)
    assert replaced["changed"] is True
    assert [c["execute"] for c in replaced["qmp_commands"]].count("object-add") == 1
    assert qom_get(vm, "sec0", "data") == other
    for result in (refused, checked, replaced):
        assert_hidden(secret, result)
        assert_hidden(other, result)

    # QEMU's own refusal, and check mode's, do not show it either.
    bad = "%%%%not-base64-%s" % uuid.uuid4().hex
    refused = ansible.run("qmp_object", {"socket": vm.socket, "id": "sec1", "qom_type": "secret",
                                         "props": {"data": bad, "format": "base64"}}, vm=vm)
    assert refused["_status"] == "failed" and "base64" in refused["msg"].lower(), refused["msg"]
    assert refused["qmp_error"]["class"] == "GenericError"
    number = 98765432123
    invalid = ansible.run("qmp_object", {"socket": vm.socket, "id": "sec1", "qom_type": "secret",
                                         "props": {"data": number}}, vm=vm, check=True)
    assert invalid["_status"] == "failed" and "is not of type 'string'" in invalid["msg"], invalid["msg"]
    assert_hidden(bad, refused)
    assert_hidden(str(number), invalid)
    assert "sec1" not in vm_objects(vm)


def test_iothread_added_then_removed(vm, ansible):
    args = {"socket": vm.socket, "id": "io0", "qom_type": "iothread", "props": {"poll-max-ns": 0, "poll-grow": 2}}
    records = ansible.four_ways("qmp_object", args, vm=vm, probe=PROBE_OBJECTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [objects(r).get("io0") for r in records] == [None, "iothread", "iothread", "iothread"]
    assert (qom_get(vm, "io0", "poll-max-ns"), qom_get(vm, "io0", "poll-grow")) == (0, 2)
    # Only a secret's data is hidden: the 0 given hides no other 0 of the result.
    assert records[1]["result"]["object"] == {"id": "io0", "qom_type": "iothread", "path": "/objects/io0",
                                              "props": {"poll-max-ns": 0, "poll-grow": 2}}
    assert records[0]["result"]["diff"] == {"before": {"state": "absent"}, "after": {
        "state": "present", "id": "io0", "qom_type": "iothread", "props": {"poll-max-ns": 0, "poll-grow": 2}}}

    records = ansible.four_ways("qmp_object", {"socket": vm.socket, "id": "io0", "state": "absent"},
                                vm=vm, probe=PROBE_OBJECTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [objects(r).get("io0") for r in records] == ["iothread", None, None, None]
    assert records[0]["result"]["diff"]["before"]["qom_type"] == "iothread"
    assert records[3]["result"]["object"] is None


def test_tls_creds_x509_server_asks_clients_for_certificates(vm, workdir, ansible):
    pki = make_pki(workdir)
    args = {"socket": vm.socket, "id": "tls0", "qom_type": "tls-creds-x509",
            "props": {"dir": pki["server"], "endpoint": "server", "verify-peer": True}}
    records = ansible.four_ways("qmp_object", args, vm=vm, probe=PROBE_OBJECTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [objects(r).get("tls0") for r in records] == [None, "tls-creds-x509", "tls-creds-x509", "tls-creds-x509"]
    assert records[3]["result"]["not_compared"] == []
    assert [qom_get(vm, "tls0", p) for p in ("dir", "endpoint", "verify-peer")] == [pki["server"], "server", True]

    # QEMU serves NBD with them: a client with a certificate of the CA gets in, one without does not.
    nbd = os.path.join(workdir, "nbd.sock")
    vm.qmp("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 1048576})
    vm.qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}, "tls-creds": "tls0"})
    vm.qmp("block-export-add", {"type": "nbd", "id": "exp0", "node-name": "null0", "name": "null0"})
    with_certificate = nbd_tls_info(vm, nbd, pki["client"])
    assert with_certificate.returncode == 0, with_certificate.stderr
    without = nbd_tls_info(vm, nbd, pki["anonymous"])
    assert without.returncode != 0, without.stdout
    vm.qmp("block-export-del", {"id": "exp0"})
    vm.qmp("nbd-server-stop")

    wanted = dict(args, props={"dir": pki["server"], "endpoint": "client", "verify-peer": False})
    refused = ansible.run("qmp_object", wanted, vm=vm)
    assert refused["_status"] == "failed"
    assert "endpoint is 'server', wanted 'client'" in refused["msg"], refused["msg"]
    assert "verify-peer is True, wanted False" in refused["msg"], refused["msg"]
    assert [qom_get(vm, "tls0", p) for p in ("endpoint", "verify-peer")] == ["server", True]

    wanted["props"]["endpoint"] = "server"
    records = ansible.four_ways("qmp_object", dict(wanted, recreate=True), vm=vm, probe=PROBE_OBJECTS)
    assert changed_flags(records) == [True, True, False, False]
    assert records[1]["result"]["differences"] == {"verify-peer": {"wanted": False, "qemu": True}}
    assert [c["execute"] for c in records[1]["result"]["qmp_commands"] if c["execute"].startswith("object-")] == \
        ["object-del", "object-add"]
    assert [qom_get(vm, "tls0", p) for p in ("endpoint", "verify-peer")] == ["server", False]


def test_unknown_type_fails_naming_the_types(vm, ansible):
    for check in (True, False):
        result = ansible.run("qmp_object", {"socket": vm.socket, "id": "x0", "qom_type": "tls-creds-x590"},
                             vm=vm, check=check)
        assert result["_status"] == "failed"
        assert "qom_type 'tls-creds-x590' is not an object type this QEMU can create" in result["msg"]
        assert "did you mean 'tls-creds-x509'" in result["msg"] and "iothread" in result["msg"]
    assert "x0" not in vm_objects(vm)


def test_object_in_use_is_kept_with_qemus_error(vm, ansible):
    args = {"socket": vm.socket, "id": "tg0", "qom_type": "throttle-group", "props": {"limits": {"iops-total": 100}}}
    records = ansible.four_ways("qmp_object", args, vm=vm, probe=PROBE_OBJECTS)
    assert changed_flags(records) == [True, True, False, False]
    assert qom_get(vm, "tg0", "limits")["iops-total"] == 100
    vm.qmp("blockdev-add", {"driver": "throttle", "node-name": "thr0", "throttle-group": "tg0",
                            "file": {"driver": "null-co", "node-name": "null0"}})

    removed = ansible.run("qmp_object", {"socket": vm.socket, "id": "tg0", "state": "absent"}, vm=vm)
    assert removed["_status"] == "failed"
    assert "object 'tg0' is in use, can not be deleted" in removed["msg"], removed["msg"]
    assert removed["qmp_error"]["desc"] == "object 'tg0' is in use, can not be deleted"
    replaced = ansible.run("qmp_object", dict(args, props={"limits": {"iops-total": 50}}, recreate=True), vm=vm)
    assert replaced["_status"] == "failed" and "is in use" in replaced["msg"]
    assert replaced["differences"] == {"limits.iops-total": {"wanted": 50, "qemu": 100}}
    assert vm_objects(vm).get("tg0") == "throttle-group" and qom_get(vm, "tg0", "limits")["iops-total"] == 100

    vm.qmp("blockdev-del", {"node-name": "thr0"})
    records = ansible.four_ways("qmp_object", {"socket": vm.socket, "id": "tg0", "state": "absent"},
                                vm=vm, probe=PROBE_OBJECTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [objects(r).get("tg0") for r in records] == ["throttle-group", None, None, None]


def test_property_qemu_cannot_read_is_not_compared(vm, ansible):
    args = {"socket": vm.socket, "id": "ctx0", "qom_type": "thread-context", "props": {"node-affinity": [0]}}
    records = ansible.four_ways("qmp_object", args, vm=vm, probe=PROBE_OBJECTS)
    assert changed_flags(records) == [True, True, False, False]
    assert [objects(r).get("ctx0") for r in records] == [None, "thread-context", "thread-context", "thread-context"]
    assert records[1]["result"]["object"]["props"] == {}
    assert records[3]["result"]["not_compared"] == ["node-affinity"]


def test_bad_input_fails_clearly(vm, workdir, ansible):
    base = {"socket": vm.socket, "id": "io1", "qom_type": "iothread"}
    result = ansible.run("qmp_object", dict(base, props={"id": "other"}), vm=vm)
    assert result["_status"] == "failed" and result["msg"] == "props.id is set by the module's own option id"
    result = ansible.run("qmp_object", dict(base, id="1st"), vm=vm)
    assert result["_status"] == "failed" and "'1st' is not a valid object id" in result["msg"]
    result = ansible.run("qmp_object", {"socket": vm.socket, "id": "io1"}, vm=vm)
    assert result["_status"] == "failed" and "qom_type" in result["msg"]
    checked = ansible.run("qmp_object", dict(base, props={"bogus": 1}), vm=vm, check=True)
    assert checked["_status"] == "failed" and "unknown argument bogus" in checked["msg"], checked["msg"]
    result = ansible.run("qmp_object", dict(base, props={"bogus": 1}), vm=vm, validate=False)
    assert result["_status"] == "failed" and "Parameter 'bogus' is unexpected" in result["msg"], result["msg"]
    missing = os.path.join(workdir, "no-such-folder")
    result = ansible.run("qmp_object", {"socket": vm.socket, "id": "tls1", "qom_type": "tls-creds-x509",
                                        "props": {"dir": missing, "endpoint": "server"}}, vm=vm)
    assert result["_status"] == "failed"
    assert "Unable to access credentials %s/ca-cert.pem" % missing in result["msg"], result["msg"]
    assert result["qmp_error"]["class"] == "GenericError"
    assert not set(vm_objects(vm)) & {"io1", "1st", "tls1"}
