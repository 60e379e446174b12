#!/usr/bin/env bash
# Build the collection tarball, check what it holds, lint its documentation
# (antsibull-docs), import it as Galaxy and Automation Hub do (galaxy-importer),
# install it into an empty folder, and check that ansible-doc renders every
# module and that a module runs from the install.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/qemu.qmp-build.XXXXXX")
trap 'kill "$(cat "$work/qemu.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$work"' EXIT
# galaxy-importer and antsibull-docs, with the ansible-core they pin (tools/bootstrap.sh).
importer_bin=$top/.venv-importer/bin

ansible-galaxy collection build --force --output-path "$work/dist" "$top" >/dev/null
tarball=$(ls "$work"/dist/qemu-qmp-*.tar.gz)
tar -tzf "$tarball" > "$work/contents.txt"
echo "check-build: built $(basename "$tarball") ($(du -k "$tarball" | cut -f1) KiB, $(grep -cv '/$' "$work/contents.txt") files)"
# Only what users run ships: no development folders, tests, build files, molecule scenarios or demo.
if grep -E '^(\.[^/]*|build|bench|tools|tests)(/|$)|(^|/)molecule(/|$)|^(Makefile|pytest\.ini|requirements[^/]*\.txt)$|^playbooks/demo' \
        "$work/contents.txt"; then
    echo "check-build: the tarball holds development files (above); see build_ignore in galaxy.yml" >&2; exit 1
fi
for needed in COPYING LICENSES/GPL-3.0-or-later.txt meta/runtime.yml meta/execution-environment.yml \
        roles/vm/README.md roles/backup/README.md roles/migrate/README.md; do
    grep -qx "$needed" "$work/contents.txt" || { echo "check-build: the tarball lacks $needed" >&2; exit 1; }
done

start=$SECONDS
if ! (cd "$top" && PATH="$importer_bin:$PATH" antsibull-docs lint-collection-docs --plugin-docs .) \
        > "$work/docs-lint.txt" 2>&1; then
    cat "$work/docs-lint.txt" >&2
    echo "check-build: antsibull-docs lint-collection-docs found problems (above)" >&2; exit 1
fi
echo "check-build: antsibull-docs lint-collection-docs --plugin-docs: clean ($((SECONDS - start))s)"

# As Galaxy runs it, less what needs containers (ansible-test in docker or podman).
printf '%s\n' '[galaxy-importer]' 'run_ansible_test = False' 'ansible_test_local_image = False' \
    'local_image_docker = False' 'run_ansible_doc = True' 'run_ansible_lint = True' 'run_flake8 = False' \
    'check_changelog = True' "tmp_root_dir = $work" > "$work/galaxy-importer.cfg"
# A HOME of its own: ansible-lint would also lint a qemu.qmp installed in ~/.ansible/collections.
mkdir "$work/home"
start=$SECONDS
status=0
(cd "$work" && HOME="$work/home" PATH="$importer_bin:$PATH" GALAXY_IMPORTER_CONFIG="$work/galaxy-importer.cfg" \
    python -m galaxy_importer.main "$tarball") > "$work/importer.txt" 2>&1 || status=$?
if [ "$status" -ne 0 ] || grep -qE '^(ERROR|WARNING)' "$work/importer.txt"; then
    cat "$work/importer.txt" >&2
    echo "check-build: galaxy-importer failed (exit code $status) or printed an ERROR or WARNING (above)" >&2; exit 1
fi
version=$("$importer_bin/python" -c 'import importlib.metadata as m; print(m.version("galaxy-importer"))')
echo "check-build: galaxy-importer $version imports the tarball with no error or warning ($((SECONDS - start))s)"

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
