#!/usr/bin/env bash
# Run ansible-test on a copy of the collection at the path it requires
# (.../ansible_collections/qemu/qmp). This machine cannot download pip's
# bootstrap script, so a stand-in that uses ensurepip is put in its cache.
#   tools/ansible-test.sh sanity [args...]
# VENV names the virtualenv whose ansible-test runs (default: .venv).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# Outside the checkout: inside it, ansible-test would list files with git and
# find the copy ignored.
base=$(mktemp -d "${TMPDIR:-/tmp}/qemu.qmp-ansible-test.XXXXXX")
trap 'rm -rf "$base"' EXIT
dest="$base/ansible_collections/qemu/qmp"
mkdir -p "$dest"
# The work tree as it is: files deleted but not yet committed are left out.
(cd "$top" && git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$dest"

# ansible-test bootstraps pip with a script it downloads (named after the pip
# version it wants); provide every name it may ask for.
cache="$HOME/.ansible/test/cache"
mkdir -p "$cache"
for name in get_pip_24_2.py get_pip_24_3.py get_pip_25_0.py get_pip_25_1.py get_pip_25_2.py; do
    cat > "$cache/$name" <<'PY'
import subprocess
import sys
subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade"], check=True)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.run([sys.executable, "-m", "pip", "install"] + args, check=True)
PY
done

cd "$dest"
export PATH="$top/${VENV:-.venv}/bin:$PATH"
ansible-test "$@"
