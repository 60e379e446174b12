# -*- coding: utf-8 -*-
# Copyright: contributors to the qemu.qmp collection
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Runs the qmp_migration module, then follows its run on the host until it ends, printing its progress.

When the following itself ends without the run's result (ansible-playbook went away, the host was lost, the
run was killed), the message says what becomes of the migration, and where the VM runs as far as the source
QEMU tells it, instead of what the run would do in general."""

from __future__ import annotations

from ansible.errors import AnsibleError

from ansible_collections.qemu.qmp.plugins.plugin_utils.follow_run import FollowRunAction

CONNECTION_OPTIONS = ("socket", "host", "port", "timeout")


class ActionModule(FollowRunAction):
    """The run is the module's; following it is shared by the collection's engines."""

    def run(self, tmp=None, task_vars=None):
        self._migration_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        msg = result.get("msg") or ""
        # `run_ended` is how the shared run machinery says that a run ended without its result.
        if result.get("failed") and self._task.args.get("state") == "migrated" and result.get("run_ended") == "killed":
            # Killed or crashed: QEMU goes on with a migration that was started, by itself.
            host = self._migration_vars.get("inventory_hostname", "")
            result["msg"] = "%s: it was killed or crashed. %s" % (msg.split(". It was")[0], self._source_now(
                "%s on %s" % (self._task.args.get("socket") or "the source QEMU", host)))
        return result

    def follow(self, host, run, interval, controller_timeout):
        result = self.follow_run(host, run, interval, controller_timeout)
        if result.get("run_ended") in ("controller_gone", "host_lost") and self._task.args.get("state") == "migrated":
            # The follower's own failure, not the run's: say what it means for the VM.
            result["msg"] = self._explain(result["run_ended"], host, run, controller_timeout, result.get("msg", ""))
        result.setdefault("qmp_commands", [])
        return result

    def _explain(self, ended, host, run, controller_timeout, msg):
        source = "%s on %s" % (self._task.args.get("socket") or "the source QEMU", host)
        uri = self._task.args.get("uri")
        if ended == "controller_gone":
            return ("ansible-playbook went away while the VM migrated from %s. The migration goes on in the run on "
                    "the host (%s): a migration that has not handed the VM over within %ds is cancelled there, and "
                    "the VM stays on the source; one that completes leaves the VM running on the destination "
                    "(%s), and a rerun of the qemu.qmp.migrate role finishes the move"
                    % (source, run["dir"], controller_timeout, uri))
        if ended == "host_lost":
            return ("%s. The VM was migrating from %s: the run there cancels a migration that has not handed the VM "
                    "over within %ds (the VM stays on the source), and lets one that has complete (the VM then runs "
                    "on the destination, %s). Where it runs cannot be read from here while the host is lost"
                    % (msg.split(";")[0], source, controller_timeout, uri))
        return msg

    def _source_now(self, source):
        """What the source QEMU says now, in a sentence."""
        args = dict((name, self._task.args[name]) for name in CONNECTION_OPTIONS if self._task.args.get(name))
        try:
            found = self._execute_module(module_name="qemu.qmp.qmp_info", module_args=dict(args, gather=[
                "status", "migration"]), task_vars=self._migration_vars)
        except AnsibleError as exc:
            found = {"failed": True, "msg": str(exc)}
        if found.get("failed") or "status" not in found:
            return "The source QEMU (%s) does not answer now: %s" % (source, found.get("msg", "no status"))
        status, migration = found["status"], (found.get("migration") or {}).get("status", "none")
        if status == "postmigrate":  # (a QEMU that was a destination itself reports that migration completed)
            where = "the VM runs on the destination (%s) now" % self._task.args.get("uri")
        elif status in ("running", "paused"):
            going_on = migration not in ("none", "failed", "cancelled", "completed")
            where = "the VM is %s there%s" % (status, "; QEMU goes on with the migration by itself, without the "
                                                      "convergence policy or the disk copies' switch-over"
                                              if going_on else "")
        else:
            where = "the VM is %s there" % status
        return "The source QEMU (%s) is %s, its migration %s: %s" % (source, status, migration, where)
