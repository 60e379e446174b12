#!/usr/bin/env bash
# Set up everything `make test` and `make demo` need, installing only what is
# missing: Debian's QEMU 7.2 and tools (apt), QEMU 10.0 unpacked beside it,
# the tiny test guest, a virtualenv with the pinned Python requirements, and
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

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: creating .venv with requirements-dev.txt" >&2
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -r requirements-dev.txt >&2
    echo "$want" > "$stamp"
fi

mkdir -p build/collections/ansible_collections/qemu
ln -sfn "$top" build/collections/ansible_collections/qemu/qmp
