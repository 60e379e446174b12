#!/usr/bin/env bash
# Run `molecule test` for every scenario of every role (roles/*/molecule/*).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export QMP_TEST_GUEST="${QMP_TEST_GUEST:-$top/.cache/guest}"
# The migrate scenario upgrades its VM to this QEMU by migration.
export QMP_UPGRADE_QEMU="${QMP_UPGRADE_QEMU:-$top/.cache/qemu10/bin/qemu-system-x86_64}"
status=0
for role_dir in "$top"/roles/*/; do
    [ -d "$role_dir/molecule" ] || continue
    for scenario in "$role_dir"molecule/*/; do
        name=$(basename "$scenario")
        echo "molecule: role $(basename "$role_dir"), scenario $name"
        (cd "$role_dir" && molecule test --scenario-name "$name") || status=1
    done
done
exit $status
