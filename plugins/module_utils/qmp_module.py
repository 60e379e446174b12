# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The helper every qemu.qmp module is built on.

It owns the AnsibleModule with the shared connection options, opens the QMP
client only inside `with qm.connected():`, runs reads at once and changes
only outside check mode (validating them against the running QEMU's schema
in check mode), records every command for `qmp_commands`, and turns each
client error into one plain `fail_json`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import shlex

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.qemu.qmp.plugins.module_utils.qmp_client import (
    QMPClient,
    QMPCommandError,
    QMPConnectError,
    QMPError,
)
from ansible_collections.qemu.qmp.plugins.module_utils.qmp_schema import (
    SchemaValidationUnavailable,
    load_schema,
)

SOCKET_ENV = "QMP_SOCKET"

# What a secret is shown as, in qmp_commands and in messages.
REDACTED = "********"

# Python's sockets refuse timeouts much beyond this (about 292 years of nanoseconds).
MAX_TIMEOUT = 1e9

# Commands that only read state: they run in check mode and never count as a change.
_READ_ONLY_PREFIXES = ("query-", "x-query-", "x-debug-query-", "guest-get-")
_READ_ONLY_GUEST_AGENT = frozenset(["guest-info", "guest-ping", "guest-sync", "guest-fsfreeze-status"])


def is_query(command):
    return command.startswith(_READ_ONLY_PREFIXES) or command in _READ_ONLY_GUEST_AGENT


def secret_strings(value):
    """The strings Ansible's no_log hides for `value` (its texts and numbers, nested ones too)."""
    if isinstance(value, (bytes, str)):
        return [value.decode("utf-8", "replace") if isinstance(value, bytes) else value] if value else []
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [str(value)]
    if isinstance(value, dict):
        value = list(value.values())
    strings = []
    for item in value:
        strings.extend(secret_strings(item))
    return strings


# Commands whose `password` argument is one: QEMU's display passwords, and the guest agent's
# (base64 of the password, or of its crypted form). `block_passwd` is QEMU's before 4.0.
_PASSWORD_COMMANDS = frozenset(["set_password", "change-vnc-password", "guest-set-user-password", "block_passwd"])


def secret_paths(command, arguments):
    """The arguments of `command` that carry a secret, as paths for `redacted` ("data", "props.data").

    A secret object's `data` (object-add of qom-type secret, also in the `props` QEMU before 6.0
    takes), the `password` of set_password, change-vnc-password and the guest agent's
    guest-set-user-password, the `arg` of QEMU's old `change vnc password`, and the whole
    `command-line` of a human-monitor-command that sets a password or adds a secret object
    (see `hmp_secrets`). Only the paths `arguments` has are listed.
    """
    if not isinstance(arguments, dict):
        return []
    paths = []
    if command == "object-add" and arguments.get("qom-type") == "secret":
        if "data" in arguments:
            paths.append("data")
        if isinstance(arguments.get("props"), dict) and "data" in arguments["props"]:
            paths.append("props.data")
    elif command in _PASSWORD_COMMANDS:
        if "password" in arguments:
            paths.append("password")
    elif command == "change":
        if arguments.get("device") == "vnc" and arguments.get("target") == "password" and "arg" in arguments:
            paths.append("arg")
    elif command == "human-monitor-command":
        if hmp_secrets(arguments.get("command-line")) is not None:
            paths.append("command-line")
    return paths


def hmp_secrets(command_line):
    """The secrets a human monitor command line carries, or None when it sets no password and adds no
    secret object.

    A list (empty when the secret cannot be picked out of the line; the whole line is one then) of the
    password of `set_password` and `change vnc password`, or the data of `object_add secret,...`.
    """
    if not isinstance(command_line, str):
        return None
    name, dummy, rest = command_line.strip().partition(" ")
    rest = rest.strip()
    if name in ("set_password", "block_passwd"):
        # set_password protocol password [-d display] [action]; block_passwd device password
        return _hmp_words(rest)[1:2]
    if name == "change":
        words = _hmp_words(rest)
        if not words or words[0] != "vnc":
            return None
        # change vnc password [password]; whatever else follows vnc may be a password given wrong.
        return words[2:3] if words[1:2] == ["password"] else words[1:]
    if name == "object_add" and _hmp_adds_secret(rest):
        return _hmp_object_data(rest)
    return None


