#!/usr/bin/env bash
# Set up everything `make test` and `make demo` need, installing only what is
# missing: Debian's QEMU 7.2 and tools (apt), QEMU 10.0 unpacked beside it,
# the tiny test guest, virtualenvs with the pinned Python requirements, and
# the collection linked where Ansible finds it (build/collections).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

need=()
# sshd and ss: the two SSH hosts of the cross-host integration tests (tests/integration/two_hosts.py).
for pair in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils nbdinfo:libnbd-bin shellcheck:shellcheck faketime:faketime \
            /usr/sbin/sshd:openssh-server ss:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "bootstrap: installing ${need[*]} with apt" >&2
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}" >&2
fi

tools/setup-qemu10.sh >/dev/null
tools/build-guest.sh >/dev/null

# make_venv FOLDER PYTHON REQUIREMENTS: a virtualenv holding exactly the pinned
# requirements, made again only when the requirements file changes.
make_venv() {
    local folder=$1 python=$2 requirements=$3 stamp want
    stamp=$folder/.requirements.sha256
    want=$(sha256sum "$requirements" | cut -d' ' -f1)
    if [ ! -x "$folder/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "bootstrap: creating $folder with $requirements" >&2
        "$python" -m venv "$folder"
        "$folder/bin/python" -m pip install -q --upgrade pip >&2
        "$folder/bin/python" -m pip install -q -r "$requirements" >&2
        echo "$want" > "$stamp"
    fi
}

# The newest Python this machine has (3.13, else 3.12): on PATH, or installed by pyenv.
newest_python() {
    local minor version
    for minor in 3.13 3.12; do
        if "python$minor" -c '' 2>/dev/null; then command -v "python$minor"; return; fi
        if command -v pyenv >/dev/null 2>&1; then
            version=$(pyenv versions --bare 2>/dev/null | grep -E "^${minor//./\\.}\.[0-9]+$" | sort -V | tail -n 1)
            if [ -n "$version" ]; then echo "$(pyenv root)/versions/$version/bin/python$minor"; return; fi
        fi
    done
    echo "bootstrap: the second test lane needs Python 3.13 or 3.12 (none on PATH or in pyenv)" >&2
    return 1
}

make_venv .venv python3 requirements-dev.txt
make_venv .venv-latest "$(newest_python)" requirements-latest.txt
# galaxy-importer and antsibull-docs (make build) pin dependencies that clash with requirements-dev.txt.
make_venv .venv-importer python3 requirements-importer.txt

mkdir -p build/collections/ansible_collections/qemu
ln -sfn "$top" build/collections/ansible_collections/qemu/qmp
