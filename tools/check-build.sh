#!/usr/bin/env bash
# Build the collection tarball, install it into an empty folder, and check that
# ansible-doc renders every module and that a module runs from the install.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/qemu.qmp-build.XXXXXX")
trap 'kill "$(cat "$work/qemu.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$work"' EXIT

ansible-galaxy collection build --force --output-path "$work/dist" "$top" >/dev/null
tarball=$(ls "$work"/dist/qemu-qmp-*.tar.gz)
echo "check-build: built $(basename "$tarball") ($(du -k "$tarball" | cut -f1) KiB)"
if tar -tzf "$tarball" | grep -E '(^|/)(\.cache|\.venv|build|\.ci)/' ; then
    echo "check-build: the tarball holds development files" >&2; exit 1
fi
export ANSIBLE_COLLECTIONS_PATH="$work/installed"
ansible-galaxy collection install --force -p "$work/installed" "$tarball" >/dev/null

modules=$(find "$top/plugins/modules" -name '*.py' -printf '%f\n' | sed 's/\.py$//' | sort)
for module in $modules; do
    ansible-doc "qemu.qmp.$module" > "$work/doc.txt"
    grep -q "EXAMPLES" "$work/doc.txt" || { echo "check-build: ansible-doc qemu.qmp.$module has no examples" >&2; exit 1; }
done
echo "check-build: ansible-doc renders $(echo "$modules" | wc -w) modules from the installed collection"
for role in "$top"/roles/*/; do
    ansible-doc -t role "qemu.qmp.$(basename "$role")" > "$work/doc.txt"
done
for filter in "$top"/plugins/filter/*.py; do
    ansible-doc -t filter "qemu.qmp.$(basename "$filter" .py)" > "$work/doc.txt"
done
echo "check-build: ansible-doc renders the roles and filters too"

qemu-img create -q -f qcow2 "$work/disk0.qcow2" 16M
qemu-system-x86_64 -machine q35 -accel tcg -display none -nodefaults -S \
    -qmp "unix:$work/qmp.sock,server=on,wait=off" -pidfile "$work/qemu.pid" -daemonize \
    -blockdev "driver=file,filename=$work/disk0.qcow2,node-name=disk0-file" \
    -blockdev "driver=qcow2,file=disk0-file,node-name=disk0" -device virtio-blk-pci,drive=disk0
out=$(ansible localhost -m qemu.qmp.qmp_info -a "socket=$work/qmp.sock gather=version,status")
echo "$out" | grep -q '"status": "prelaunch"' || { echo "$out" >&2; exit 1; }
echo "check-build: qemu.qmp.qmp_info runs from the installed collection"
# The backup engine: a module whose run goes on detached on the host, followed by its action plugin.
out=$(ansible localhost -m qemu.qmp.qmp_backup_chain -a "socket=$work/qmp.sock dir=$work/backups/vm1 poll_interval=0.01")
echo "$out" | grep -q '"level": "full"' || { echo "$out" >&2; exit 1; }
out=$(ansible localhost -m qemu.qmp.qmp_backup_chain -a "dir=$work/backups/vm1 operation=verify")
echo "$out" | grep -q '"images": 1' || { echo "$out" >&2; exit 1; }
echo "check-build: qemu.qmp.qmp_backup_chain backs up and verifies from the installed collection"
