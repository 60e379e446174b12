#!/usr/bin/env bash
# Run `molecule test` for every scenario of every role (roles/*/molecule/*).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export QMP_TEST_GUEST="${QMP_TEST_GUEST:-$top/.cache/guest}"
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
