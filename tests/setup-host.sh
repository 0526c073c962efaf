#!/usr/bin/env bash
# Installs what building and testing layerboot needs on a Debian 12 machine (idempotent).
set -euo pipefail
pkgs=(
  musl-tools          # static builds of crates with C code (zstd)
  debootstrap docker.io podman containerd btrfs-progs e2fsprogs dosfstools mtools jq  # the fixture stores
  qemu-system-x86 qemu-utils ovmf                              # the VM boot tests
  file zstd cpio kmod fdisk attr xz-utils gzip busybox-static  # busybox: the rescue-shell test
  strace                                                       # the deploy test that sees its fsyncs
  shellcheck dracut-core                                       # the distro hooks (hooks/)
  grub-common                                                  # grub-script-check: the GRUB snippets deploy writes
  lintian makepkg libarchive-tools                             # the packages (packaging/)
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
  || rustup target add x86_64-unknown-linux-musl
