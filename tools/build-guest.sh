#!/usr/bin/env bash
# Build the tiny test guest from Debian packages only: the distribution kernel
# and a busybox initramfs whose /init is tools/guest/init. Built once into the
# cache folder and reused. Prints the folder holding vmlinuz and initrd.gz.
#   tools/build-guest.sh [DEST]      (default: .cache/guest)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-${QMP_DEV_CACHE:-$here/../.cache}/guest}
stamp=$(sha256sum "$here/guest/init" "$0" | sha256sum | cut -c1-16)
if [ -f "$dest/vmlinuz" ] && [ -f "$dest/initrd.gz" ] && [ "$(cat "$dest/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$dest"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" busybox-static >&2)
mkdir -p "$work/pkg" "$work/root"/{bin,dev,proc,sys,lib/modules,tmp}
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/pkg"; done
kdir=$(ls -d "$work"/pkg/lib/modules/*/kernel)
cp "$work/pkg/bin/busybox" "$work/root/bin/busybox"
ln -s busybox "$work/root/bin/sh"
for mod in drivers/virtio/virtio drivers/virtio/virtio_ring drivers/virtio/virtio_pci_modern_dev \
           drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
           drivers/acpi/button drivers/input/evdev; do
    cp "$kdir/$mod.ko" "$work/root/lib/modules/"
done
install -m 755 "$here/guest/init" "$work/root/init"
mkdir -p "$dest"
(cd "$work/root" && find . | "$work/root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -9) > "$dest/initrd.gz.tmp"
cp "$work"/pkg/boot/vmlinuz-* "$dest/vmlinuz.tmp"
mv "$dest/initrd.gz.tmp" "$dest/initrd.gz"; mv "$dest/vmlinuz.tmp" "$dest/vmlinuz"
echo "$stamp" > "$dest/stamp"
echo "$dest"