def _hmp_words(text):
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote
        return text.split()


def _hmp_adds_secret(options):
    """Whether object_add's `options` (key=value,... or JSON) may add a secret object with data.

    Errs on the side of yes: any word `secret` and any word `data`."""
    return re.search(r"\bsecret\b", options) is not None and re.search(r"\bdata\b", options) is not None


def _hmp_object_data(options):
    """The `data` given in object_add's options, as a list of none or one."""
    if options.startswith("{"):
        try:
            value = json.loads(options)
        except ValueError:
            return []
        data = value.get("data") if isinstance(value, dict) else None
        return [data] if isinstance(data, str) and data else []
    for pair in _keyval_pairs(options):
        key, equals, value = pair.partition("=")
        if equals and key.strip() == "data" and value:
            return [value]
    return []


def _keyval_pairs(options):
    """QEMU's key=value,... split at each comma, a doubled comma standing for one in a value."""
    pairs, current, index = [], [], 0
    while index < len(options):
        char = options[index]
        if char == "," and options[index + 1:index + 2] == ",":
            current.append(",")
            index += 2
            continue
        if char == ",":
            pairs.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    pairs.append("".join(current))
    return pairs


def redacted(arguments, paths):
    """A copy of `arguments` with the values at `paths` (argument names, dotted for nested
    ones: "props.data") replaced by REDACTED; `arguments` itself is left as it is."""
    if not arguments or not paths:
        return arguments
    copy = dict(arguments)
    for path in paths:
        name, dummy, rest = path.partition(".")
        if name not in copy:
            continue
        if rest:
            if isinstance(copy[name], dict):
                copy[name] = redacted(copy[name], [rest])
        else:
            copy[name] = REDACTED
    return copy


def connection_argument_spec():
    """The connection options, documented once in the qemu.qmp.connection doc fragment."""
    return dict(
        socket=dict(type="path"),
        host=dict(type="str"),
        port=dict(type="int"),
        timeout=dict(type="float", default=30.0),
        wait_timeout=dict(type="float"),
    )


