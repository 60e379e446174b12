#!/usr/bin/env bash
# Unpack QEMU 10.x from bookworm-backports into a private folder, beside the
# system QEMU 7.2, without installing it. Prints the binary's path.
#   tools/setup-qemu10.sh [DEST]      (default: .cache/qemu10)
set -euo pipefail
dest=${1:-${QMP_DEV_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache}/qemu10}
# bin/ holds wrappers that find the unpacked firmware and modules (-L).
bin="$dest/bin/qemu-system-x86_64"
if [ -x "$bin" ] && [ -x "$dest/usr/bin/qemu-system-x86_64" ]; then echo "$bin"; exit 0; fi

src=/etc/apt/sources.list.d/qemu-qmp-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Same mirror and keyring as the existing bookworm entry.
    base=$(grep -rhs -A3 '^URIs:' /etc/apt/sources.list.d/*.sources | awk '/^URIs:/{print $2; exit}')
    base=${base:-http://deb.debian.org/debian}
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$base" > "$src"
    apt-get update -q >&2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root -t bookworm-backports \
    qemu-system-x86 qemu-system-common qemu-system-data qemu-utils >&2)
mkdir -p "$dest"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$dest"; done
mkdir -p "$dest/bin"
printf '#!/bin/sh\nexec "%s/usr/bin/qemu-system-x86_64" -L "%s/usr/share/qemu" "$@"\n' "$dest" "$dest" > "$bin"
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
    [ -x "$dest/usr/bin/$tool" ] && ln -sfn "../usr/bin/$tool" "$dest/bin/$tool"
done
chmod +x "$bin"
"$bin" --version >&2
echo "$bin"