def timeout_error(option, value):
    """Why `value` cannot be the timeout option `option`, or None when it can."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if 0 < seconds <= MAX_TIMEOUT:  # False for nan too
        return None
    return "%s must be a number of seconds, more than 0 and at most %d, not %r" % (option, MAX_TIMEOUT, value)


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class QMPModule:
    """An AnsibleModule plus one QMP connection and the record of what was sent."""

    def __init__(self, argument_spec, supports_check_mode=True, mutually_exclusive=None,
                 required_by=None, **kwargs):
        spec = connection_argument_spec()
        spec.update(argument_spec)
        required_by = dict(required_by or {})
        required_by.setdefault("host", ["port"])
        self.module = AnsibleModule(
            argument_spec=spec,
            supports_check_mode=supports_check_mode,
            mutually_exclusive=[("socket", "host")] + list(mutually_exclusive or []),
            required_by=required_by,
            **kwargs
        )
        self.params = self.module.params
        self.check_mode = self.module.check_mode
        # "guest-agent" talks to qemu-ga instead of QEMU (set before connecting).
        self.protocol = "qmp"
        self.timeout = self.params["timeout"]
        self.client = None
        self.commands = []
        self.changed = False
        self._schema = None
        self._validation_warned = False
        self._secrets = []
        # Checked before any socket sees them: sockets refuse such values with bare Python errors.
        for option in ("timeout", "wait_timeout"):
            if option == "wait_timeout" and self.params[option] is None:
                continue  # unset: waits use timeout
            error = timeout_error(option, self.params[option])
            if error:
                self.fail(error)
        for option in ("socket", "host"):
            if "\x00" in (self.params[option] or ""):
                self.fail("%s must not contain a NUL character: %r" % (option, self.params[option]))

    @property
    def wait_timeout(self):
        """Seconds to wait for what the module started or follows in QEMU (jobs, events, the guest)."""
        wait_timeout = self.params["wait_timeout"]
        return self.timeout if wait_timeout is None else wait_timeout

    # -- connection -------------------------------------------------------

    def _client(self):
        params = self.params
        if params["host"]:
            if not _is_loopback(params["host"]):
                self.module.warn(
                    "QMP over TCP to %s is plain text with no authentication: anyone who can reach "
                    "that port controls the VM. Prefer a unix socket, or an SSH tunnel." % params["host"])
            return QMPClient(host=params["host"], port=params["port"], timeout=self.timeout, protocol=self.protocol)
        path = params["socket"] or os.environ.get(SOCKET_ENV)
        if not path:
            self.fail("no QMP connection given: set socket (or the %s environment variable), "
                      "or host and port" % SOCKET_ENV)
        return QMPClient(socket_path=path, timeout=self.timeout, protocol=self.protocol)

    def connected(self, absent_ok=False):
        """Context manager holding the connection open.

        With absent_ok, a socket that does not exist or refuses connections
        (QEMU is not running there) leaves `self.client` None instead of failing.
        """
        return _Connection(self, absent_ok)

    def open_connection(self):
        """Connect and keep the client, raising the collection's errors instead of failing (detached runs)."""
        client = self._client()
        client.connect()
        self.client = client

    def close_connection(self):
        client, self.client = self.client, None
        if client is not None:
            client.close()

    @property
    def version(self):
        return self.client.version

    @property
    def schema(self):
        if self._schema is None:
            self._schema, dummy = load_schema(self.query, self.client.version)
        return self._schema

    # -- commands ---------------------------------------------------------

    def _record(self, command, arguments, repeatable=False):
        entry = {"execute": command}
        if arguments:
            entry["arguments"] = arguments
        last = self.commands[-1] if self.commands else None
        if repeatable and last is not None and dict((k, v) for k, v in last.items() if k != "repeated") == entry:
            # A wait polls the same query many times: list it once, with a count.
            last["repeated"] = last.get("repeated", 1) + 1
            return
        self.commands.append(entry)

    def protect(self, command, arguments, redact=None):
        """`arguments` as `qmp_commands` shows them: the secrets among them replaced by REDACTED.

        The secrets are those at the paths `redact` lists (see `redacted`) and those `secret_paths`
        knows for `command`; their values are hidden from the whole result (see `hide`). `arguments`
        itself is left as it is, for QEMU. Every command the module runs goes through here; a module
        that takes a command from its user calls it before connecting, so that a failed connection
        hides them too.
        """
        paths = list(redact or [])
        paths.extend(path for path in secret_paths(command, arguments) if path not in paths)
        recorded = redacted(arguments, paths)
        if recorded is not arguments:
            self.hide(*[value for path in paths for value in _values_at(arguments, path)])
            if command == "human-monitor-command":
                self.hide(*(hmp_secrets(arguments.get("command-line")) or []))
        return recorded

    def query(self, command, arguments=None, timeout=None):
        """Run a command that only reads state, in check mode too."""
        self._record(command, self.protect(command, arguments), repeatable=True)
        return self.client.execute(command, arguments, timeout=timeout)

    def transient(self, command, arguments=None):
        """Run a command whose effect the module undoes before it returns, in check mode too.

        For scratch state a module needs to measure something QEMU cannot be
        asked directly (a temporary bitmap, a read-only probe node).
        """
        self._record(command, self.protect(command, arguments))
        return self.client.execute(command, arguments)

    def change(self, command, arguments=None, timeout=None, redact=None):
        """Run a command that changes QEMU; in check mode only validate and record it.

        `redact` lists the arguments that hold secrets beside those `secret_paths` knows (see
        `protect`): QEMU gets them as they are, `qmp_commands` shows REDACTED, and their values
        are hidden (see `hide`).
        """
        self.changed = True
        recorded = self.protect(command, arguments, redact)
        if self.check_mode:
            self.validate(command, arguments)
            self._record(command, recorded)
            return None
        self._record(command, recorded)
        return self.client.execute(command, arguments, timeout=timeout)

    def hide(self, *values):
        """Keep secrets out of everything the module returns.

        Ansible hides them as it hides the values of no_log options, anywhere in the result
        (QEMU's error text too); messages the module builds show REDACTED instead. So a short or
        common secret ("1", "root") is hidden wherever that text appears in the result.
        """
        for value in values:
            for text in secret_strings(value):
                if text not in self._secrets:
                    self._secrets.append(text)
                self.module.no_log_values.add(text)
        self._secrets.sort(key=len, reverse=True)  # a secret inside a longer one goes last

    def scrub(self, text):
        """`text` with each hidden value replaced by REDACTED."""
        for secret in getattr(self, "_secrets", ()):
            text = text.replace(secret, REDACTED)
        return text

    def validate(self, command, arguments):
        """Fail the way QEMU would if the arguments do not fit its schema."""
        if self.protocol != "qmp":
            return  # the guest agent has no schema to ask
        try:
            errors = self.schema.validate(command, arguments)
        except SchemaValidationUnavailable as exc:
            if not self._validation_warned:
                self._validation_warned = True
                self.module.warn("check mode could not validate the planned commands against "
                                 "QEMU's schema: %s" % exc)
            return
        if errors:
            errors = [self.scrub(error) for error in errors]
            self.fail("QEMU would refuse %s: %s" % (command, "; ".join(errors)),
                      validation_errors=errors)

    def needs_recreate(self, what, differences, not_compared, result, how):
        """Record a comparison with an existing object in `result`.

        Returns False when nothing differs, True when something does and the
        module's `recreate` option allows replacing it; fails otherwise,
        naming each difference and `how` recreate would replace it.
        """
        result["not_compared"] = not_compared
        if not differences:
            return False
        result["differences"] = differences
        if not self.params.get("recreate"):
            self.fail("%s exists with other settings: %s (set recreate=true to %s)" % (
                what, ", ".join("%s is %r, wanted %r" % (key, diff["qemu"], diff["wanted"])
                                for key, diff in sorted(differences.items())), how), **result)
        return True

    def wait_for_event(self, names, match=None, timeout=None):
        return self.client.wait_for_event(names, match=match,
                                          timeout=self.wait_timeout if timeout is None else timeout)

    # -- results ----------------------------------------------------------

    def exit(self, changed=None, before=None, after=None, **result):
        result["changed"] = self.changed if changed is None else changed
        result["qmp_commands"] = self.commands
        if self.module._diff and (before is not None or after is not None):
            result["diff"] = {"before": before if before is not None else {},
                              "after": after if after is not None else {}}
        self.module.exit_json(**result)

    def fail(self, msg, **result):
        result["qmp_commands"] = self.commands
        msg = self.scrub(msg)
        self.module.fail_json(msg=msg, **result)

    def fail_from(self, exc):
        """The single place where the collection's errors become a failed result."""
        msg, result = error_result(exc)
        self.fail(msg, **result)


def _values_at(arguments, path):
    """The value at a dotted `path` of `arguments`, as a list of none or one."""
    name, dummy, rest = path.partition(".")
    if not isinstance(arguments, dict) or name not in arguments:
        return []
    return _values_at(arguments[name], rest) if rest else [arguments[name]]


def error_result(exc):
    """(msg, fields) of a failed result for any of the collection's errors (QMPError and its family):
    QEMU's own error class and text, the address that could not be reached, and the details an engine
    error carries (the disks, the file that is damaged, ...)."""
    result = dict(getattr(exc, "details", None) or {})
    if isinstance(exc, QMPCommandError):
        result["qmp_error"] = {"class": exc.error_class, "desc": exc.desc}
    if isinstance(exc, QMPConnectError):
        result["qmp_address"] = exc.address
        result["qmp_connect_reason"] = exc.reason
    return str(exc), result


class _Connection:
    def __init__(self, qm, absent_ok):
        self.qm = qm
        self.absent_ok = absent_ok

    def __enter__(self):
        qm = self.qm
        client = qm._client()
        try:
            client.connect()
        except QMPConnectError as exc:
            if self.absent_ok and exc.reason in ("missing", "refused"):
                qm.client = None
                return qm
            qm.fail_from(exc)
        except QMPError as exc:
            qm.fail_from(exc)
        qm.client = client
        return qm

    def __exit__(self, exc_type, exc, tb):
        client, self.qm.client = self.qm.client, None
        if client is not None:
            client.close()
        if isinstance(exc, QMPError):
            self.qm.fail_from(exc)
        return False
